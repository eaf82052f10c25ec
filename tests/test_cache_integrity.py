"""A damaged decoded-image cache is found and built again: a run never trains on pixels its data
fingerprint does not describe. Real files, damaged the way a census found: the .npy header kept,
the pixels overwritten with random bytes; or the file truncated."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from PIL import Image

from equip.data import _imagestore
from equip.data.images import load_folder, load_synthetic, synthetic_cache_file
from equip.data.synthetic import make_synthetic
from equip.errors import EquipError
from tests.conftest import ROOT, run_cli

WARNING = "damaged cache entry"
SMALL = ["data.image_size=32", "data.batch_size=16", "trainer=debug", "tracking.log_model=false"]
BUILT_IN = [*SMALL, "data.per_class=8", "data.val_fraction=0.25"]


def _train(store: str, *args: str) -> tuple[dict[str, str], dict[str, float]]:
    """Train in this process, the data loaded afresh (not from this process's memory), into
    the `store` fixture's MLflow store: (the run's tags, its val metrics)."""
    from equip.data import images
    from equip.train.run import train

    images._loaded.clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=list(args))
    run = MlflowClient(store).get_run(train(cfg, [])["run_id"])
    val = {k: v for k, v in run.data.metrics.items() if k.startswith("val_")}
    return run.data.tags, val


def _write_photos(root: Path, per_class: int) -> None:
    """Two class folders of PNGs: drawings of the built-in set's first two classes."""
    drawn, _ = make_synthetic(per_class, 48, seed=5)  # ordered class by class
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = drawn[c * per_class + i].transpose(1, 2, 0)
            Image.fromarray(image).save(root / name / f"{i}.png")


def _scramble_pixels(path: Path) -> None:
    """Keep the .npy header, overwrite everything after it with random bytes."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(1).bytes(size - offset))
    assert path.stat().st_size == size


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


def _warnings(lines: str | pytest.LogCaptureFixture) -> list[str]:
    if not isinstance(lines, str):
        lines = "\n".join(r.getMessage() for r in lines.records)
    return [line for line in lines.splitlines() if WARNING in line]


def _latest_run(tmp_path: Path) -> tuple[dict[str, str], dict[str, float]]:
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs(["1"], order_by=["attributes.start_time DESC"])[0]
    return run.data.tags, {k: v for k, v in run.data.metrics.items() if k.startswith("val_")}


def test_a_damaged_built_in_set_is_drawn_again_and_trains_as_before(
    store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    cache = tmp_path / "cache"
    args = (*BUILT_IN, f"data.cache_dir={cache}")
    tags, val = _train(store, *args)
    path = synthetic_cache_file(cache, 8, 32, 0)
    fresh = load_synthetic(8, 32, 0).images.numpy()  # drawn in RAM, no cache
    assert tags["equip.data_source"] == "decoded" and np.array_equal(np.load(path), fresh)

    # `python train.py` on scrambled pixels: one warning line in its output names the file.
    _scramble_pixels(path)
    proc = run_cli(*args, cwd=tmp_path, tiny=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = _warnings(proc.stdout + proc.stderr)
    assert str(path) in line and "pixels do not match their checksum" in line, line
    assert np.array_equal(np.load(path), fresh)  # drawn again on disk
    again, again_val = _latest_run(tmp_path)
    assert again["equip.data_source"] == "decoded" and again_val == val
    assert again["equip.data_fingerprint"] == tags["equip.data_fingerprint"]

    for damage in (_scramble_pixels, _truncate):  # streamed: verified in chunks when opened
        damage(path)
        caplog.clear()
        again, again_val = _train(store, *args, "data.ram_budget_mb=0")
        [line] = _warnings(caplog)
        assert str(path) in line, line
        assert np.array_equal(np.load(path), fresh)
        assert again["equip.data_source"] == "decoded" and again_val == val
    caplog.clear()
    again, _ = _train(store, *args)  # intact now: read without a word
    assert again["equip.data_source"] == "disk-cache" and not _warnings(caplog)


def test_damaged_photo_cache_entries_are_decoded_again_and_train_as_before(
    store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    _write_photos(tmp_path / "photos", 4)
    cache = tmp_path / "cache"
    args = (*SMALL, "data=folder", f"data.root={tmp_path / 'photos'}", f"data.cache_dir={cache}")
    tags, val = _train(store, *args)
    fresh = load_folder(tmp_path / "photos", 32, None).images.numpy()  # decoded, no cache
    [the_set] = cache.glob("folder-*.npy")
    photos = sorted(cache.glob("v*px/*/*.npy"))
    assert len(photos) == 8 and np.array_equal(np.load(the_set), fresh)

    # Every cached .npy scrambled (the set and each photo's): the photos are decoded again.
    for path in [the_set, *photos]:
        _scramble_pixels(path)
    caplog.clear()
    again, again_val = _train(store, *args)
    lines = _warnings(caplog)
    assert len(lines) == 9 and all(any(str(p) in line for line in lines) for p in photos)
    assert np.array_equal(np.load(the_set), fresh)
    assert again["equip.data_source"] == "decoded" and again_val == val
    assert again["equip.data_fingerprint"] == tags["equip.data_fingerprint"]

    # Only the set truncated: rebuilt from the photos' entries, which pass their checksum (so
    # nothing is decoded and the pixels come from the disk cache, correct ones).
    _truncate(the_set)
    caplog.clear()
    again, again_val = _train(store, *args, "data.ram_budget_mb=0")
    [line] = _warnings(caplog)
    assert str(the_set) in line and np.array_equal(np.load(the_set), fresh)
    assert again_val == val


def test_a_damaged_photo_entry_is_decoded_again(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    _write_photos(tmp_path / "photos", 2)
    cache = tmp_path / "cache"
    first = load_folder(tmp_path / "photos", 32, cache)
    entry = sorted(cache.glob("v*px/*/*.npy"))[0]
    for damage, why in (
        (_scramble_pixels, "pixels do not match their checksum"),
        (_truncate, "truncated, or not the size its header says"),
    ):
        damage(entry)
        caplog.clear()
        again = load_folder(tmp_path / "photos", 32, cache)
        assert _warnings(caplog) == [f"{WARNING} {entry}: {why}; building it again"]
        assert again.decoded == 1 and again.source == "decoded"
        assert torch.equal(again.images, first.images)
        assert _imagestore.read_image(entry, (3, 32, 32)) is not None  # healed on disk
    # An entry written by an older equip (no checksum) is decoded again without a warning.
    np.save(entry, np.load(entry))
    caplog.clear()
    again = load_folder(tmp_path / "photos", 32, cache)
    assert again.decoded == 1 and not _warnings(caplog)


def test_renamed_photos_are_read_in_their_new_order_not_the_cached_sets(tmp_path: Path):
    """A rename keeps every photo's bytes (the data fingerprint stays) but reorders the files:
    each row must still be its own file's pixels, for the labels, paths and split to hold."""
    photos, cache = tmp_path / "photos", tmp_path / "cache"
    _write_photos(photos, 3)
    first = load_folder(photos, 32, cache)
    (photos / "a" / "0.png").rename(photos / "a" / "z.png")  # 0.png sorted first, z.png last
    again = load_folder(photos, 32, cache)
    fresh = load_folder(photos, 32, None)  # decoded now, no cache
    assert again.fingerprint == first.fingerprint and again.paths == fresh.paths
    assert again.decoded == 0  # every photo still read from its cache entry
    assert torch.equal(torch.as_tensor(again.images[:]), fresh.images)


