"""Issue 10: an honest estimate (grouped, stratified k-fold CV) and a stronger recipe."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from equip.data import load_images
from equip.errors import EquipError
from equip.split import fold_split, split_groups
from tests.conftest import make_cfg, parent_and_children, sweep


def _named_with_duplicates():
    """Synthetic images named as products in two colourways, plus byte-identical copies."""
    images = load_images(make_cfg("data.per_class=12").data)
    paths = [f"/d/{images.classes[y]}/{1000 + i // 2}x{i % 2}.jpg"
             for i, y in enumerate(images.labels.tolist())]  # fmt: skip
    n = 6  # the first six images again, byte for byte, under other names
    return replace(
        images,
        images=torch.cat([images.images, images.images[:n]]),
        labels=torch.cat([images.labels, images.labels[:n]]),
        sha256=images.sha256 + images.sha256[:n],
        paths=paths + [f"/d/copy/{i}.jpg" for i in range(n)],
    )


def test_cv_folds_are_disjoint_cover_every_image_keep_groups_and_are_stratified():
    images = _named_with_duplicates()
    pattern = r"^(\d+)x"
    folds = [fold_split(images, 4, k, seed=0, group_pattern=pattern) for k in range(4)]
    val = np.stack([f == "val" for f in folds])
    assert (val.sum(0) == 1).all()  # every image validated exactly once: disjoint and covering
    groups = np.array(split_groups(images, pattern))
    for f in folds:
        for g in set(groups):
            assert len(set(f[groups == g])) == 1  # a group never straddles train and val
    labels = images.labels.numpy()
    for f in folds:  # stratified: every class in every fold, close to a quarter of it
        for c in range(len(images.classes)):
            share = (f[labels == c] == "val").mean()
            assert 0.1 <= share <= 0.5, (c, share)
    assert (fold_split(images, 4, 1, seed=0, group_pattern=pattern) == folds[1]).all()
    assert (fold_split(images, 4, 1, seed=1, group_pattern=pattern) != folds[1]).any()


def test_cv_settings_are_checked():
    from equip.checks import check_config

    with pytest.raises(EquipError, match=r"data.fold=5 must be in \[0, 4\]"):
        check_config(make_cfg("data.folds=5", "data.fold=5"))
    with pytest.raises(EquipError, match="data.test_fraction=0.1 with data.folds=5"):
        check_config(make_cfg("data.folds=5", "data.test_fraction=0.1"))
    images = load_images(make_cfg("data.per_class=3").data)
    with pytest.raises(EquipError, match="data.folds=5: class 'axes' has only 3"):
        fold_split(images, 5, 0, seed=0)


def test_cv_sweep_parent_carries_mean_std_and_an_interval(store: str, tmp_path):
    proc = sweep("data.folds=3", "data.fold=0,1,2", "model.filters=[8]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3-fold CV (mean ± std): val_acc" in proc.stdout + proc.stderr
    assert "[95% CI " in proc.stderr  # each fold's done line
    parent, children = parent_and_children(MlflowClient(store))
    assert len(children) == 3
    accs = [c.data.metrics["best_val_acc"] for c in children]
    m = parent.data.metrics
    assert m["cv_folds"] == 3
    assert m["cv_mean_best_val_acc"] == pytest.approx(np.mean(accs))
    assert m["cv_std_best_val_acc"] == pytest.approx(np.std(accs, ddof=1))
    assert m["cv_val_images"] == 96  # 12 classes x 8 images: each validated once
    assert m["cv_pooled_acc_ci_low"] <= m["cv_pooled_acc"] <= m["cv_pooled_acc_ci_high"]
    assert "best_val_acc" not in m  # the luckiest fold is no estimate
    assert parent.data.tags["equip.cv_summary"].startswith("3-fold CV")
    for c in children:
        assert c.data.metrics["val_images"] == float(c.data.params["dataset.val_images"])
