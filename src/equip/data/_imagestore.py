"""The decoded cache on disk: a data set as a uint8 (N, 3, S, S) `.npy` file read by index, and
single decoded images (the per-photo cache of equip.data._folder) as small `.npy` files.

A set is written image by image (never the whole array in RAM), into a temporary file renamed
into place at the end, so a killed writer leaves nothing that is trusted. It is read with
positional reads rather than a memory map: a map counts every page it touched in the process's
RSS until the kernel needs the memory back, while pread leaves the pages in the OS page cache,
shared by every job and rank, and the process's RSS stays bounded however large the file is.
The file is an ordinary `.npy`: `np.load(path, mmap_mode="r")` opens it too.

Every entry carries a CRC-32 of its pixels, computed while it is written and checked when it is
opened: a set's in its JSON metadata, a single image's in the 4 bytes after its array (np.load
ignores them). An entry that fails the check is named in one warning line and treated as absent,
so the caller builds it again: a run never trains on pixels its data fingerprint does not
describe. CRC-32 because it is the fastest check the standard library has (zlib: 4.2 GB/s on the
dev machine, sha1 1.9, blake2b 0.9; bench/cache_integrity.py), and random damage slips through
it with probability 2**-32. A streamed set is hashed once, when a process opens it, rather than
row by row as it is read: per-row sums would cost a hash of every row every epoch, and could
only stop a run midway, not rebuild the entry before it starts.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equip.errors import EquipError

log = logging.getLogger(__name__)

CHECKSUM_KEY = "pixels_crc32"  # in a set's metadata: CRC-32 of all its pixel bytes, in order
_CHUNK = 8 * 2**20  # bytes hashed per read when a streamed set is verified


def _identity(fd: int) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or written to: device, inode, size, mtime."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class DiskImages:
    """uint8 images in a `.npy` file; `store[idx]` reads those rows into a tensor.

    Once `verify` has checked the file, each process that opens it again (DataLoader workers,
    spawned or forked) compares the file's identity with the verified one and hashes it again
    only when it differs: the rows it reads are those that were checked."""

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
        self.crc32: int | None = None  # of the pixels, once verified
        self._verified: tuple[int, int, int, int] | None = None  # identity of the verified file
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.row * len(self)

    def verify(self, crc32: int) -> bool:
        """Whether the file's pixels have this CRC-32 (read in chunks). The descriptor that read
        them serves this process's rows from now on."""
        fd = os.open(self.path, os.O_RDONLY)
        if self._crc32_of(fd) != crc32:
            os.close(fd)
            return False
        self.close()
        self.crc32, self._verified = crc32, _identity(fd)
        self._fd, self._pid = fd, os.getpid()
        return True

    def _crc32_of(self, fd: int) -> int:
        crc, buf = 0, bytearray(min(_CHUNK, max(self.nbytes, 1)))
        for start in range(0, self.nbytes, len(buf)):
            view = memoryview(buf)[: min(len(buf), self.nbytes - start)]
            self._pread_into(fd, view, self.offset + start)
            crc = zlib.crc32(view, crc)
        return crc

    def _file(self) -> int:
        if self._pid != os.getpid():  # one descriptor per process (DataLoader workers fork)
            fd = os.open(self.path, os.O_RDONLY)
            if self.crc32 is not None and _identity(fd) != self._verified:
                try:  # not the file that was verified (replaced or written since): check it
                    same = self._crc32_of(fd) == self.crc32
                except OSError:
                    same = False
                if not same:
                    os.close(fd)
                    raise EquipError(
                        f"{self.path} changed during the run and its pixels no longer match "
                        "their checksum; run again to rebuild it"
                    )
            self._fd, self._pid = fd, os.getpid()
        assert self._fd is not None
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = None, -1

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
        self._pread_into(fd, memoryview(out).cast("B"), self.offset + first_row * self.row)

    def _pread_into(self, fd: int, view: memoryview, at: int) -> None:
        done = 0
        while done < len(view):  # pread may return less than asked
            n = os.preadv(fd, [view[done:]], at + done)
            if n <= 0:
                raise OSError(f"{self.path}: truncated at byte {at + done}")
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
    all written, so it may describe them) beside it as JSON, with the pixels' CRC-32.

    The .npy is renamed into place last: its presence means both files are complete.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    meta_tmp = tmp.with_suffix(".json.tmp")
    try:
        with open(tmp, "wb") as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
            n, crc = 0, 0
            for im in images:
                row = np.ascontiguousarray(im, dtype=np.uint8)
                f.write(row.data)
                crc = zlib.crc32(row, crc)
                n += 1
            if n != shape[0]:
                raise ValueError(f"wrote {n} images, expected {shape[0]}")
            f.flush()
            os.fsync(f.fileno())
        meta_tmp.write_text(json.dumps({**meta(), "images": n, CHECKSUM_KEY: crc}))
        os.replace(meta_tmp, meta_path(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)


def meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def open_cached(
    path: Path, ram_budget_mb: float = 0, verify: bool = True
) -> tuple[torch.Tensor | DiskImages, dict[str, Any]] | None:
    """The cached set at `path` and its metadata: read into RAM when it fits `ram_budget_mb`
    (fastest to train on), else a store that streams it. The pixels are checked against their
    CRC-32 (`verify=False` only to measure what the check costs). None when the set is absent,
    or damaged (one warning line names the file): the caller builds it again."""
    if not path.exists():
        return None
    try:
        store = DiskImages(path)
        meta = json.loads(meta_path(path).read_text())
    except (OSError, ValueError) as e:
        return _damaged(path, f"unreadable ({e})")
    if path.stat().st_size != store.offset + store.nbytes or meta.get("images") != len(store):
        return _damaged(path, "truncated, or not the size its header says")
    crc = meta.get(CHECKSUM_KEY)
    if not isinstance(crc, int):  # not damage: the first run after an upgrade
        log.info("cache entry %s has no pixel checksum (an older equip's); building it again", path)
        return None
    images: torch.Tensor | DiskImages = store
    try:
        if store.nbytes <= ram_budget_mb * 2**20:
            images = store.load()
            store.close()
            intact = not verify or zlib.crc32(images.numpy()) == crc
        else:
            intact = not verify or store.verify(crc)
    except OSError as e:
        return _damaged(path, f"unreadable ({e})")
    if not intact:
        return _damaged(path, "pixels do not match their checksum")
    return images, meta


def _damaged(path: Path, why: str) -> None:
    log.warning("damaged cache entry %s: %s; building it again", path, why)
    return None


# ---------------------------------------------------------------- single images
def write_image(path: Path, image: np.ndarray) -> None:
    """One uint8 image as a .npy followed by its pixels' CRC-32 (4 bytes, little-endian),
    written to a temporary file renamed into place: parallel jobs never read half a file."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        header = {"descr": "|u1", "fortran_order": False, "shape": image.shape}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(image.data)
        f.write(zlib.crc32(image).to_bytes(4, "little"))
    os.replace(tmp, path)


def read_image(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The image cached at `path` if it has this shape and its pixels match their CRC-32; None
    when it is absent, of another shape or written without a checksum (an older equip's), or
    damaged (one warning line names the file): the caller decodes it again."""
    try:
        buf = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        return _damaged(path, f"unreadable ({e})")
    head = io.BytesIO(buf)
    try:
        if np.lib.format.read_magic(head) != (1, 0):
            return None  # not written by equip: decoded again and overwritten
        found, fortran, dtype = np.lib.format.read_array_header_1_0(head)
    except ValueError as e:
        return _damaged(path, f"unreadable ({e})")
    pixels = int(np.prod(shape))
    start = head.tell()
    if (found, fortran, dtype) != (shape, False, np.uint8):
        return None  # another size's or a foreign entry: decoded again and overwritten
    if len(buf) == start + pixels:
        return None  # no checksum: written by an older equip; decoded again
    if len(buf) != start + pixels + 4:
        return _damaged(path, "truncated, or not the size its header says")
    data = memoryview(buf)[start : start + pixels]
    if zlib.crc32(data) != int.from_bytes(buf[start + pixels :], "little"):
        return _damaged(path, "pixels do not match their checksum")
    return np.frombuffer(bytearray(data), dtype=np.uint8).reshape(shape)
