"""The train/val(/test) split: stratified, seeded, and grouped so near-duplicates stay together
(the groups: equip.data.grouping)."""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from equip.config.checks import check_fractions
from equip.data.grouping import Grouping, GroupRule, group_images
from equip.data.images import ImageSet
from equip.errors import EquipError

BYTES_AND_NAMES = GroupRule()  # the grouping of a split that is given no rule


def split_images(
    images: ImageSet,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    rule: GroupRule = BYTES_AND_NAMES,
) -> np.ndarray:
    """Stratified, seeded split -> array of 'train' | 'val' | 'test' per image.

    Whole groups (`rule`'s) land on one side, so a duplicate or near-duplicate can never leak a
    training image into validation.
    """
    check_fractions(val_fraction, test_fraction)
    group_of = group_images(images, rule).ids
    labels = images.labels.numpy()
    side: dict[str, str] = {}
    for c, name in enumerate(images.classes):
        groups = sorted({group_of[i] for i in np.flatnonzero(labels == c)} - side.keys())
        rng = np.random.default_rng([seed, c])
        rng.shuffle(groups)
        if len(groups) < 2:  # no fraction helps: one side or the other goes without it
            raise EquipError(
                f"class {name!r} has {len(groups)} distinct image(s): a class needs at least 2, "
                "one to train on and one to validate. Add images to it."
            )
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
    images: ImageSet, folds: int, fold: int, seed: int, rule: GroupRule = BYTES_AND_NAMES
) -> np.ndarray:
    """Fold `fold` of a grouped, stratified k-fold -> 'train' | 'val' per image.

    The groups are `rule`'s, as in split_images, so the k validation folds are disjoint, cover
    every image once and never split a group.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    group_of = group_images(images, rule).ids
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
    rule = GroupRule.of(data)
    if data.get("folds"):
        return fold_split(images, data.folds, data.fold, data.split_seed, rule)
    return split_images(images, data.val_fraction, data.test_fraction, data.split_seed, rule)


def split_manifest(images: ImageSet, split: np.ndarray, groups: Grouping) -> str:
    """CSV text, a row per image: path, sha256, class, its group, the kinds of tie that hold
    it there (bytes;name;near_duplicate), the files of other classes it is a near-duplicate of
    (label conflicts), and its split (last, so `row.rsplit(",", 1)` reads it)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "sha256", "class", "group", "grouped_by", "label_conflicts", "split"])
    for i, (path, sha, label, s) in enumerate(
        zip(images.paths, images.sha256, images.labels.tolist(), split, strict=True)
    ):
        conflicts = ";".join(images.paths[j] for j in groups.conflicts_of.get(i, []))
        tied = ";".join(groups.ties[i])
        w.writerow([path, sha, images.classes[label], groups.ids[i], tied, conflicts, s])
    return buf.getvalue()
