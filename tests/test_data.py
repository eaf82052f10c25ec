from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from equip.data.grouping import GroupRule, close_pairs, group_images
from equip.data.images import load_folder, load_images, preprocess, scan_folder
from equip.data.split import split_images
from equip.errors import EquipError
from tests.conftest import GEAR, make_cfg


def rgba_black_under_alpha(size=(40, 20)) -> Image.Image:
    """Like the gear PNGs: the transparent pixels hold black RGB."""
    a = np.zeros((size[1], size[0], 4), np.uint8)
    a[5:15, 10:30] = (200, 30, 30, 255)  # opaque red object; the rest is (0, 0, 0, 0)
    return Image.fromarray(a, "RGBA")


def test_transparency_becomes_white_and_aspect_is_kept_with_white_padding():
    out = preprocess(rgba_black_under_alpha(), 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8
    assert (out[:, 0, :] == 255).all()  # padding rows above a 40x20 image: white
    assert (out[:, 16, 0] == 255).all()  # transparent area inside the image: white, not black
    assert out[1, 16, 16] < 60 and out[2, 16, 16] < 60  # the red object survives (stretched)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_a_png_colour_key_transparency_becomes_white(mode: str, tmp_path: Path):
    """PNG optimisers (optipng, oxipng) store on/off alpha as a tRNS colour key on an L or
    RGB image, not as an alpha channel: the keyed pixels are transparent all the same."""
    rgb = np.asarray(rgba_black_under_alpha())[..., :3]
    img = Image.fromarray(rgb, "RGB").convert(mode)
    key = 0 if mode == "L" else (0, 0, 0)
    img.save(tmp_path / "keyed.png", transparency=key)
    with Image.open(tmp_path / "keyed.png") as saved:
        assert saved.mode == mode and saved.info["transparency"] == key  # as optimisers write it
        out = preprocess(saved, 32)
    assert (out[:, 16, 0] == 255).all()  # the keyed background: white, not black
    assert out[:, 16, 16].min() < 100  # the object is not keyed out


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "LA", "I;16", "RGB"])
def test_every_pixel_format_becomes_3_channel_uint8(mode: str):
    base = Image.fromarray(np.tile(np.linspace(20, 220, 24, dtype=np.uint8), (24, 1)), "L")
    img = (
        base.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(base, np.uint16) * 257)
    )
    out = preprocess(img, 16)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    assert out.min() < 30 and out.max() > 225  # contrast stretched across the full range


def test_contrast_stretch_spans_full_range_per_channel():
    a = np.full((10, 10, 3), 100, np.uint8)
    a[:5] = 140
    out = preprocess(Image.fromarray(a), 10)
    assert out.min() == 0 and out.max() == 255


def write_tree(root: Path) -> None:
    """Two classes in every format we claim to read, plus a corrupt and a truncated file."""
    (root / "helmets").mkdir(parents=True)
    (root / "rope").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        arr = rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "helmets" / f"h{i}.jpg")
        Image.fromarray(arr[:, :, 0]).save(root / "rope" / f"grey{i}.png")
    rgba_black_under_alpha().save(root / "helmets" / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(
        root / "helmets" / "cmyk.jpg"
    )
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(
        root / "rope" / "deep.png"
    )
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
        root / "rope" / "w.webp"
    )
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "rope" / "b.bmp")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).convert("P").save(
        root / "rope" / "pal.png"
    )
    (root / "rope" / "corrupt.jpg").write_bytes(b"not an image at all")
    good = (root / "helmets" / "h0.jpg").read_bytes()
    (root / "helmets" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "rope" / "notes.txt").write_text("ignored: not an image")


def test_folder_reads_formats_skips_corrupt_files_and_caches_on_disk(tmp_path: Path, caplog):
    write_tree(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING):
        first = load_folder(tmp_path / "imgs", 16, tmp_path / "cache")
    assert first.classes == ["helmets", "rope"]
    skipped = {Path(p).name for p, _ in first.skipped}
    assert skipped == {"corrupt.jpg", "truncated.jpg"}
    assert len(first.labels) == 14
    assert "corrupt.jpg" in caplog.text
    assert first.source == "decoded" and first.decoded == len(first.labels)

    second = load_folder(tmp_path / "imgs", 16, tmp_path / "cache")
    assert second.source == "disk-cache" and second.decoded == 0
    assert second.fingerprint == first.fingerprint
    assert (second.images == first.images).all()

    other_size = load_folder(tmp_path / "imgs", 24, tmp_path / "cache")
    assert other_size.decoded > 0 and other_size.fingerprint != first.fingerprint


