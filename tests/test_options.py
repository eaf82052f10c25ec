"""Every model, optimiser, scheduler, augmentation and trainer option trains a few batches
through the real train() into one real store: composing is not enough (a scheduler watching a
metric a final fit never computes composes fine and fails at the first epoch end)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from equip.config.choices import TTA, Activation, AugmentPolicy, Mix, Optimizer, Pool, Scheduler
from tests.conftest import make_cfg, ready_store

FEW_BATCHES = [
    "data.image_size=16",
    "data.per_class=4",
    "data.batch_size=8",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "tracking.log_model=false",
]
ALL_AUGMENTATIONS = [
    "data.augment.hflip=true",
    "data.augment.vflip=true",
    "data.augment.crop_scale=0.7",
    "data.augment.color_jitter=0.2",
    "data.augment.rotation=10",
    "data.augment.translate=0.1",
    "data.augment.erasing=0.5",
]


def cnn_options() -> list[list[str]]:
    """Each optimiser, scheduler, activation and pool at least once, cycled together, with the
    other model switches alternating: every value trains, in 4 runs instead of 192."""
    columns = [
        [f"model.optimizer={o}" for o in Optimizer],
        [f"model.scheduler={s}" for s in Scheduler],
        [f"model.activation={a}" for a in Activation],
        [f"model.pool={p}" for p in Pool],
        ["model.head=gap", "model.head=flatten"],
        ["model.batch_norm=true", "model.batch_norm=false"],
        ["model.residual=true", "model.residual=false"],
        [f"model.tta={t}" for t in TTA],
        [f"data.augment.policy={p}" for p in AugmentPolicy],
        [f"data.augment.mix={m}" for m in Mix],
        ["model.ema_decay=0.9", "model.ema_decay=null"],
        ["model.hidden=[8]", "model.hidden=[]"],
        ["trainer.monitor=val_macro_f1", "trainer.monitor=val_loss", "trainer.monitor=val_acc"],
        ["trainer.keep=best", "trainer.keep=last"],
    ]
    runs = max(len(c) for c in columns)
    return [[c[i % len(c)] for c in columns] for i in range(runs)]


RUNS = [
    *(["model.filters=[4,8]", "model.convs_per_block=2", *o] for o in cnn_options()),
    ["model.filters=[4]", *ALL_AUGMENTATIONS, "model.label_smoothing=0.1"],
    ["model=cnn_gear", "model.filters=[4,8]", "data.image_size=32"],
    # Stochastic weight averaging from the second epoch (no batch norm: no extra epoch for its
    # statistics), with soft mixup targets as the loss's.
    [
        "model.filters=[4]",
        "trainer.swa_lrs=0.01",
        "trainer.swa_epoch_start=2",
        "trainer.keep=last",
        "data.augment.mix=mixup",
        "data.augment.mix_alpha=0.4",
    ],
    ["trainer=debug"],
    # A *-true precision casts the weights: the images must follow them (here on any CPU).
    ["model.filters=[4]", "trainer.precision=64-true"],
    ["model.filters=[4]", "model.batch_norm=true", "trainer.precision=bf16-true"],
    # No validation images in a final fit: plateau watches the training loss instead.
    ["final_fit=true", "model.scheduler=plateau", "model.filters=[4]"],
    *(
        ["model=baseline", f"model.estimator={e}", f"model.features=[{f}]"]
        for e, f in zip(
            ("logreg", "random_forest", "svm"), ("pixels", "hog", "color_hist"), strict=True
        )
    ),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    """One store for the module, in its working dir (the default tracking.uri finds it)."""
    folder = tmp_path_factory.mktemp("options")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        yield MlflowClient(ready_store(folder))


def short(overrides: list[str]) -> str:
    return " ".join(o.split(".")[-1] for o in overrides)[:90]


@pytest.mark.parametrize("overrides", RUNS, ids=short)
def test_every_option_trains_a_few_batches(client: MlflowClient, overrides: list[str]):
    from equip.train.run import train

    result = train(make_cfg(*FEW_BATCHES, *overrides), list(overrides))
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED", run.data.tags.get("equip.error")
    for override in overrides:
        key, value = override.split("=", 1)
        if key.startswith(("model.", "data.augment.", "trainer.monitor", "trainer.swa")):
            assert yaml.safe_load(run.data.params[key]) == yaml.safe_load(value), key
    metric = "train_loss" if "final_fit=true" in overrides else "val_acc"
    if "model=baseline" not in overrides:
        assert len(client.get_metric_history(run.info.run_id, metric)) == 2
        # mixed batches carry soft targets: the train accuracy is of their dominant class
        train_acc = client.get_metric_history(run.info.run_id, "train_acc")
        assert len(train_acc) == 2 and all(0 <= m.value <= 1 for m in train_acc)


def test_the_experiment_preset_trains_on_a_folder(client: MlflowClient, tmp_path):
    from equip.train.run import train

    rng = np.random.default_rng(0)
    for name in ("axes", "boots"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / name / f"{i}.png")
    overrides = ["experiment=gear", f"data.root={tmp_path / 'photos'}", "data.cache_dir=null"]
    few = [o for o in FEW_BATCHES if not o.startswith("data.per_class")]
    cfg = make_cfg(*overrides, *few, "data.image_size=32", "model.filters=[4,8]", tiny=False)
    assert cfg.model.scheduler == "onecycle" and cfg.data.augment.hflip
    result = train(cfg, overrides)
    assert client.get_run(result["run_id"]).info.status == "FINISHED"


def test_the_option_columns_cover_every_choice():
    seen = {o for run in cnn_options() for o in run}
    for enum, key in ((Optimizer, "optimizer"), (Scheduler, "scheduler"), (Pool, "pool")):
        assert {f"model.{key}={v}" for v in enum} <= seen
    assert {f"model.tta={v}" for v in TTA} <= seen
    assert {
        f"data.augment.{k}={v}" for k, e in (("policy", AugmentPolicy), ("mix", Mix)) for v in e
    } <= seen
    assert len(list(itertools.chain(*RUNS))) > 40


def test_multiscale_tta_is_the_mean_over_scales_in_the_logged_model_too(
    client: MlflowClient, tmp_path
):
    """model.tta=multiscale averages the probabilities of the image zoomed out (white border),
    as it is and zoomed in (centre crop); the logged pyfunc, loaded from the run, does the same
    with no serving code of its own."""
    import base64

    import mlflow.pyfunc
    import pandas as pd
    import torch
    from mlflow.artifacts import download_artifacts

    from equip.model.cnn import TTA_SCALES, load_classifier, tta_views
    from equip.serve.pyfunc import decode_images
    from equip.train.run import train
    from tests.conftest import write_pngs

    few = [o for o in FEW_BATCHES if o != "tracking.log_model=false"]
    result = train(make_cfg(*few, "model.filters=[4]", "model.tta=multiscale"), [])
    files = write_pngs(tmp_path / "photos", 3)
    images = pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]})
    served = mlflow.pyfunc.load_model(result["model_uri"]).predict(images)
    ckpt = download_artifacts(run_id=result["run_id"], artifact_path="checkpoints/best.ckpt")
    model = load_classifier(ckpt)
    x = torch.from_numpy(decode_images([f.read_bytes() for f in files], 16))
    views = tta_views(x, "multiscale")
    assert len(views) == 1 + len(TTA_SCALES) and all(v.shape == x.shape for v in views)
    out, zoom_in = views[1], views[2]  # 0.9: a 1 px white frame around 14 px; 1.1: cropped
    assert (out[..., 0, :] == 255).all() and (out[..., :, -1] == 255).all()
    assert not torch.equal(zoom_in, x)
    with torch.inference_mode():
        expected = sum(model.net(v).softmax(1) for v in views) / len(views)
    p = served.filter(like="p_").to_numpy()
    assert np.allclose(p, expected.numpy(), atol=1e-5)
    assert (served["probability"] == p.max(1)).all()
