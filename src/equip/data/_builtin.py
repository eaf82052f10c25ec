"""The built-in data set (equip.data.synthetic) as an ImageSet: drawn, put through the same
preprocessing as photos, and cached on disk so that it is drawn only once."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from equip.config.checks import check_decoded_size
from equip.data import _imagestore
from equip.data._imageset import ImageSet
from equip.data._imagestore import DiskImages
from equip.data._preprocess import PREPROCESS_VERSION, preprocess
from equip.data.synthetic import CLASSES, iter_synthetic, synthetic_labels
from equip.errors import EquipError


def synthetic_cache_file(cache_dir: Path, per_class: int, image_size: int, seed: int) -> Path:
    """One file per (data set, preprocessing): the drawing's seed and size, and the version."""
    name = f"synthetic-v{PREPROCESS_VERSION}-{image_size}px-seed{seed}-{per_class}pc"
    return cache_dir / f"{name}.npy"


def load_synthetic(
    per_class: int,
    image_size: int,
    seed: int,
    cache_dir: Path | None = None,
    ram_budget_mb: float = 0,
) -> ImageSet:
    """Draw the built-in set (or open it from the disk cache, where it is drawn only once).
    With a cache, sets up to `ram_budget_mb` are read into RAM and larger ones streamed."""
    labels = synthetic_labels(per_class)
    images: torch.Tensor | DiskImages
    if cache_dir is None:
        check_decoded_size(len(labels), image_size, None, f"data.per_class={per_class}")
        images, shas = _draw_in_ram(per_class, image_size, seed)
        decoded = len(labels)
    else:
        images, shas, decoded = _draw_once_to_disk(
            cache_dir, per_class, image_size, seed, ram_budget_mb
        )
    fp = hashlib.sha256(f"synthetic {image_size}px\n".encode())
    for sha, label in zip(shas, labels, strict=True):
        fp.update(f"{CLASSES[label]}/{sha}\n".encode())
    return ImageSet(
        images=images,
        labels=torch.from_numpy(labels),
        classes=list(CLASSES),
        paths=_paths(labels),
        sha256=shas,
        fingerprint=fp.hexdigest()[:16],
        source="decoded" if decoded else "disk-cache",
        decoded=decoded,
    )


def _preprocessed(per_class: int, size: int, seed: int, shas: list[str]) -> Iterator[np.ndarray]:
    """The drawings through the same preprocessing as photos (so served models agree), each
    one's sha256 appended to `shas` as it is yielded."""
    for im in iter_synthetic(per_class, size, seed):
        a = preprocess(Image.fromarray(im.transpose(1, 2, 0)), size)
        shas.append(hashlib.sha256(a.tobytes()).hexdigest())
        yield a


def _draw_in_ram(per_class: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    shas: list[str] = []
    arr = np.empty((per_class * len(CLASSES), 3, size, size), dtype=np.uint8)
    for k, a in enumerate(_preprocessed(per_class, size, seed, shas)):
        arr[k] = a
    return torch.from_numpy(arr), shas


def _draw_once_to_disk(
    cache_dir: Path, per_class: int, size: int, seed: int, ram_budget_mb: float
) -> tuple[torch.Tensor | DiskImages, list[str], int]:
    """(the cached set, in RAM or streamed, its sha256s, how many images were drawn now: 0 if
    it was cached). A cached set whose pixels fail their checksum is drawn again."""
    path = synthetic_cache_file(cache_dir, per_class, size, seed)
    cached = _imagestore.open_cached(path, ram_budget_mb)
    drawn = 0
    if cached is None:
        n = per_class * len(CLASSES)
        check_decoded_size(n, size, str(cache_dir), f"data.per_class={per_class}")
        shas: list[str] = []
        rows = _preprocessed(per_class, size, seed, shas)
        _imagestore.write(path, (n, 3, size, size), rows, lambda: {"sha256": shas})
        cached = _imagestore.open_cached(path, ram_budget_mb)
        drawn = n
    if cached is None:
        raise EquipError(f"{path} does not read back as written; check the disk under {cache_dir}")
    images, meta = cached
    return images, meta["sha256"], drawn


def _paths(labels: np.ndarray) -> list[str]:
    """synthetic://<class>/<index within the class>: a name for each image in reports."""
    counters: dict[int, int] = {}
    paths = []
    for label in labels.tolist():
        counters[label] = counters.get(label, -1) + 1
        paths.append(f"synthetic://{CLASSES[label]}/{counters[label]:05d}")
    return paths
