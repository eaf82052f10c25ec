"""Which images must stay on one side of a split (`data.group_by`), and why.

Three kinds of tie make a group:
- `bytes`: byte-identical files, in any class (one file can never train one side and test the
  other);
- `name`: files of a class whose names give the same `data.group_pattern` match (one product in
  several colourways);
- `near_duplicate`: photos of a class whose perceptual hashes differ in at most
  `data.near_duplicate_distance` of their 64 bits: the same photo saved by two retailers, at
  another size or quality, or one product in another colour.
Near-duplicates in *different* classes are not tied: they are label conflicts, counted and
listed (the split manifest names each file's conflicting files), for someone to look at.

The hash is a dHash (Krawetz's difference hash; the steps and bit order of `imagehash.dhash`
4.3, so it equals `int(str(imagehash.dhash(img)), 16)`) of the photo on white under its
transparency. It is written here rather than taken from
`imagehash`: it is six lines of Pillow and numpy, and that library is not a dependency of
equip (it would add PyWavelets, for one function); tests pin its bits.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from equip.data._imageset import ImageSet
from equip.errors import EquipError

# Bump when dhash() or the image it hashes (on_white) changes: every cached hash is made again.
HASH_VERSION = 2
REASONS = ("bytes", "name", "near_duplicate")  # the order ties are made, and merges counted in
_PAIRS_PER_BLOCK = 2**22  # hash pairs compared at once: 32 MiB of uint64 XORs


def dhash(img: Image.Image) -> int:
    """64-bit difference hash: greyscale, shrunk to 9x8 (Lanczos), one bit per horizontal
    neighbour pair, set where the right pixel is brighter; row by row, the first bit highest."""
    grey = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    return int.from_bytes(np.packbits(grey[:, 1:] > grey[:, :-1]).tobytes(), "big")


def image_hashes(images: ImageSet) -> np.ndarray:
    """The dHash of every image (uint64): the photos' own, computed when they were decoded,
    or, for a set without them (the drawn set), of the decoded pixels."""
    if images.dhash is not None:
        return images.dhash
    hashes = []
    for start in range(0, len(images.labels), 1024):
        for rows in images.images[start : start + 1024].numpy():
            hashes.append(dhash(Image.fromarray(np.ascontiguousarray(rows.transpose(1, 2, 0)))))
    return np.array(hashes, dtype=np.uint64)


def close_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, j), i < j, of hashes at most `max_distance` bits apart, in row order.
    All pairs, vectorised: a block of rows is XORed with the rows after it and numpy counts the
    bits, so memory stays bounded (a few MiB) whatever the number of images."""
    h = np.asarray(hashes, dtype=np.uint64)
    block = max(1, _PAIRS_PER_BLOCK // max(len(h), 1))
    first, second = [], []
    for start in range(0, len(h), block):
        rows = h[start : start + block]
        near = np.bitwise_count(rows[:, None] ^ h[None, start:]) <= max_distance
        i, j = np.nonzero(np.triu(near, 1))  # j > i: each pair once, no image with itself
        first.append(i + start)
        second.append(j + start)
    if not first:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(first), np.concatenate(second)


@dataclass(frozen=True)
class GroupRule:
    """What ties images (data.group_by), the regex on names (data.group_pattern), and how many
    bits two photos' hashes may differ in to be near-duplicates (data.near_duplicate_distance).
    The default is the grouping equip had before data.group_by: bytes and names."""

    by: frozenset[str] = frozenset({"bytes", "name"})
    pattern: str | None = None
    max_distance: int = 1

    @classmethod
    def of(cls, data: Any) -> GroupRule:
        """The rule a data config asks for."""
        return cls(
            frozenset(str(b) for b in data.group_by),
            data.group_pattern,
            int(data.near_duplicate_distance),
        )


@dataclass(frozen=True)
class Grouping:
    """The groups of a data set and why: what a split keeps together."""

    ids: list[str]  # per image: its group (the sha256 of one of the group's files)
    ties: list[list[str]]  # per image: the kinds of tie it has to others of its group
    merged: dict[str, int]  # per kind of tie: how many groups it merged into others
    conflicts: list[tuple[int, int]]  # near-duplicate pairs (i, j) in two classes
    conflicts_of: dict[int, list[int]] = field(default_factory=dict)  # image -> its conflicts

    def params(self) -> dict[str, int]:
        """What a run records of it (MLflow params)."""
        return {
            "dataset.groups": len(set(self.ids)),
            **{f"dataset.groups_merged_by_{k}": n for k, n in self.merged.items()},
            "dataset.label_conflicts": len(self.conflicts),
        }

    def summary(self) -> str:
        merged = ", ".join(f"{n} by {k}" for k, n in self.merged.items())
        return f"{len(self.ids)} images in {len(set(self.ids))} groups (merged {merged})"


class _Ties:
    """Union-find over image indices that counts the merges each kind of tie makes. Hand-written
    (not scipy's DisjointSet) to keep the ids the grouping had before near-duplicates: a tie
    puts the later image's root under the earlier one's, as it always did."""

    def __init__(self, n: int):
        self.parent = list(range(n))
        self.ties: list[set[str]] = [set() for _ in range(n)]
        self.merged: Counter[str] = Counter()

    def root(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def tie(self, later: int, earlier: int, why: str) -> None:
        if later == earlier:
            return
        self.ties[later].add(why)
        self.ties[earlier].add(why)
        a, b = self.root(later), self.root(earlier)
        if a != b:
            self.parent[a] = b
            self.merged[why] += 1


def _name_regex(rule: GroupRule) -> re.Pattern | None:
    if "name" not in rule.by or not rule.pattern:
        return None
    try:
        return re.compile(rule.pattern)
    except re.error as e:
        raise EquipError(f"data.group_pattern={rule.pattern!r} is not a valid regex: {e}") from None


def group_images(images: ImageSet, rule: GroupRule) -> Grouping:
    """The groups `rule` makes of `images` (ties in REASONS order; see the module's notes)."""
    pattern = _name_regex(rule)
    labels = images.labels.tolist()
    ties = _Ties(len(labels))
    first: dict[str, int] = {}
    for i, (sha, path, label) in enumerate(zip(images.sha256, images.paths, labels, strict=True)):
        keys = [("bytes", sha)] if "bytes" in rule.by else []
        if pattern and (m := pattern.search(Path(path).name)):
            keys.append(("name", f"{label}/{m.group(m.lastindex or 0)}"))
        for why, key in keys:
            ties.tie(i, first.setdefault(key, i), why)
    conflicts: list[tuple[int, int]] = []
    if "near_duplicate" in rule.by:
        for i, j in zip(*close_pairs(image_hashes(images), rule.max_distance), strict=True):
            if labels[i] == labels[j]:
                ties.tie(int(j), int(i), "near_duplicate")
            else:
                conflicts.append((int(i), int(j)))
    roots = [ties.root(i) for i in range(len(labels))]
    # Without bytes ties, two groups may hold copies of one file: the index keeps ids apart.
    ids = [images.sha256[r] if "bytes" in rule.by else f"{images.sha256[r]}#{r}" for r in roots]
    conflicts_of: dict[int, list[int]] = {}
    for i, j in conflicts:
        conflicts_of.setdefault(i, []).append(j)
        conflicts_of.setdefault(j, []).append(i)
    return Grouping(
        ids,
        [[k for k in REASONS if k in t] for t in ties.ties],
        {k: ties.merged[k] for k in REASONS if k in rule.by},
        conflicts,
        conflicts_of,
    )
