"""What grouping a photo folder by what it shows costs, and what it changes (issue 17).

Loads the folder (default: the shared gear photos) into an empty cache, as a first run does,
timing the load and, apart, the dHash of every photo on white (the part grouping adds to a
decode); loads it again warm (hashes read back with the decoded photos, nothing hashed); times
the grouping itself (all-pairs Hamming distances and the ties). Then prints, for the
experiment=gear rule (data.group_pattern '^(\\d+)[x_]'): the groups by names and bytes against
the groups with near-duplicates, the merges by kind, the label conflicts; and, for each
distance 0-4, the near pairs within a class and across classes, and how many same-class pairs
the grouping by names and bytes had left in different groups (docs/cross-validation.md uses it
to choose data.near_duplicate_distance).

    python bench/grouping.py [--root PATH] [--image-size 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
GEAR = os.environ.get("EQUIP_GEAR_IMAGES") or ROOT.parent / "shared" / "data" / "gear_images"
GEAR_PATTERN = r"^(\d+)[x_]"


def hash_seconds(paths: list[str]) -> float:
    """Seconds dhash() takes over every photo, each opened and put on white beforehand."""
    from equip.data._preprocess import on_white
    from equip.data.grouping import dhash

    total = 0.0
    for path in paths:
        with Image.open(path) as img:
            img.load()
            seen = on_white(img)
        t0 = time.perf_counter()
        dhash(seen)
        total += time.perf_counter() - t0
    return total


def main() -> None:
    from equip.data.grouping import GroupRule, close_pairs, group_images
    from equip.data.images import load_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(GEAR))
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        images = load_folder(args.root, args.image_size, Path(cache))
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm_set = load_folder(args.root, args.image_size, Path(cache))
        warm = time.perf_counter() - t0
    n = len(images.labels)
    hashing = hash_seconds(images.paths)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{n} photos in {args.root}, {args.image_size} px; {os.cpu_count()} cores, load {load}")
    print(f"cold load (decode, hash, cache): {cold:.2f} s, of which dHash {hashing:.2f} s")
    print(f"warm load: {warm:.2f} s, {warm_set.decoded} photos decoded or hashed")

    rule = GroupRule(frozenset({"bytes", "name", "near_duplicate"}), GEAR_PATTERN, 1)
    t0 = time.perf_counter()
    groups = group_images(images, rule)
    print(f"grouping (all {n * (n - 1) // 2:,} pairs): {time.perf_counter() - t0:.3f} s")
    by_names = group_images(images, replace(rule, by=frozenset({"bytes", "name"})))
    print(f"by names and bytes: {by_names.summary()}")
    print(f"with near-duplicates (<= 1 bit): {groups.summary()}")
    print(f"label conflicts: {len(groups.conflicts)}")
    for i, j in groups.conflicts:
        print(f"  {images.paths[i]} ~ {images.paths[j]}")

    first, second = close_pairs(images.dhash, 4)
    distance = np.bitwise_count(images.dhash[first] ^ images.dhash[second])
    labels = images.labels.numpy()
    same = labels[first] == labels[second]
    apart = np.array(
        [by_names.ids[i] != by_names.ids[j] for i, j in zip(first, second, strict=True)]
    )
    print("bits  same-class pairs  (in different groups by names)  cross-class pairs")
    for d in range(5):
        at = distance == d
        counts = ((at & same).sum(), (at & same & apart).sum(), (at & ~same).sum())
        print(f"{d:>4}  {counts[0]:>16}  {counts[1]:>31}  {counts[2]:>17}")
    within = (distance <= 1) & same
    together = sum(
        groups.ids[i] == groups.ids[j] for i, j in zip(first[within], second[within], strict=True)
    )
    print(
        f"same-class pairs <= 1 bit apart in different groups: by names {(within & apart).sum()}, "
        f"with near-duplicates {within.sum() - together}"
    )


if __name__ == "__main__":
    main()