def test_nothing_readable_fails_with_the_list_of_files(tmp_path: Path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(EquipError, match=r"no readable image(.|\n)*a/x\.png(.|\n)*b/x\.png"):
        load_folder(tmp_path, 16, None)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "has no class folders"),
        ({"a": 1, "b": 0}, "class folder.*with no images.*: b"),
        ({"only": 2}, "only 1 class folder"),
    ],
)
def test_bad_folder_layouts_are_named(tmp_path: Path, layout: dict, message: str):
    for name, n in layout.items():
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / name / f"{i}.png")
    with pytest.raises(EquipError, match=message):
        scan_folder(tmp_path)


def test_a_tree_as_users_keep_it_is_read_as_they_expect(tmp_path: Path, caplog):
    """Symlinked folders are followed (a loop walked once); hidden files and folders, and a
    Mac zip's __MACOSX, are no photos; other files are counted in one warning."""
    root, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    for folder in (
        root / "a",
        root / "b",
        elsewhere,
        root / "a" / ".thumbnails",
        root / "__MACOSX" / "a",
    ):
        folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8), "red").save(root / "a" / f"{i}.png")
        Image.new("RGB", (8, 8), "blue").save(root / "b" / f"{i}.jpg")
        Image.new("RGB", (8, 8), "green").save(elsewhere / f"{i}.png")
    Image.new("RGB", (8, 8)).save(root / "b" / "2.jfif", format="JPEG")
    (root / "a" / "more").symlink_to(elsewhere)  # more photos of class a, kept elsewhere
    (root / "a" / "loop").symlink_to(root / "a")  # a folder that holds itself
    for hidden in (root / "a" / ".thumbnails" / "0.png", root / "a" / "._0.png"):
        hidden.write_bytes((root / "a" / "0.png").read_bytes())
    (root / "__MACOSX" / "a" / "._0.png").write_bytes(b"resource fork")
    (root / "b" / "IMG_1.HEIC").write_bytes(b"a HEIC photo")
    (root / "b" / "notes.txt").write_text("not a photo")
    with caplog.at_level(logging.WARNING):
        classes, files = scan_folder(root)
    assert classes == ["a", "b"]
    relative = sorted(str(p.relative_to(root)) for p, _ in files)
    assert relative == [
        "a/0.png",
        "a/1.png",
        "a/more/0.png",
        "a/more/1.png",
        "b/0.jpg",
        "b/1.jpg",
        "b/2.jfif",
    ]
    [line] = [r.getMessage() for r in caplog.records]
    assert line == (
        f"not read under data.root={root}: 2 file(s) without an image extension (.heic 1, .txt 1)"
    )


def test_a_class_with_no_readable_photo_is_named_with_its_fix(tmp_path: Path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "a" / f"{i}.png")
        (tmp_path / "b" / f"{i}.jpg").write_bytes(b"")  # zero bytes, as a failed copy leaves
    with pytest.raises(EquipError) as raised:
        load_folder(tmp_path, 16, None)
    assert str(raised.value) == (
        f"class folder(s) under data.root={tmp_path} with no readable image: b (every file "
        "failed to decode; the warning above names them). Replace the files or remove the folder."
    )


def test_missing_root_names_the_key(tmp_path: Path):
    with pytest.raises(EquipError, match="data.root=.*does not exist"):
        scan_folder(tmp_path / "nope")


def test_split_is_stratified_seeded_and_keeps_duplicates_together():
    images = load_images(make_cfg("data.per_class=10").data)
    s1 = split_images(images, 0.2, 0.0, seed=1)
    assert (s1 == split_images(images, 0.2, 0.0, seed=1)).all()
    assert (s1 != split_images(images, 0.2, 0.0, seed=2)).any()
    labels = images.labels.numpy()
    for c in range(len(images.classes)):
        assert (s1[labels == c] == "val").sum() == 2  # 20% of 10, in every class
    # Byte-identical copies: add a duplicate of every image and split again.
    import torch

    dup = replace(
        images,
        images=torch.cat([images.images, images.images]),
        labels=torch.cat([images.labels, images.labels]),
        sha256=images.sha256 * 2,
        paths=images.paths * 2,
    )
    s = split_images(dup, 0.2, 0.1, seed=3)
    n = len(images.labels)
    assert (s[:n] == s[n:]).all()
    assert {"train", "val", "test"} == set(s)


def test_val_fraction_that_leaves_a_class_without_validation_is_refused():
    images = load_images(make_cfg("data.per_class=3").data)
    with pytest.raises(EquipError, match="data.val_fraction=0.1 leaves class 'axes'"):
        split_images(images, 0.1, 0.0, seed=0)
    with pytest.raises(EquipError, match="data.val_fraction=1.5"):
        split_images(images, 1.5, 0.0, seed=0)
    one = load_images(make_cfg("data.per_class=1").data)  # no fraction can split one image
    with pytest.raises(EquipError, match="class 'axes' has 1 distinct image.*at least 2"):
        split_images(one, 0.5, 0.0, seed=0)


