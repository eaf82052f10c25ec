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
from tests.conftest import ROOT, TINY, artifacts, freeze_when, make_cfg, train_in_process

FAST = ["tracking.log_model=false"]


def _env() -> dict[str, str]:
    """The child sees this checkout's sources first (not another worktree's install)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python train.py [-m] TINY ARGS` in a subprocess that imports this checkout."""
    flags = [a for a in args if a.startswith("-")]
    args = tuple(a for a in args if not a.startswith("-"))
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *flags, *TINY, *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


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
    from equip.config.checks import check_config, check_hardware
    from equip.config.explain import config_errors

    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks for machines without a GPU")
    with pytest.raises(EquipError, match=None) as e, config_errors():
        cfg = make_cfg(override)  # a wrong choice fails here, while composing (the schema)
        check_config(cfg)
        check_hardware(cfg.trainer)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_cli_says_no_gpu_and_too_many_devices_in_one_line(tmp_path: Path):
    for arg, says in (
        ("trainer.accelerator=gpu", "no usable GPU"),
        (f"trainer.devices={os.cpu_count() + 1}", "CPU processes on"),
    ):
        proc = train_in_process([*TINY, arg, "trainer.strategy=ddp"], tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        # (other lines: warnings of Hydra plugins other checkouts may have installed)
        [line] = [x for x in proc.stderr.splitlines() if x.startswith("equip:")]
        assert line.startswith("equip: error:") and says in line
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "mlflow.db").exists() or not MlflowClient(
            f"sqlite:///{tmp_path}/mlflow.db"
        ).search_runs(["1"])


