"""The train/val(/test) split: stratified, seeded, and grouped so near-duplicates stay together."""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

import numpy as np

from equip.config.checks import check_fractions
from equip.data.images import ImageSet
from equip.errors import EquipError


def split_groups(images: ImageSet, group_pattern: str | None) -> list[str]:
    """A group id per image: byte-identical files share one, and so do files of a class whose
    names give the same `group_pattern` match (e.g. one product in several colourways)."""
    parent = list(range(len(images.sha256)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    pattern = re.compile(group_pattern) if group_pattern else None
    for i, (sha, path, label) in enumerate(
        zip(images.sha256, images.paths, images.labels.tolist(), strict=True)
    ):
        keys = [sha]
        if pattern and (m := pattern.search(Path(path).name)):
            keys.append(f"{label}/{m.group(m.lastindex or 0)}")
        for key in keys:
            parent[find(i)] = find(first.setdefault(key, i))
    return [images.sha256[find(i)] for i in range(len(parent))]


def _checked_groups(images: ImageSet, group_pattern: str | None) -> list[str]:
    """split_groups, with a bad data.group_pattern named in one line."""
    try:
        return split_groups(images, group_pattern)
    except re.error as e:
        raise EquipError(
            f"data.group_pattern={group_pattern!r} is not a valid regex: {e}"
        ) from None


def split_images(
    images: ImageSet,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    group_pattern: str | None = None,
) -> np.ndarray:
    """Stratified, seeded split -> array of 'train' | 'val' | 'test' per image.

    Whole groups (see split_groups) land on one side, so a duplicate or near-duplicate can never
    leak a training image into validation.
    """
    check_fractions(val_fraction, test_fraction)
    group_of = _checked_groups(images, group_pattern)
    labels = images.labels.numpy()
    side: dict[str, str] = {}
    for c, name in enumerate(images.classes):
        groups = sorted({group_of[i] for i in np.flatnonzero(labels == c)} - side.keys())
        rng = np.random.default_rng([seed, c])
        rng.shuffle(groups)
        n_val = math.floor(len(groups) * val_fraction + 0.5)  # round half up, not to even
        n_test = math.floor(len(groups) * test_fraction + 0.5)
        if n_val < 1:
            raise EquipError(
                f"data.val_fraction={val_fraction} leaves class {name!r} ({len(groups)} distinct "
                f"images) with no validation image. Raise data.val_fraction to at least "
                f"{math.ceil(50 / max(len(groups), 1)) / 100:.2f} or add images to that class."
            )
        if test_fraction > 0 and n_test < 1:
            raise EquipError(
                f"data.test_fraction={test_fraction} leaves class {name!r} with no test image; "
                "raise it or set data.test_fraction=0."
            )
        if len(groups) - n_val - n_test < 1:
            raise EquipError(
                f"class {name!r} has {len(groups)} distinct image(s): none left for training "
                f"with val_fraction={val_fraction}, test_fraction={test_fraction}. Add images."
            )
        for i, g in enumerate(groups):
            side[g] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return np.array([side[g] for g in group_of])


def fold_split(
    images: ImageSet, folds: int, fold: int, seed: int, group_pattern: str | None = None
) -> np.ndarray:
    """Fold `fold` of a grouped, stratified k-fold -> 'train' | 'val' per image.

    The groups are split_images' (duplicates and data.group_pattern matches stay together), so
    the k validation folds are disjoint, cover every image once and never split a group.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    group_of = _checked_groups(images, group_pattern)
    labels = images.labels.numpy()
    for c, name in enumerate(images.classes):
        n = len({group_of[i] for i in np.flatnonzero(labels == c)})
        if n < folds:
            raise EquipError(
                f"data.folds={folds}: class {name!r} has only {n} distinct image group(s), so "
                f"some fold would have none of it. Use data.folds={max(n, 2)} or fewer."
            )
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    _, val_idx = list(cv.split(np.zeros(len(labels)), labels, group_of))[fold]
    split = np.full(len(labels), "train", dtype=object)
    split[val_idx] = "val"
    return split.astype(str)


def split_for(images: ImageSet, data) -> np.ndarray:
    """The split a data config asks for: fold `data.fold` of `data.folds`, or the hold-out."""
    if data.get("folds"):
        return fold_split(images, data.folds, data.fold, data.split_seed, data.group_pattern)
    return split_images(
        images, data.val_fraction, data.test_fraction, data.split_seed, data.group_pattern
    )


def split_manifest(images: ImageSet, split: np.ndarray) -> str:
    """CSV text: path, sha256, class, split: what a run trained and validated on."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "sha256", "class", "split"])
    for path, sha, label, s in zip(
        images.paths, images.sha256, images.labels.tolist(), split, strict=True
    ):
        w.writerow([path, sha, images.classes[label], s])
    return buf.getvalue()