def test_a_set_without_a_checksum_is_built_again(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, "equip.data")
    cache = tmp_path / "cache"
    first = load_synthetic(4, 16, 0, cache)
    path = synthetic_cache_file(cache, 4, 16, 0)
    meta = json.loads(_imagestore.meta_path(path).read_text())
    del meta[_imagestore.CHECKSUM_KEY]  # as an older equip wrote it
    _imagestore.meta_path(path).write_text(json.dumps(meta))
    again = load_synthetic(4, 16, 0, cache)
    assert again.source == "decoded" and "no pixel checksum" in caplog.text
    assert not _warnings(caplog)  # an upgrade, not damage
    assert torch.equal(again.images[:], first.images[:])


def test_a_streamed_set_changed_under_a_running_loader_stops_the_run(tmp_path: Path):
    """DataLoader workers open the file again: one that is no longer the verified file is
    checked again there, and damage stops the run rather than feeding it."""
    cache = tmp_path / "cache"
    streamed = load_synthetic(4, 16, 0, cache, ram_budget_mb=0).images
    assert isinstance(streamed, _imagestore.DiskImages)
    fresh = load_synthetic(4, 16, 0).images
    rows = _RowsOf(streamed)
    assert torch.equal(torch.cat(list(_loader(rows))), fresh)  # the verified file: read as is
    _scramble_pixels(streamed.path)
    with pytest.raises(EquipError, match="changed during the run"):
        list(_loader(rows))


class _RowsOf(torch.utils.data.Dataset):
    def __init__(self, store: _imagestore.DiskImages):
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.store[[i]][0]


def _loader(rows: _RowsOf) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(rows, batch_size=8, num_workers=1)
