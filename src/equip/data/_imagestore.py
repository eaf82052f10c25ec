"""The decoded cache of one data set on disk: a uint8 (N, 3, S, S) `.npy` file, read by index.

Written image by image (never the whole array in RAM), into a temporary file renamed into place
at the end, so a killed writer leaves nothing that is trusted. Read with positional reads rather
than a memory map: a map counts every page it touched in the process's RSS until the kernel
needs the memory back, while pread leaves the pages in the OS page cache, shared by every job
and rank, and the process's RSS stays bounded however large the file is. The file is an
ordinary `.npy`: `np.load(path, mmap_mode="r")` opens it too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch


class DiskImages:
    """uint8 images in a `.npy` file; `store[idx]` reads those rows into a tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version != (1, 0):
                raise ValueError(f"{path}: .npy version {version}, expected 1.0")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            self.offset = f.tell()
        if fortran or dtype != np.uint8 or len(shape) != 4:
            raise ValueError(f"{path}: not a C-ordered uint8 (N, 3, S, S) array")
        self.shape: tuple[int, ...] = tuple(shape)
        self.row = int(np.prod(shape[1:]))
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.row * len(self)

    def _file(self) -> int:
        if self._pid != os.getpid():  # one descriptor per process (DataLoader workers fork)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        assert self._fd is not None
        return self._fd

    def __getstate__(self) -> dict[str, Any]:  # spawned workers open their own descriptor
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __getitem__(self, idx: Any) -> torch.Tensor:
        if isinstance(idx, slice):
            idx = range(*idx.indices(len(self)))
        rows = np.asarray(idx, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        fd = self._file()
        if len(rows) and (rows[-1] - rows[0] == len(rows) - 1) and (np.diff(rows) == 1).all():
            self._read(fd, out, int(rows[0]))  # consecutive rows: one read
        else:
            for k, i in enumerate(rows):
                self._read(fd, out[k], int(i))
        return torch.from_numpy(out)

    def _read(self, fd: int, out: np.ndarray, first_row: int) -> None:
        if not 0 <= first_row < len(self):
            raise IndexError(f"row {first_row} of {len(self)}")
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):  # pread may return less than asked
            n = os.preadv(fd, [view[done:]], self.offset + first_row * self.row + done)
            if n <= 0:
                raise OSError(f"{self.path}: truncated at row {first_row}")
            done += n

    def load(self) -> torch.Tensor:
        """The whole array in RAM (for data that fits the RAM budget: fastest to train on)."""
        return self[slice(None)]


def write(
    path: Path,
    shape: tuple[int, ...],
    images: Iterable[np.ndarray],
    meta: Callable[[], dict[str, Any]],
) -> None:
    """Write `images` (each uint8 of shape[1:]) as one .npy, and `meta()` (called once they are
    all written, so it may describe them) beside it as JSON.

    The .npy is renamed into place last: its presence means both files are complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    meta_tmp = tmp.with_suffix(".json.tmp")
    try:
        with open(tmp, "wb") as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
            n = 0
            for im in images:
                f.write(np.ascontiguousarray(im, dtype=np.uint8).data)
                n += 1
            if n != shape[0]:
                raise ValueError(f"wrote {n} images, expected {shape[0]}")
            f.flush()
            os.fsync(f.fileno())
        meta_tmp.write_text(json.dumps({**meta(), "images": n}))
        os.replace(meta_tmp, meta_path(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)


def meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def open_cached(path: Path) -> tuple[DiskImages, dict[str, Any]] | None:
    """The cached set at `path` with its metadata, or None when it is absent or unusable."""
    try:
        store = DiskImages(path)
        meta = json.loads(meta_path(path).read_text())
    except (OSError, ValueError):
        return None
    expected = store.offset + store.nbytes
    if path.stat().st_size != expected or meta.get("images") != len(store):
        return None
    return store, meta
