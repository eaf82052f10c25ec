"""The photos of a class-per-folder tree: which folders are classes, which files are photos."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from equip.config.resources import check_data_root
from equip.errors import EquipError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
}
NOT_PHOTOS = {"__MACOSX"}  # a zip made on a Mac: resource forks beside the real folders


# ---------------------------------------------------------------- scanning
def _shown(name: str) -> bool:
    """Hidden files and folders (.thumbnails, ._x.jpg, .DS_Store) and __MACOSX are no photos."""
    return not name.startswith(".") and name not in NOT_PHOTOS


def _files_under(folder: Path) -> Iterator[Path]:
    """Every shown file under `folder`, through symlinked folders too (pathlib's rglob does not
    follow them before Python 3.13); a folder reached twice (a symlink loop) is walked once."""
    walked: set[tuple[int, int]] = set()
    for top, folders, names in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in walked:
            folders.clear()
            continue
        walked.add((st.st_dev, st.st_ino))
        folders[:] = [d for d in folders if _shown(d)]
        # A broken or looping symlink is kept: reading it fails, so it is counted as skipped.
        yield from (Path(top) / name for name in names if _shown(name))


def image_files(folder: Path) -> tuple[list[Path], Counter[str]]:
    """(the image files under `folder`, sorted; the other files' count per extension)."""
    images, others = [], Counter()
    for path in _files_under(folder):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            others[path.suffix.lower() or "(no extension)"] += 1
    return sorted(images), others


def scan_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class-per-folder tree -> (class names, [(file, class index)]). Raises on every bad layout."""
    check_data_root(root)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _shown(p.name))
    if not class_dirs:
        raise EquipError(
            f"data.root={root} has no class folders. Put each class's images in its own "
            "sub-folder, e.g. data.root/helmets/*.jpg, data.root/rope/*.jpg."
        )
    files: list[tuple[Path, int]] = []
    empty, others = [], Counter()
    for idx, d in enumerate(class_dirs):
        found, other = image_files(d)
        if not found:
            empty.append(d.name)
        files += [(p, idx) for p in found]
        others += other
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
    if others:
        log.warning(
            "not read under data.root=%s: %d file(s) without an image extension (%s)",
            root,
            sum(others.values()),
            ", ".join(f"{ext} {n}" for ext, n in sorted(others.items())),
        )
    return [d.name for d in class_dirs], files