def test_second_load_in_a_process_comes_from_memory():
    cfg = make_cfg("data.per_class=4", "data.generator_seed=7")
    first = load_images(cfg.data)
    second = load_images(cfg.data)
    assert second.source == "memory" and second.images is first.images


@pytest.fixture(scope="module")
def gear(tmp_path_factory: pytest.TempPathFactory):
    """The shared gear photos at 32 px, decoded once for this module's tests."""
    if not GEAR.is_dir():
        pytest.skip(f"{GEAR} is not on this machine (EQUIP_GEAR_IMAGES=PATH names it)")
    return load_folder(GEAR, 32, tmp_path_factory.mktemp("gear") / "cache")


def test_real_gear_photos_load_with_white_backgrounds(gear):
    images = gear
    assert len(images.classes) == 12 and len(images.labels) == 1586 and not images.skipped
    gloves = images.classes.index("gloves")
    pngs = [i for i, p in enumerate(images.paths) if p.endswith(".png") and "gloves" in p]
    assert pngs and images.labels[pngs[0]] == gloves
    corners = images.images[pngs][:, :, 0, 0].float()
    assert corners.mean() > 200  # composited onto white, not the black hidden under the alpha


def test_gear_photos_of_one_product_from_two_shops_share_a_group(gear):
    """Issue 17: same-class photos whose dHashes are at most 1 bit apart, in different groups
    by names and bytes: 63 pairs (23 of them 0 bits apart). By what they show: none."""
    data = make_cfg("experiment=gear", f"data.root={GEAR}", tiny=False).data
    groups = group_images(gear, GroupRule.of(data))
    by_names = group_images(gear, replace(GroupRule.of(data), by=frozenset({"bytes", "name"})))
    at = {Path(p).relative_to(GEAR).as_posix(): i for i, p in enumerate(gear.paths)}
    for a, b in (
        ("axes/10331871x1010938_zm.jpeg", "axes/113410.jpeg"),  # the same axe photo
        ("boots/10331425x1011760_zm.jpeg", "boots/866951.jpeg"),  # the same boot photo
        ("axes/100937.jpeg", "axes/100938.jpeg"),  # one axe in two colours
    ):
        assert groups.ids[at[a]] == groups.ids[at[b]] and by_names.ids[at[a]] != by_names.ids[at[b]]
    first, second = close_pairs(gear.dhash, 1)
    labels = gear.labels.numpy()
    same = [(i, j) for i, j in zip(first, second, strict=True) if labels[i] == labels[j]]
    assert sum(by_names.ids[i] != by_names.ids[j] for i, j in same) == 63
    assert sum(groups.ids[i] != groups.ids[j] for i, j in same) == 0
    assert groups.params() == {
        "dataset.groups": 1015,
        "dataset.groups_merged_by_bytes": 5,
        "dataset.groups_merged_by_name": 515,
        "dataset.groups_merged_by_near_duplicate": 51,
        "dataset.label_conflicts": 0,
    }


def test_group_pattern_keeps_colourways_of_a_product_together():
    images = load_images(make_cfg("data.per_class=10").data)
    # Name pairs of images as one product in two colourways: 100x1.jpg, 100x2.jpg, ...
    paths = [
        f"/d/{images.classes[y]}/{100 + i // 2}x{i % 2}.jpg"
        for i, y in enumerate(images.labels.tolist())
    ]
    named = replace(images, paths=paths)
    s = split_images(named, 0.2, 0.0, seed=0, rule=GroupRule(pattern=r"^(\d+)x"))
    assert all(s[i] == s[i + 1] for i in range(0, len(s), 2))
    assert (split_images(named, 0.2, 0.0, seed=0) != s).any()  # without it: split by content
    with pytest.raises(EquipError, match="data.group_pattern='\\(' is not a valid regex"):
        split_images(named, 0.2, 0.0, seed=0, rule=GroupRule(pattern="("))


def test_a_damaged_cache_entry_or_a_symlink_loop_never_breaks_a_load(tmp_path: Path):
    write_tree(tmp_path / "photos")
    loop = tmp_path / "photos" / "rope" / "loop.png"
    loop.symlink_to(loop)  # points at itself: reading it fails
    first = load_folder(tmp_path / "photos", 16, tmp_path / "cache")
    assert any(p == str(loop) for p, _ in first.skipped)
    entries = sorted((tmp_path / "cache").glob("v*px/*/*.npy"))  # one per file
    np.save(entries[0], np.zeros((3, 8, 8), np.uint8))  # wrong shape (another size's entry)
    again = load_folder(tmp_path / "photos", 16, tmp_path / "cache")
    assert again.decoded == 1 and (again.images == first.images).all()
    assert np.load(entries[0]).shape == (3, 16, 16)  # healed on disk too
