"""A class-per-folder tree of photos as an ImageSet, each file decoded once (its scan: _scan).

Each decoded photo, and its perceptual hash (equip.data.grouping), is cached on disk keyed by
its content (the photo also by the preprocessing settings), so a second run decodes and hashes
nothing; with a cache, the whole decoded set also becomes one `.npy` (equip.data._imagestore),
read into RAM or streamed. Both carry a checksum of their pixels: an entry that fails it is
named in a warning and built again (the photo decoded, the set rewritten from the photos' rows).
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from equip.config.checks import check_decoded_size
from equip.data import _imagestore
from equip.data._imageset import ImageSet
from equip.data._imagestore import DiskImages
from equip.data._preprocess import PREPROCESS_VERSION, on_white, preprocess_on_white
from equip.data._scan import scan_folder
from equip.data.grouping import HASH_VERSION, dhash
from equip.errors import EquipError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- one file
class _Unreadable(Exception):
    """A file that is skipped; the message says why."""


def _cache_file(cache_dir: Path, sha: str, size: int) -> Path:
    return cache_dir / f"v{PREPROCESS_VERSION}-{size}px" / sha[:2] / f"{sha}.npy"


def _hash_file(cache_dir: Path, sha: str) -> Path:
    """The photo's dHash, 8 bytes stored as a uint8 array with its CRC-32 like a decoded image."""
    return cache_dir / f"dhash-v{HASH_VERSION}" / sha[:2] / f"{sha}.npy"


def _decode(raw: bytes, size: int) -> tuple[np.ndarray, int]:
    """(preprocessed image, dHash of the photo on white); hashing it here costs no second
    decode (about 0.6 ms a photo, bench/grouping.py)."""
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            seen = on_white(img)
            return preprocess_on_white(seen, size), dhash(seen)
    except UnidentifiedImageError:
        raise _Unreadable("not a readable image (unknown or corrupt format)") from None
    except Exception as e:  # PIL raises many types for truncated/damaged files
        raise _Unreadable(f"{type(e).__name__}: {e}") from None


class _Read(NamedTuple):
    image: np.ndarray  # preprocessed
    sha256: str  # of the file
    dhash: int  # of the photo on white
    decoded: bool  # rather than read from the cache


