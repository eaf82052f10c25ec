"""Issue 17: split groups by what the photos show (data.group_by), not only by their names."""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image, ImageDraw

from equip.data import grouping
from equip.data.grouping import GroupRule, close_pairs, dhash, group_images
from equip.data.images import ImageSet, load_folder, load_images
from equip.data.split import fold_split, split_manifest
from equip.errors import EquipError
from tests.conftest import make_cfg

BY_NAMES = GroupRule()  # bytes and names: the grouping before data.group_by
FOLDER = GroupRule(frozenset({"bytes", "name", "near_duplicate"}))  # data=folder's default


def photo(seed: int, size: int = 64) -> Image.Image:
    """A smooth random 'photo' (6x6 colours blown up): two seeds' dHashes differ in >= 20 bits."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize((size, size), Image.Resampling.BICUBIC)


def grey_disc_black_under_alpha() -> Image.Image:
    """A grey disc on transparency whose hidden RGB is black, like the gear PNGs."""
    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill=(128, 128, 128, 255))
    return img


def write_photos(root: Path) -> None:
    """Two classes of 6 distinct photos, plus: photo 0 again as another shop saved it (smaller,
    JPEG, another name); one photo filed in both classes (PNG and JPEG: other bytes); a PNG
    with black under its transparency."""
    for c, name in enumerate(("axes", "boots")):
        (root / name).mkdir(parents=True)
        for k in range(6):
            photo(10 * c + k).save(root / name / f"{name}{k}.png")
    photo(0).resize((60, 60)).save(root / "axes" / "shop-b.jpg", quality=90)
    photo(99).save(root / "axes" / "twin.png")
    photo(99).save(root / "boots" / "twin-as-boot.jpg", quality=95)
    grey_disc_black_under_alpha().save(root / "boots" / "disc.png")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ImageSet]:
    root = tmp_path_factory.mktemp("grouping") / "photos"
    write_photos(root)
    return root, load_folder(root, 16, None)


def index(images: ImageSet, name: str) -> int:
    return next(i for i, p in enumerate(images.paths) if Path(p).name == name)


# ---------------------------------------------------------------- the hash
def test_dhash_bits_are_pinned():
    ramp = np.tile(np.arange(0, 180, 20, dtype=np.uint8), (8, 1))  # 9x8, brighter to the right
    assert dhash(Image.fromarray(ramp)) == 2**64 - 1
    assert dhash(Image.fromarray(ramp[:, ::-1].copy())) == 0
    one = np.zeros((8, 9), np.uint8)
    one[0, 1] = 255  # only the first pair of the first row gets brighter: the highest bit
    assert dhash(Image.fromarray(one)) == 1 << 63
    assert dhash(photo(0)) == 0xD8D323FCDC242763  # the greyscale and Lanczos shrink, pinned
    assert dhash(photo(0).convert("L")) == dhash(photo(0))


def test_close_pairs_are_every_pair_within_the_distance_in_any_block_size(monkeypatch):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 40, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, 40).astype(np.uint64)
    hashes = np.concatenate([base, base[:20] ^ flips[:20], base[:5]])  # 1 bit off; 0 bits off
    expected = {
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 1
    }
    assert len(expected) >= 25
    for block_pairs in (2**22, 7 * len(hashes), len(hashes)):  # 1 block; 7 rows; 1 row a block
        monkeypatch.setattr(grouping, "_PAIRS_PER_BLOCK", block_pairs)
        i, j = close_pairs(hashes, 1)
        assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected and len(i) == len(expected)


def test_a_transparent_png_is_hashed_on_white(photos):
    _, images = photos
    on_white = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(on_white).ellipse((16, 16, 48, 48), fill=(128, 128, 128))
    hashed = int(images.dhash[index(images, "disc.png")])
    assert hashed == dhash(on_white)
    assert hashed != dhash(grey_disc_black_under_alpha().convert("RGB"))  # the hidden black


def test_hashes_are_cached_with_the_decoded_photos(tmp_path: Path, photos):
    root, fresh = photos
    cache = tmp_path / "cache"
    first = load_folder(root, 16, cache)
    second = load_folder(root, 16, cache)
    assert first.decoded == len(first.labels) and second.decoded == 0  # nothing rehashed
    assert (first.dhash == fresh.dhash).all() and (second.dhash == fresh.dhash).all()
    shutil.rmtree(cache / f"dhash-v{grouping.HASH_VERSION}")  # hashes lost, photos kept
    again = load_folder(root, 16, cache)
    assert again.decoded == len(fresh.labels) and (again.dhash == fresh.dhash).all()


# ---------------------------------------------------------------- the groups
def test_one_photo_from_two_shops_is_one_group_and_stays_on_one_side(photos):
    _, images = photos
    a, b = index(images, "axes0.png"), index(images, "shop-b.jpg")
    by_names, groups = group_images(images, BY_NAMES), group_images(images, FOLDER)
    assert by_names.ids[a] != by_names.ids[b] and groups.ids[a] == groups.ids[b]
    assert groups.ties[a] == groups.ties[b] == ["near_duplicate"]
    assert groups.merged == {"bytes": 0, "name": 0, "near_duplicate": 1}
    for fold in range(3):
        split = fold_split(images, 3, fold, seed=0, rule=FOLDER)
        assert split[a] == split[b]
    far = replace(FOLDER, max_distance=0)  # re-sized and re-encoded: still 0 bits apart here
    assert group_images(images, far).ids[a] == groups.ids[a]


def test_the_same_photo_in_two_classes_is_a_label_conflict_not_a_group(photos):
    _, images = photos
    a, b = index(images, "twin.png"), index(images, "twin-as-boot.jpg")
    groups = group_images(images, FOLDER)
    assert groups.ids[a] != groups.ids[b] and groups.conflicts == [(a, b)]
    assert groups.params() == {
        "dataset.groups": len(images.labels) - 1,
        "dataset.groups_merged_by_bytes": 0,
        "dataset.groups_merged_by_name": 0,
        "dataset.groups_merged_by_near_duplicate": 1,
        "dataset.label_conflicts": 1,
    }
    split = np.full(len(images.labels), "train")
    rows = list(csv.DictReader(io.StringIO(split_manifest(images, split, groups))))
    assert list(rows[0]) == [
        *("path", "sha256", "class", "group", "grouped_by", "label_conflicts", "split")
    ]
    assert (
        rows[a]["label_conflicts"] == images.paths[b]
        and rows[b]["label_conflicts"] == (images.paths[a])
    )
    assert rows[index(images, "shop-b.jpg")]["grouped_by"] == "near_duplicate"
    assert sum(bool(r["label_conflicts"]) for r in rows) == 2


def test_without_bytes_ties_copies_keep_their_own_groups():
    images = load_images(make_cfg("data.per_class=4").data)
    twice = replace(images, sha256=images.sha256 * 2, paths=images.paths * 2)
    twice = replace(twice, labels=images.labels.repeat(2), images=images.images.repeat(2, 1, 1, 1))
    for rule, groups in ((BY_NAMES, 48), (GroupRule(frozenset()), 96)):
        assert len(set(group_images(twice, rule).ids)) == groups
    # The drawn set has no photos' hashes: its pixels are hashed, and no two are alike.
    assert images.dhash is None
    assert len(set(group_images(images, FOLDER).ids)) == len(images.labels)


# ---------------------------------------------------------------- config and records
def test_group_by_is_typed_defaults_by_data_kind_and_checked():
    from equip.config.checks import check_config
    from equip.config.explain import config_errors

    assert make_cfg().data.group_by == ["name", "bytes"]
    folder = make_cfg("data=folder", "data.root=photos", tiny=False).data
    assert folder.group_by == ["name", "bytes", "near_duplicate"]
    assert GroupRule.of(folder) == replace(FOLDER, max_distance=1)
    with pytest.raises(EquipError, match="data.near_duplicate_distance=17 must be in"):
        check_config(make_cfg("data.near_duplicate_distance=17"))
    with pytest.raises(EquipError, match="data.group_by"), config_errors():
        make_cfg("data.group_by=[pixels]")


def test_a_folder_run_records_its_groups_and_matches_only_runs_grouped_alike(store: str, photos):
    from equip.sweep.context import cv_key, folds_key, split_key
    from equip.track import queries, schema
    from equip.train.run import train

    root, _ = photos
    data = ("data=folder", f"data.root={root}", "data.image_size=16", "data.cache_dir=null")
    fast = ("model=baseline", "model.features=[pixels]", "tracking.log_model=false")
    cfg = make_cfg(*data, *fast, tiny=False)
    result = train(cfg)
    client = MlflowClient(store)
    run = client.get_run(result["run_id"])
    p = run.data.params
    assert p["data.group_by"] == "['name', 'bytes', 'near_duplicate']"
    assert p["dataset.groups_merged_by_near_duplicate"] == "1"
    assert p["dataset.label_conflicts"] == "1"
    manifest = client.download_artifacts(run.info.run_id, "data/split.csv", str(root.parent))
    rows = list(csv.DictReader(io.StringIO(Path(manifest).read_text())))
    assert {Path(r["label_conflicts"]).name for r in rows} == {"", "twin.png", "twin-as-boot.jpg"}

    # Another grouping is another split: neither its CV nor its baseline is this run's.
    others = [
        make_cfg(*data, *fast, extra, tiny=False)
        for extra in ("data.near_duplicate_distance=2", "data.group_by=[name,bytes]")
    ]
    assert len({cv_key(c, "fp") for c in (cfg, *others)}) == 3
    assert run.data.tags[schema.SPLIT_KEY] == split_key(cfg)
    assert len({split_key(c) for c in (cfg, *others)}) == 3
    assert len({folds_key(c) for c in (cfg, *others)}) == 3
    fingerprint = run.data.tags[schema.DATA_FINGERPRINT]
    for c, found in ((cfg, [run.info.run_id]), (others[0], []), (others[1], [])):
        where = queries.baseline_runs(fingerprint, split_key(c))
        runs = queries.search_runs(client, [run.info.experiment_id], where)
        assert [r.info.run_id for r in runs] == found
