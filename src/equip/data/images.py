"""Images in, uint8 tensors out: the data set a config names, loaded once per process.

Every file is decoded once: results are kept in memory for the process (a Hydra multirun loads
the data once, not once per job) and on disk keyed by file content and preprocessing settings
(a second run starts from the cache). The pieces are private modules of this package:
preprocessing (`_preprocess`), photo folders (`_folder`), the built-in set (`_builtin`), the
decoded cache on disk (`_imagestore`). The DataModule that serves the images to Lightning is in
equip.data.loaders.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from equip.data._builtin import load_synthetic, synthetic_cache_file
from equip.data._folder import load_folder
from equip.data._imageset import ImageSet
from equip.data._preprocess import PREPROCESS_VERSION, preprocess
from equip.data._scan import IMAGE_SUFFIXES, image_files, scan_folder
from equip.errors import EquipError

__all__ = [
    "IMAGE_SUFFIXES",
    "PREPROCESS_VERSION",
    "ImageSet",
    "image_files",
    "load_folder",
    "load_images",
    "load_synthetic",
    "preprocess",
    "scan_folder",
    "synthetic_cache_file",
]

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
