"""Images in, uint8 tensors out: loading, preprocessing and caching.

Preprocessing follows the course: composite transparency onto white, pad to a white square keeping
the aspect ratio, resize, stretch each channel's contrast. Every file is decoded once: results are
kept in memory for the process (a Hydra multirun loads the data once, not once per job) and on disk
keyed by file content and preprocessing settings (a second run starts from the cache). The
DataModule that serves the images to Lightning is in equip.data.loaders.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageOps, UnidentifiedImageError

from equip.config.checks import check_decoded_size
from equip.data import _imagestore
from equip.data._imagestore import DiskImages
from equip.errors import EquipError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
PREPROCESS_VERSION = 1  # bump when preprocess() changes: invalidates every disk cache entry


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor | DiskImages  # uint8, (N, 3, S, S): in RAM, or streamed from the cache
    labels: torch.Tensor  # int64, (N,)
    classes: list[str]
    paths: list[str]
    sha256: list[str]
    fingerprint: str  # changes with any file's content, its class, or the preprocessing
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) of unreadable files
    source: str = "decoded"  # decoded | disk-cache | memory
    decoded: int = 0  # files decoded by this load (0 when everything came from a cache)


# ---------------------------------------------------------------- preprocessing
def _to_rgb_on_white(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float greyscale: scale to 8 bit
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        # Gear PNGs hide near-black pixels under the alpha: convert("RGB") would show them.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, RGB, 16-bit RGB


def preprocess(img: Image.Image, size: int) -> np.ndarray:
    """PIL image -> uint8 array (3, size, size)."""
    img = ImageOps.exif_transpose(img)
    img = _to_rgb_on_white(img)
    img = ImageOps.pad(img, (size, size), method=Image.Resampling.BILINEAR, color="white")
    a = np.asarray(img, dtype=np.float32)
    lo = a.min(axis=(0, 1), keepdims=True)
    hi = a.max(axis=(0, 1), keepdims=True)
    a = np.where(hi > lo, (a - lo) * 255.0 / np.maximum(hi - lo, 1e-6), a)
    return np.ascontiguousarray(a.round().astype(np.uint8).transpose(2, 0, 1))


# ---------------------------------------------------------------- loading
def scan_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class-per-folder tree -> (class names, [(file, class index)]). Raises on every bad layout."""
    if not root.is_dir():
        raise EquipError(
            f"data.root={root} does not exist or is not a folder. "
            "Point data.root at a folder with one sub-folder of images per class."
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise EquipError(
            f"data.root={root} has no class folders. Put each class's images in its own "
            "sub-folder, e.g. data.root/helmets/*.jpg, data.root/rope/*.jpg."
        )
    files: list[tuple[Path, int]] = []
    empty = []
    for idx, d in enumerate(class_dirs):
        # A broken or looping symlink is kept: reading it fails, so it is counted as skipped.
        found = sorted(
            p
            for p in d.rglob("*")
            if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not found:
            empty.append(d.name)
        files += [(p, idx) for p in found]
    if empty:
        raise EquipError(
            f"class folder(s) with no images under data.root={root}: {', '.join(empty)}. "
            f"Add images ({', '.join(sorted(IMAGE_SUFFIXES))}) or remove the folder."
        )
    if len(class_dirs) < 2:
        raise EquipError(
            f"data.root={root} has only 1 class folder ({class_dirs[0].name}); a classifier "
            "needs at least 2. Add another class folder."
        )
    return [d.name for d in class_dirs], files


def _cache_file(cache_dir: Path, sha: str, size: int) -> Path:
    return cache_dir / f"v{PREPROCESS_VERSION}-{size}px" / sha[:2] / f"{sha}.npy"


def load_folder(
    root: Path, image_size: int, cache_dir: Path | None, ram_budget_mb: float = float("inf")
) -> ImageSet:
    """Decode (or read from the per-file cache) every photo. With a cache, the decoded set also
    becomes one .npy, written while decoding: up to `ram_budget_mb` it is read into RAM, larger
    sets are streamed from it; without a cache the photos are stacked in RAM."""
    classes, files = scan_folder(root)
    check_decoded_size(len(files), image_size, str(cache_dir) if cache_dir else None, "data.root")
    arrays, labels, paths, shas, skipped = [], [], [], [], []
    rows = None
    if cache_dir is not None:  # decoded rows go to disk as they come, not into a list
        cache_dir.mkdir(parents=True, exist_ok=True)
        rows = open(cache_dir / f".folder-rows.{os.getpid()}.tmp", "w+b")  # noqa: SIM115
    decoded = 0
    for path, label in files:
        try:
            raw = path.read_bytes()
        except OSError as e:
            skipped.append((str(path), f"unreadable: {e.strerror or e}"))
            continue
        sha = hashlib.sha256(raw).hexdigest()
        cached = _cache_file(cache_dir, sha, image_size) if cache_dir else None
        arr = None
        if cached is not None and cached.exists():
            try:
                arr = np.load(cached)
            except (OSError, ValueError):  # torn write by a killed process: decode again
                arr = None
            if arr is not None and (
                arr.shape != (3, image_size, image_size) or arr.dtype != np.uint8
            ):
                arr = None  # a foreign or damaged entry: decode again and overwrite it
        if arr is None:
            try:
                with Image.open(io.BytesIO(raw)) as img:
                    img.load()
                    arr = preprocess(img, image_size)
            except UnidentifiedImageError:
                skipped.append((str(path), "not a readable image (unknown or corrupt format)"))
                continue
            except Exception as e:  # PIL raises many types for truncated/damaged files
                skipped.append((str(path), f"{type(e).__name__}: {e}"))
                continue
            decoded += 1
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".{os.getpid()}.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, arr)
                os.replace(tmp, cached)  # atomic: parallel jobs never read half a file
        if rows is not None:
            rows.write(arr.tobytes())
        else:
            arrays.append(arr)
        labels.append(label)
        paths.append(str(path))
        shas.append(sha)
    if skipped:
        log.warning(
            "skipped %d unreadable image(s): %s",
            len(skipped),
            "; ".join(f"{p} ({why})" for p, why in skipped),
        )
    if not labels:
        if rows is not None:
            rows.close()
            os.unlink(rows.name)
        raise EquipError(
            f"no readable image under data.root={root}; every file failed to decode:\n"
            + "\n".join(f"  {p}: {why}" for p, why in skipped)
        )
    fp = hashlib.sha256(f"folder v{PREPROCESS_VERSION} {image_size}px\n".encode())
    for sha, label in sorted(zip(shas, labels, strict=True)):
        fp.update(f"{classes[label]}/{sha}\n".encode())
    fingerprint = fp.hexdigest()[:16]
    if rows is None:
        images: torch.Tensor | DiskImages = torch.from_numpy(np.stack(arrays))
    else:
        images = _rows_to_set(rows, cache_dir, fingerprint, len(labels), image_size, ram_budget_mb)
    return ImageSet(
        images=images,
        labels=torch.tensor(labels, dtype=torch.int64),
        classes=classes,
        paths=paths,
        sha256=shas,
        fingerprint=fingerprint,
        skipped=skipped,
        source="decoded" if decoded else "disk-cache",
        decoded=decoded,
    )


def _rows_to_set(rows, cache_dir, fingerprint: str, n: int, size: int, budget: float):
    """The decoded rows (a temp file) as this data set's cached .npy; read into RAM if it fits
    the budget, else streamed."""
    path = cache_dir / f"folder-v{PREPROCESS_VERSION}-{size}px-{fingerprint}.npy"
    row = 3 * size * size
    try:
        if _imagestore.open_cached(path) is None:

            def read_back():
                rows.seek(0)
                for _ in range(n):
                    yield np.frombuffer(rows.read(row), dtype=np.uint8)

            _imagestore.write(path, (n, 3, size, size), read_back(), dict)
    finally:
        rows.close()
        os.unlink(rows.name)
    cached = _imagestore.open_cached(path)
    assert cached is not None
    store = cached[0]
    return store.load() if store.nbytes <= budget * 2**20 else store


def load_synthetic(
    per_class: int,
    image_size: int,
    seed: int,
    cache_dir: Path | None = None,
    ram_budget_mb: float = 0,
) -> ImageSet:
    """Draw the built-in set (or open it from the disk cache, where it is drawn only once).
    With a cache, sets up to `ram_budget_mb` are read into RAM and larger ones streamed."""
    from equip.data.synthetic import CLASSES, iter_synthetic, synthetic_labels

    labels = synthetic_labels(per_class)
    shas: list[str] = []

    def preprocessed():  # through the same preprocessing as photos: served models agree
        for im in iter_synthetic(per_class, image_size, seed):
            a = preprocess(Image.fromarray(im.transpose(1, 2, 0)), image_size)
            shas.append(hashlib.sha256(a.tobytes()).hexdigest())
            yield a

    shape = (len(labels), 3, image_size, image_size)
    decoded = 0
    if cache_dir is None:
        check_decoded_size(len(labels), image_size, None, f"data.per_class={per_class}")
        arr = np.empty(shape, dtype=np.uint8)
        for k, a in enumerate(preprocessed()):
            arr[k] = a
        images: torch.Tensor | DiskImages = torch.from_numpy(arr)
        decoded = len(labels)
    else:
        path = synthetic_cache_file(cache_dir, per_class, image_size, seed)
        cached = _imagestore.open_cached(path)
        if cached is None:
            check_decoded_size(
                len(labels), image_size, str(cache_dir), f"data.per_class={per_class}"
            )
            _imagestore.write(path, shape, preprocessed(), lambda: {"sha256": shas})
            cached = _imagestore.open_cached(path)
            decoded = len(labels)
        assert cached is not None
        store, meta = cached
        shas = meta["sha256"]
        images = store.load() if store.nbytes <= ram_budget_mb * 2**20 else store
    fp = hashlib.sha256(f"synthetic {image_size}px\n".encode())
    for sha, label in zip(shas, labels, strict=True):
        fp.update(f"{CLASSES[label]}/{sha}\n".encode())
    counters: dict[int, int] = {}
    paths = []
    for label in labels.tolist():
        counters[label] = counters.get(label, -1) + 1
        paths.append(f"synthetic://{CLASSES[label]}/{counters[label]:05d}")
    return ImageSet(
        images=images,
        labels=torch.from_numpy(labels),
        classes=list(CLASSES),
        paths=paths,
        sha256=shas,
        fingerprint=fp.hexdigest()[:16],
        source="decoded" if decoded else "disk-cache",
        decoded=decoded,
    )


def synthetic_cache_file(cache_dir: Path, per_class: int, image_size: int, seed: int) -> Path:
    """One file per (data set, preprocessing): the drawing's seed and size, and the version."""
    name = f"synthetic-v{PREPROCESS_VERSION}-{image_size}px-seed{seed}-{per_class}pc"
    return cache_dir / f"{name}.npy"


_loaded: dict[tuple, ImageSet] = {}  # one decode per process, shared by every multirun job


def load_images(data: DictConfig) -> ImageSet:
    """Load the data set a config names, from memory when this process already has it."""
    if data.kind == "synthetic":
        key: tuple = ("synthetic", data.per_class, data.image_size, data.generator_seed)
    elif data.kind == "folder":
        root = Path(data.root).expanduser().resolve()
        key = ("folder", str(root), data.image_size, _tree_signature(root))
    else:
        raise EquipError(
            f"data.kind={data.kind!r} is not known; use data=synthetic or data=folder."
        )
    if key in _loaded:
        return replace(_loaded[key], source="memory", decoded=0)
    cache = Path(data.cache_dir).expanduser() if data.get("cache_dir") else None
    if data.kind == "synthetic":
        images = load_synthetic(
            data.per_class, data.image_size, data.generator_seed, cache, data.ram_budget_mb
        )
    else:
        images = load_folder(root, data.image_size, cache, data.ram_budget_mb)
    _loaded[key] = images
    return images


def _tree_signature(root: Path) -> tuple:
    """Cheap change detector for the in-memory cache: names, sizes and mtimes of the tree."""
    if not root.is_dir():
        return ()
    return tuple(
        (str(p), st.st_size, st.st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and (st := p.stat())
    )
