"""File locks that keep concurrent commands on one store apart (filelock; flock on Linux).

A flock lock belongs to the open file, so the kernel releases it when its process dies: a lock
left by a killed command is never stale on this host. Lock files are kept (deleting one while
another process waits on it would let two processes hold "the same" lock).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from equip.errors import EquipError


@contextlib.contextmanager
def exclusive(path: Path, timeout_s: float, what: str) -> Iterator[None]:
    """Hold `path` locked for the block, waiting up to `timeout_s` for the process that has it."""
    lock = FileLock(str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise EquipError(
            f"{what} has been locked by another command for over {timeout_s:.0f} s ({path}); "
            "wait for it to finish, or end it if it hangs."
        ) from None
    except OSError as e:
        raise EquipError(f"cannot lock {what}: {path} ({e.strerror}).") from None
    try:
        yield
    finally:
        lock.release()


class OwnedLock:
    """A lock held for as long as a command runs (a sweep), which says who holds it: the holder
    writes its pid and host beside the lock file (filelock truncates the lock file itself when
    another process opens it to try)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.owner_file = path.with_name(path.name + ".owner")
        self._lock = FileLock(str(path))

    def try_acquire(self) -> str | None:
        """Take the lock without waiting. None when taken; else who holds it, e.g.
        'pid 4242 on gpu-box'."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return self.holder()
        self.owner_file.write_text(f"{os.getpid()} {socket.gethostname()}\n")
        return None

    def holder(self) -> str:
        try:
            pid, host = self.owner_file.read_text().split()
        except (OSError, ValueError):  # the holder has not written it yet
            return "pid unknown"
        return f"pid {pid} on {host}"

    def release(self) -> None:
        """Owner file first: once the lock is free, the next holder writes its own."""
        if not self._lock.is_locked:
            return
        self.owner_file.unlink(missing_ok=True)
        self._lock.release()
