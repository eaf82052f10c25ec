"""Real Lightning training on tiny built-in data, recorded in a real sqlite MLflow store."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from equip.errors import EquipError
from equip.model.cnn import Classifier
from equip.serve.pyfunc import classify
from equip.train.run import train
from tests.conftest import (
    artifacts,
    make_cfg,
    port_nobody_listens_on,
    ready_store,
    run_cli,
    write_pngs,
)


def test_train_records_a_complete_run(store: str):
    result = train(make_cfg("model.filters=[8,16]", "model.lr=0.003"), ["model.lr=0.003"])
    client = MlflowClient(store)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "filters=8-16 lr=0.003"
    p = run.data.params
    assert p["model.filters"] == "[8, 16]" and p["model.lr"] == "0.003"
    assert p["data.image_size"] == "32" and p["trainer.max_epochs"] == "2"
    assert not any("_target_" in k for k in p)
    assert int(p["arch.params"]) > 0 and float(p["arch.mflops_per_image"]) > 0
    assert p["dataset.fingerprint"] == run.data.tags["equip.data_fingerprint"]
    assert run.data.tags["git.commit"] and run.data.tags["git.dirty"] in ("true", "false")
    for name in ("train_loss", "val_loss", "val_acc", "val_macro_f1", "train_acc"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 2, name
    m = run.data.metrics
    assert 0 <= m["best_val_acc"] <= 1 and m["epochs_trained"] == 2
    assert {
        "config/config.yaml",
        "config/overrides.txt",
        "data/split.csv",
        "eval/per_class_metrics.json",
        "eval/per_class_metrics.csv",
        "eval/confusion_matrix.png",
        "eval/confusion_matrix.csv",
        "eval/learning_curves.png",
        "checkpoints/best.ckpt",
        "model/MLmodel",  # the model is the run's artifacts, not an MLflow 3 logged model
    } <= artifacts(client, run.info.run_id)
    assert client.search_logged_models([run.info.experiment_id]) == []
    manifest = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/data/split.csv").splitlines()
    assert manifest[0] == "path,sha256,class,group,grouped_by,label_conflicts,split"
    assert len(manifest) == 1 + 12 * 8
    assert p["dataset.groups"] == "96" and p["dataset.groups_merged_by_bytes"] == "0"

    # The logged model is a pyfunc that takes image files and agrees with the best checkpoint.
    model_uri = f"runs:/{run.info.run_id}/model"
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    files = write_pngs(Path("imgs"), 6)
    with pytest.raises(MlflowException, match="row 0: not base64.*file paths are off"):
        pyfunc.predict(pd.DataFrame({"image": [str(files[0])]}))  # paths need an image root
    pyfunc = mlflow.pyfunc.load_model(model_uri, model_config={"image_root": "imgs"})
    ckpt_file = mlflow.artifacts.download_artifacts(
        f"runs:/{run.info.run_id}/checkpoints/best.ckpt"
    )
    ckpt = Classifier.load_from_checkpoint(ckpt_file).eval()
    by_path = pyfunc.predict(pd.DataFrame({"image": [str(f) for f in files]}))
    by_b64 = pyfunc.predict(
        pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode() for f in files]})
    )
    direct = classify(ckpt, [f.read_bytes() for f in files])
    assert list(by_path["class"]) == list(by_b64["class"]) == list(direct["class"])
    assert set(by_path.columns) == {"class", "probability"} | {f"p_{c}" for c in ckpt.classes}
    assert np.allclose(by_path.filter(like="p_").sum(axis=1), 1, atol=1e-4)


class Explode(pl.Callback):
    def on_train_epoch_end(self, trainer, module):
        if trainer.current_epoch == 1:
            raise RuntimeError("disk full (test)")


def test_a_failing_run_is_marked_failed_and_keeps_what_it_logged(store: str):
    cfg = make_cfg("trainer.max_epochs=3")
    with pytest.raises(RuntimeError, match="disk full"):
        train(cfg, [], callbacks=[Explode()])
    client = MlflowClient(store)
    [run] = client.search_runs(client.get_experiment_by_name("equip").experiment_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["equip.error"] == "RuntimeError: disk full (test)"
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) >= 1  # epoch 0 kept
    assert {"error.txt", "checkpoints/best.ckpt", "data/split.csv"} <= artifacts(
        client, run.info.run_id
    )
    assert mlflow.active_run() is None


def test_bad_config_fails_before_any_run_is_created(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default store would be created
    with pytest.raises(EquipError, match="model.lr"):
        train(make_cfg("model.lr=-1"), [])
    assert not Path("mlflow.db").exists()


def test_unreachable_tracking_server_fails_in_seconds(store: str):
    cfg = make_cfg(f"tracking.uri=http://127.0.0.1:{port_nobody_listens_on()}")
    t0 = time.perf_counter()
    with pytest.raises(EquipError, match=r"unreachable(.|\n)*mlflow server"):
        train(cfg, [])
    # Measured, not asserted: a wall-clock bound fails on a loaded machine.
    print(f"unreachable server reported after {time.perf_counter() - t0:.1f} s")


def test_environment_tracking_uri_wins(tmp_path: Path):
    """MLFLOW_TRACKING_URI, as MLflow users set it, beats the config's default store."""
    env_store = ready_store(tmp_path / "elsewhere")
    proc = run_cli(
        "trainer.max_epochs=1",
        "tracking.log_model=false",
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": env_store},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(MlflowClient(env_store).search_runs(["1"])) == 1
    assert not (tmp_path / "mlflow.db").exists()


def test_multirun_gives_one_run_per_job_and_loads_data_once(tmp_path: Path, store: str):
    proc = run_cli("model.filters=[8],[8,16]", "tracking.log_model=false", "-m", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [parent] = client.search_runs(["1"], "tags.`equip.sweep_key` != ''")
    runs = client.search_runs(
        ["1"],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    assert [r.info.run_name for r in runs] == ["filters=8 lr=0.001", "filters=8-16 lr=0.001"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert [r.data.tags["equip.data_source"] for r in runs] == ["decoded", "memory"]
    assert "MLflow: run" in proc.stderr


def test_a_job_does_not_depend_on_the_jobs_before_it(store: str):
    cfg = make_cfg("tracking.log_model=false")
    first = train(cfg, [])
    train(make_cfg("tracking.log_model=false", "model.filters=[4]", "seed=3"), [])
    again = train(cfg, [])
    assert again["metrics"]["best_val_loss"] == first["metrics"]["best_val_loss"]
    assert [h["train_loss"] for h in again["history"]] == [
        h["train_loss"] for h in first["history"]
    ]