def test_decoded_size_is_checked_before_anything_is_drawn(tmp_path: Path):
    from equip.data.images import load_synthetic

    with pytest.raises(EquipError, match=r"data.per_class=100000 with data.image_size=1024"):
        load_synthetic(100_000, 1024, 0, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- resume
KILL_AFTER_EPOCH = textwrap.dedent(
    """
    import os, signal, sys
    import pytorch_lightning as pl
    from equip.train.run import train
    from tests.conftest import make_cfg

    class Kill(pl.Callback):  # after the epoch's metrics and last.ckpt are written
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == int(sys.argv[1]):
                os.kill(os.getpid(), signal.SIGKILL)

    train(make_cfg(*sys.argv[2:]), sys.argv[2:], callbacks=[Kill()])
    """
)


def test_a_runs_history_is_its_epochs_not_its_end_of_training_summary(
    tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch
):
    """What resume= continues from: a run that failed after its training (its summary logged
    one step past the last epoch, then e.g. the registry refused) has trained 2 epochs, not 3."""
    from equip.train._resume import logged_history

    done = train_in_process([*TINY, "tracking.log_model=false", "trainer.patience=0"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _, run = _only_run(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert [h["epoch"] for h in logged_history(run.info.run_id)] == [0, 1]


@pytest.mark.slow
def test_a_killed_run_resumes_in_the_same_run_with_its_history(tmp_path: Path, store: str):
    args = ["trainer.max_epochs=4", "trainer.patience=0", *FAST]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_EPOCH, "1", *args],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    client, run = _only_run(tmp_path)
    assert run.info.status == "RUNNING"  # a SIGKILLed process says nothing
    run_id = run.info.run_id
    assert [m.step for m in client.get_metric_history(run_id, "val_acc")] == [0, 1]

    # resume= errors: unknown id, and (below) a finished run; train.py run in this process
    bad = train_in_process([*TINY, *args, "resume=0123456789abcdef"], tmp_path)
    assert bad.returncode == 2 and "resume=0123456789abcdef: no such MLflow run" in bad.stderr

    done = train_in_process([*TINY, *args, "resume=last"], tmp_path)
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

    again = train_in_process([*TINY, *args, f"resume={run_id}"], tmp_path)
    assert again.returncode == 2 and "already FINISHED" in again.stderr


# ---------------------------------------------------------------- ddp
@pytest.mark.slow
def test_a_ddp_sweep_records_one_run_per_job_with_whole_val_set_metrics(tmp_path: Path, store: str):
    """Each job trains on two CPU processes and is one MLflow run under the sweep's parent:
    its second rank trains that job only (not the sweep again) and records nothing; the second
    job starts its own ranks although the first job's launcher ran in-process."""
    import mlflow
    import numpy as np
    import torch

    from equip.data.images import load_images
    from equip.model.cnn import Classifier

    ddp = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    proc = _cli("-m", "model.filters=[4],[8]", *ddp, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("done ") == 2  # one line per job: rank 1 prints nothing
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs(["1"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["model.filters"] for r in children) == ["[4]", "[8]"]

    [run] = [r for r in children if r.data.params["model.filters"] == "[8]"]
    run_id, m = run.info.run_id, run.data.metrics
    assert run.data.params["trainer.devices"] == "2"
    assert {
        "checkpoints/best.ckpt",
        "eval/confusion_matrix.csv",
        "data/split.csv",
        "config/config.yaml",
        "model/MLmodel",  # one model, in the run's artifacts
    } <= artifacts(client, run_id)
    for key in ("val_acc", "val_loss", "train_loss", "epoch_time_s"):
        assert [h.step for h in client.get_metric_history(run_id, key)] == [0, 1], key

    # The per-epoch val metrics are over the whole val set, not one rank's shard: at the best
    # epoch they equal a recomputation from the best checkpoint on every val image.
    best = int(m["best_epoch"])
    val_acc = {h.step: h.value for h in client.get_metric_history(run_id, "val_acc")}[best]
    val_loss = {h.step: h.value for h in client.get_metric_history(run_id, "val_loss")}[best]
    ckpt = mlflow.artifacts.download_artifacts(
        f"runs:/{run_id}/checkpoints/best.ckpt", tracking_uri=client.tracking_uri
    )
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


# ---------------------------------------------------------------- data on disk
def test_the_built_in_set_is_drawn_once_into_the_disk_cache_and_streamed(
    tmp_path: Path, store: str
):
    import hashlib

    import torch

    from equip.data import _imagestore
    from equip.data import images as data
    from equip.data._imagestore import DiskImages

    cache = tmp_path / "cache"
    cfg = make_cfg(f"data.cache_dir={cache}", "data.ram_budget_mb=0")
    data._loaded.clear()
    first = data.load_images(cfg.data)
    assert first.source == "decoded" and first.decoded == 96
    assert isinstance(first.images, DiskImages) and len(first.images) == 96
    data._loaded.clear()
    second = data.load_images(cfg.data)
    assert second.source == "disk-cache" and second.decoded == 0
    assert second.fingerprint == first.fingerprint
    data._loaded.clear()
    in_ram = data.load_images(make_cfg("data.cache_dir=null").data)  # today's path
    assert in_ram.fingerprint == first.fingerprint and isinstance(in_ram.images, torch.Tensor)
    assert torch.equal(second.images[[5, 0, 95]], in_ram.images[[5, 0, 95]])
    assert torch.equal(second.images[10:20], in_ram.images[10:20])
    data._loaded.clear()
    fits = data.load_images(make_cfg(f"data.cache_dir={cache}").data)  # within the RAM budget
    assert isinstance(fits.images, torch.Tensor) and torch.equal(fits.images, in_ram.images)
    sha = hashlib.sha256(in_ram.images[7].numpy().tobytes()).hexdigest()
    assert second.sha256[7] == sha

    # A writer killed half-way leaves a temp file, never a trusted cache entry; a damaged
    # entry is drawn again.
    path = data.synthetic_cache_file(cache, 8, 32, 0)
    assert not list(cache.glob(".*tmp"))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    assert _imagestore.open_cached(path) is None
    data._loaded.clear()
    again = data.load_images(cfg.data)
    assert again.source == "decoded" and again.fingerprint == first.fingerprint


def _big_cache(cache: Path, per_class: int, size: int) -> int:
    """A per_class x 12 set of size px in the cache, tiled from a few drawn images (drawing
    them all would take minutes). Returns its decoded bytes."""
    import hashlib

    from equip.data import _imagestore
    from equip.data.images import load_synthetic, synthetic_cache_file

    few = load_synthetic(4, size, 0).images.numpy()
    n = per_class * 12
    shas = [hashlib.sha256(str(k).encode()).hexdigest() for k in range(n)]
    rows = (few[(k // per_class) * 4 + k % 4] for k in range(n))
    path = synthetic_cache_file(cache, per_class, size, 0)
    _imagestore.write(path, (n, 3, size, size), rows, lambda: {"sha256": shas})
    return n * 3 * size * size


def _peak_rss_of_training(tmp_path: Path, cache: Path, per_class: int, size: int) -> int:
    """Peak RSS (bytes) of `train.py` on the cached set, streamed, 8 training batches."""
    args = [
        f"data.cache_dir={cache}",
        "data.ram_budget_mb=0",
        f"data.per_class={per_class}",
        f"data.image_size={size}",
        "data.val_fraction=0.02",
        "data.batch_size=64",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=8",
        "trainer.limit_val_batches=2",
        "model.filters=[8]",
        "trainer.progress_bar=false",
        *FAST,
    ]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the test's
    assert os.waitstatus_to_exitcode(status) == 0, err[-3000:]
    return usage.ru_maxrss * 1024


@pytest.mark.slow
def test_data_larger_than_the_ram_budget_trains_with_bounded_rss(tmp_path: Path, store: str):
    """1 GiB of decoded images streamed from the cache cost no more RAM than 50 MiB do:
    torch, Lightning and MLflow alone take ~1-1.5 GiB, so the images must add next to nothing."""
    cache, size = tmp_path / "cache", 128
    small = _big_cache(cache, 100, size)  # 1,200 images, 56 MiB
    big = _big_cache(cache, 1800, size)  # 21,600 images, 1.0 GiB
    peak_small = _peak_rss_of_training(tmp_path, cache, 100, size)
    peak_big = _peak_rss_of_training(tmp_path, cache, 1800, size)
    assert peak_big - peak_small < 0.1 * (big - small), (peak_small / 2**20, peak_big / 2**20)
    assert peak_big < big + peak_small / 2  # and so well under "all of it in RAM"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs(["1"], order_by=["attributes.start_time ASC"])
    assert [r.data.params["dataset.images"] for r in runs] == ["1200", "21600"]
    assert {r.data.tags["equip.data_source"] for r in runs} == {"disk-cache"}  # reused


@pytest.mark.slow
def test_a_resumed_sweep_continues_a_cut_off_job_from_its_checkpoint(tmp_path: Path, store: str):
    from tests.conftest import FAST as SWEEP_FAST

    args = [
        "model.filters=[4],[8]",
        "trainer.max_epochs=6",
        "trainer.patience=0",
        "data.image_size=48",
    ]
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *SWEEP_FAST, *args]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )

    def job_cut_off_with_a_checkpoint() -> str | None:
        """With the sweep stopped: a job RUNNING with 2 to 5 of its 6 epochs and a checkpoint."""
        if not (tmp_path / "mlflow.db").exists():  # the sweep creates the store
            return None
        running = client.search_runs(
            ["1"], "attributes.status = 'RUNNING' and tags.mlflow.parentRunId != ''"
        )
        for r in running:
            logged = len(client.get_metric_history(r.info.run_id, "val_acc"))
            if 2 <= logged < 6 and (tmp_path / ".cache/equip/runs" / r.info.run_id).exists():
                return r.info.run_id
        return None

    cut = freeze_when(proc, job_cut_off_with_a_checkpoint, "job with 2 epochs and a checkpoint")
    proc.kill()  # stopped since the state above was read: it is the state the sweep dies in
    proc.wait()
    assert client.get_run(cut).info.status == "RUNNING"
    logged = len(client.get_metric_history(cut, "val_acc"))

    rerun = train_in_process(["-m", *SWEEP_FAST, *args], tmp_path)  # the same command
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    run = client.get_run(cut)
    assert run.info.status == "FINISHED" and run.data.tags["equip.resumed"] == "true"
    steps = [m.step for m in client.get_metric_history(cut, "val_acc")]
    assert steps == list(range(6)) and logged < 6
    children = client.search_runs(["1"], "tags.mlflow.parentRunId != ''")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)


def test_photos_become_one_cached_set_that_streams_past_the_ram_budget(tmp_path: Path, store: str):
    import torch

    from equip.data._imagestore import DiskImages
    from equip.data.images import load_folder
    from tests.conftest import write_pngs

    for c in ("a", "b"):
        write_pngs(tmp_path / "photos" / c, 4)
    (tmp_path / "photos" / "b" / "broken.png").write_bytes(b"not a png")
    cache = tmp_path / "cache"
    in_ram = load_folder(tmp_path / "photos", 32, None)
    streamed = load_folder(tmp_path / "photos", 32, cache, ram_budget_mb=0)
    assert isinstance(streamed.images, DiskImages) and len(streamed.images) == 8
    assert torch.equal(streamed.images[slice(None)], in_ram.images)
    assert streamed.fingerprint == in_ram.fingerprint and len(streamed.skipped) == 1
    assert len(list(cache.glob("folder-*.npy"))) == 1 and not list(cache.glob(".*tmp"))
    again = load_folder(tmp_path / "photos", 32, cache)  # fits: read into RAM
    assert again.source == "disk-cache" and torch.equal(again.images, in_ram.images)
