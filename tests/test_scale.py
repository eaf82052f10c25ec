"""One run at scale: Lightning's scaling knobs, DDP recording one MLflow run, data streamed
from the disk cache, and resuming a killed run. Everything on CPU with tiny data."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from equip.errors import EquipError
from tests.conftest import ROOT, TINY, artifacts, make_cfg

FAST = ["tracking.log_model=false"]


def _env() -> dict[str, str]:
    """The child sees this checkout's sources first (not another worktree's install)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python train.py TINY ARGS` in a subprocess that imports this checkout."""
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, *args], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip


def _only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs(["1"])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


# ---------------------------------------------------------------- checks
@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("trainer.accelerator=gpu", "trainer.accelerator=gpu: this machine has no usable GPU"),
        ("trainer.devices=64", "trainer.devices=64 CPU processes on"),
        ("trainer.precision=8-mixed", "trainer.precision='8-mixed' is not one of"),
        ("trainer.precision=16-mixed", "trainer.precision=16-mixed needs a GPU"),
        ("trainer.strategy=ddp_spawn", "trainer.strategy='ddp_spawn' is not one of"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be"),
    ],
)
def test_scaling_knobs_fail_with_one_clear_line(override: str, says: str):
    from equip.checks import check_config, check_hardware

    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks for machines without a GPU")
    cfg = make_cfg(override)
    with pytest.raises(EquipError, match=None) as e:
        check_config(cfg)
        check_hardware(cfg.trainer)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_cli_says_no_gpu_and_too_many_devices_in_one_line(tmp_path: Path):
    for arg, says in (("trainer.accelerator=gpu", "no usable GPU"),
                      (f"trainer.devices={os.cpu_count() + 1}", "CPU processes on")):  # fmt: skip
        proc = _cli(arg, "trainer.strategy=ddp", cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        [line] = [x for x in proc.stderr.splitlines() if x.strip()]
        assert line.startswith("equip: error:") and says in line
        assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(
            f"sqlite:///{tmp_path}/mlflow.db"
        ).search_runs(["1"])


def test_decoded_size_is_checked_before_anything_is_drawn(tmp_path: Path):
    from equip.data import load_synthetic

    with pytest.raises(EquipError, match=r"data.per_class=100000 with data.image_size=1024"):
        load_synthetic(100_000, 1024, 0, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- resume
KILL_AFTER_EPOCH = textwrap.dedent(
    """
    import os, signal, sys
    import pytorch_lightning as pl
    from equip.training import train
    from tests.conftest import make_cfg

    class Kill(pl.Callback):  # after the epoch's metrics and last.ckpt are written
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)

    train(make_cfg(*sys.argv[2:]), sys.argv[2:], callbacks=[Kill()])
    """
)


@pytest.mark.slow
def test_a_killed_run_resumes_in_the_same_run_with_its_history(tmp_path: Path):
    args = ["trainer.max_epochs=4", "trainer.patience=0", *FAST]
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_EPOCH, "1", *args], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]
    client, run = _only_run(tmp_path)
    assert run.info.status == "RUNNING"  # a SIGKILLed process says nothing
    run_id = run.info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [0, 1]

    # resume= errors: unknown id, and (below) a finished run
    bad = _cli(*args, "resume=0123456789abcdef", cwd=tmp_path)
    assert bad.returncode == 2 and "resume=0123456789abcdef: no such MLflow run" in bad.stderr

    done = _cli(*args, "resume=last", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client, run = _only_run(tmp_path)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["equip.resumed"] == "true"
    for key in ("val_acc", "train_loss", "lr"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert steps == [0, 1, 2, 3], (key, steps)
    assert run.data.metrics["epochs_trained"] == 4
    assert "checkpoints/best.ckpt" in artifacts(client, run_id)
    assert not (tmp_path / ".cache/equip/runs" / run_id).exists()  # removed once FINISHED

    again = _cli(*args, f"resume={run_id}", cwd=tmp_path)
    assert again.returncode == 2 and "already FINISHED" in again.stderr


# ---------------------------------------------------------------- ddp
@pytest.mark.slow
def test_ddp_on_two_cpu_processes_records_one_run_with_whole_val_set_metrics(tmp_path: Path):
    import mlflow
    import numpy as np
    import torch

    from equip.data import load_images
    from equip.model import Classifier

    ddp = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    proc = _cli(*ddp, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("done ") == 1  # rank 1 prints nothing
    client, run = _only_run(tmp_path)
    run_id, m = run.info.run_id, run.data.metrics
    assert run.info.status == "FINISHED" and run.data.params["trainer.devices"] == "2"
    assert {"checkpoints/best.ckpt", "eval/confusion_matrix.csv", "data/split.csv",
            "config/config.yaml"} <= artifacts(client, run_id)  # fmt: skip
    assert len(client.search_logged_models([run.info.experiment_id])) == 1
    for key in ("val_acc", "val_loss", "train_loss", "epoch_time_s"):
        assert [h.step for h in client.get_metric_history(run_id, key)] == [0, 1], key

    # The per-epoch val metrics are over the whole val set, not one rank's shard: at the best
    # epoch they equal a recomputation from the best checkpoint on every val image.
    best = int(m["best_epoch"])
    val_acc = {h.step: h.value for h in client.get_metric_history(run_id, "val_acc")}[best]
    val_loss = {h.step: h.value for h in client.get_metric_history(run_id, "val_loss")}[best]
    ckpt = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/checkpoints/best.ckpt",
                                               tracking_uri=client.tracking_uri)  # fmt: skip
    model = Classifier.load_from_checkpoint(ckpt, map_location="cpu").eval()
    images = load_images(make_cfg("data.cache_dir=null").data)
    manifest = Path(client.download_artifacts(run_id, "data/split.csv", str(tmp_path)))
    is_val = np.array(
        [row.rsplit(",", 1)[1] == "val" for row in manifest.read_text().splitlines()[1:]]
    )
    x, y = images.images[torch.from_numpy(is_val)], images.labels[torch.from_numpy(is_val)]
    assert len(y) == 24  # 12 classes x 8 x 0.25: each rank saw 12 of them
    with torch.inference_mode():
        logits = model(x)
    assert val_acc == pytest.approx(float((logits.argmax(1) == y).float().mean()), abs=1e-6)
    assert val_loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), abs=1e-4)
    assert m["best_val_acc"] == pytest.approx(val_acc, abs=1e-6)