def _read_image(path: Path, size: int, cache_dir: Path | None) -> _Read:
    """One photo, from the cache when it has both the image and the hash. Raises _Unreadable."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _Unreadable(f"unreadable: {e.strerror or e}") from None
    sha = hashlib.sha256(raw).hexdigest()
    if cache_dir is None:
        image, h = _decode(raw, size)
        return _Read(image, sha, h, True)
    cached, hashed = _cache_file(cache_dir, sha, size), _hash_file(cache_dir, sha)
    # An entry that is absent, of another size or damaged (its checksum fails) is made again.
    arr = _imagestore.read_image(cached, (3, size, size))
    code = _imagestore.read_image(hashed, (8,))
    if arr is not None and code is not None:
        return _Read(arr, sha, int.from_bytes(code.tobytes(), "big"), False)
    image, h = _decode(raw, size)
    if arr is None:
        _imagestore.write_image(cached, image)
    if code is None:
        _imagestore.write_image(hashed, np.frombuffer(h.to_bytes(8, "big"), np.uint8))
    return _Read(image, sha, h, True)


# ---------------------------------------------------------------- the whole tree
@dataclass
class _Loaded:
    """What the readable files gave, in file order (their images went to a sink)."""

    labels: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    shas: list[str] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    decoded: int = 0

    def fingerprint(self, classes: list[str], size: int) -> str:
        """The data set's identity: which photos (by content) in which class, whatever their
        names and order; runs and baselines are compared by it."""
        fp = hashlib.sha256(f"folder v{PREPROCESS_VERSION} {size}px\n".encode())
        for sha, label in sorted(zip(self.shas, self.labels, strict=True)):
            fp.update(f"{classes[label]}/{sha}\n".encode())
        return fp.hexdigest()[:16]

    def rows_key(self, size: int) -> str:
        """The decoded set's cache key: its photos in row (file) order. Not the fingerprint: a
        rename keeps that but reorders the rows, and the rows must follow the files."""
        key = hashlib.sha256(f"folder rows v{PREPROCESS_VERSION} {size}px\n".encode())
        key.update("\n".join(self.shas).encode())
        return key.hexdigest()[:16]


def _load_files(
    root: Path,
    classes: list[str],
    files: list[tuple[Path, int]],
    size: int,
    cache_dir: Path | None,
    sink: Callable[[np.ndarray], object],
) -> _Loaded:
    """Read every file, passing each image to `sink`; unreadable files are logged and skipped,
    and a class (or the whole tree) with none readable is an error."""
    got = _Loaded()
    for path, label in files:
        try:
            read = _read_image(path, size, cache_dir)
        except _Unreadable as why:
            got.skipped.append((str(path), str(why)))
            continue
        sink(read.image)
        got.labels.append(label)
        got.paths.append(str(path))
        got.shas.append(read.sha256)
        got.hashes.append(read.dhash)
        got.decoded += read.decoded
    if got.skipped:
        log.warning(
            "skipped %d unreadable image(s): %s",
            len(got.skipped),
            "; ".join(f"{p} ({why})" for p, why in got.skipped),
        )
    if not got.labels:
        raise EquipError(
            f"no readable image under data.root={root}; every file failed to decode:\n"
            + "\n".join(f"  {p}: {why}" for p, why in got.skipped)
        )
    unread = sorted(set(classes) - {classes[label] for label in got.labels})
    if unread:
        raise EquipError(
            f"class folder(s) under data.root={root} with no readable image: "
            f"{', '.join(unread)} (every file failed to decode; the warning above names them). "
            "Replace the files or remove the folder."
        )
    return got


def load_folder(
    root: Path, image_size: int, cache_dir: Path | None, ram_budget_mb: float = float("inf")
) -> ImageSet:
    """Decode (or read from the per-file cache) every photo. With a cache, the decoded set also
    becomes one .npy, written while decoding: up to `ram_budget_mb` it is read into RAM, larger
    sets are streamed from it; without a cache the photos are stacked in RAM."""
    classes, files = scan_folder(root)
    check_decoded_size(len(files), image_size, str(cache_dir) if cache_dir else None, "data.root")
    images: torch.Tensor | DiskImages
    if cache_dir is None:
        arrays: list[np.ndarray] = []
        got = _load_files(root, classes, files, image_size, None, arrays.append)
        fingerprint = got.fingerprint(classes, image_size)
        images = torch.from_numpy(np.stack(arrays))
    else:  # decoded rows go to disk as they come, not into a list
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir, prefix=".folder-rows.") as rows:
            got = _load_files(
                root, classes, files, image_size, cache_dir, lambda a: rows.write(a.tobytes())
            )
            fingerprint = got.fingerprint(classes, image_size)
            key = got.rows_key(image_size)
            path = cache_dir / f"folder-v{PREPROCESS_VERSION}-{image_size}px-{key}.npy"
            images = _rows_to_store(rows, path, len(got.labels), image_size, ram_budget_mb)
    return ImageSet(
        images=images,
        labels=torch.tensor(got.labels, dtype=torch.int64),
        classes=classes,
        paths=got.paths,
        sha256=got.shas,
        fingerprint=fingerprint,
        skipped=got.skipped,
        source="decoded" if got.decoded else "disk-cache",
        decoded=got.decoded,
        dhash=np.array(got.hashes, dtype=np.uint64),
    )


def _rows_to_store(
    rows: IO[bytes], path: Path, n: int, size: int, ram_budget_mb: float
) -> torch.Tensor | DiskImages:
    """This data set's cached .npy at `path`, in RAM when it fits `ram_budget_mb`, else
    streamed; written from the decoded rows (a temp file) unless an intact one is there."""
    cached = _imagestore.open_cached(path, ram_budget_mb)
    if cached is None:
        row = 3 * size * size

        def read_back():
            rows.seek(0)
            for _ in range(n):
                yield np.frombuffer(rows.read(row), dtype=np.uint8)

        _imagestore.write(path, (n, 3, size, size), read_back(), dict)
        cached = _imagestore.open_cached(path, ram_budget_mb)
    if cached is None:
        raise EquipError(f"{path} does not read back as written; check the disk it is on")
    return cached[0]
