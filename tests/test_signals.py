"""Stopped from outside, the way a user or the machine stops it: Ctrl-C in the terminal, kill -9
of a run, of a sweep or of one of its worker processes. Real train.py processes and a real
sqlite store; each test acts at the first sighting of the state it needs, on jobs that cannot
finish by themselves first."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import (
    ENDLESS,
    ROOT,
    TINY,
    ctrl_c_a_training_sweep,
    gone_within,
    open_when_created,
    parent_and_children,
    sweep,
    train_in_process,
)


@contextlib.contextmanager
def endless_training(cwd: Path) -> Iterator[subprocess.Popen]:
    """`python train.py` that trains until it is stopped; killed when the test ends."""
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *TINY,
            "data.per_class=24",
            "tracking.log_model=false",
            *ENDLESS,
        ],
        cwd=cwd,
        env=base,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def wait_for_epoch(client: MlflowClient, proc: subprocess.Popen, db: Path):
    """The RUNNING run, at the first sighting of its first logged epoch."""
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended before its first epoch: {proc.stderr.read()}")
        if db.exists():
            try:
                runs = client.search_runs(["1"], "attributes.status = 'RUNNING'")
            except Exception:  # the store is still being created
                runs = []
            runs = [r for r in runs if "equip.pid" in r.data.tags]
            if runs and client.get_metric_history(runs[0].info.run_id, "val_acc"):
                return runs[0]
        time.sleep(0.3)
    raise AssertionError("train.py logged no epoch within 240 s")


def test_a_run_killed_with_sigkill_is_marked_killed_by_the_next_command(tmp_path: Path, store: str):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    with endless_training(tmp_path) as proc:
        run = wait_for_epoch(client, proc, tmp_path / "mlflow.db")
        proc.kill()
        proc.wait()
    assert client.get_run(run.info.run_id).info.status == "RUNNING"  # nobody could say otherwise
    nxt = train_in_process([*TINY, "tracking.log_model=false", "trainer.max_epochs=1"], tmp_path)
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED"
    assert "is gone" in killed.data.tags["equip.error"]


def test_ctrl_c_ends_the_run_killed_with_one_line_and_exit_130(tmp_path: Path, store: str):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    with endless_training(tmp_path) as proc:
        run = wait_for_epoch(client, proc, tmp_path / "mlflow.db")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "stopped by you" in err and "Traceback" not in err
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "KILLED" and "Ctrl-C" in ended.data.tags["equip.error"]


@pytest.mark.parametrize(
    "launcher",
    [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
    ids=["basic", "joblib"],
)
def test_ctrl_c_on_a_sweep_is_one_line_exit_130_and_leaves_nothing_running(
    tmp_path: Path, launcher: list[str]
):
    """Ctrl-C in the terminal (SIGINT to the whole process group) while every worker trains."""
    proc, err, client, started = ctrl_c_a_training_sweep(
        tmp_path, "model.filters=[4],[8]", *launcher, jobs=2 if launcher else 1
    )
    assert proc.returncode == 130, err[-3000:]
    equip_lines = [line for line in err.splitlines() if " INFO mlflow." not in line]
    assert len(equip_lines) == 1 and equip_lines[0].startswith("stopped by you: "), err[-3000:]
    runs = client.search_runs(["1"])
    assert len(runs) == 1 + (2 if launcher else 1)  # the parent and the jobs that started
    assert all(r.info.status == "KILLED" for r in runs), [(r.info.status) for r in runs]
    assert not gone_within(started), "a worker process outlived the sweep"


@pytest.mark.slow
def test_killing_a_joblib_sweep_stops_its_workers(tmp_path: Path, store: str):
    args = (
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model.filters=[4],[8]",
        *ENDLESS,  # both jobs are still training when the sweep is killed
        "data.per_class=24",
    )
    proc = sweep(*args, cwd=tmp_path, wait=False)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    workers: set[int] = set()
    try:
        deadline = time.time() + 240
        while len(running_children(client)) < 2:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError(f"no 2 jobs running within 240 s: {proc.stderr.read()}")
            time.sleep(0.5)
        workers = {int(r.data.tags["equip.pid"]) for r in running_children(client)}
        assert proc.pid not in workers
        proc.kill()
        proc.wait()
        deadline = time.time() + 30
        while any(alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.5)
        assert not any(alive(p) for p in workers), "sweep workers kept training"
    finally:  # endless jobs: nothing of the sweep may outlive the test
        proc.kill()
        for pid in filter(alive, workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_dead_joblib_worker_fails_its_job_and_the_sweep_goes_on(tmp_path: Path):
    """kill -9 of the worker that trains job #0 (endless, so it is training when killed): that
    job alone fails, with the reason; jobs #1 and #2 finish; the sweep exits 4."""
    proc = sweep(
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "trainer.patience=0",
        "trainer.max_epochs=100000,2,3",  # job #0 never ends by itself
        cwd=tmp_path,
        wait=False,
    )
    client, victim, deadline = None, None, time.time() + 240
    try:
        while victim is None:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.3)
            with contextlib.suppress(Exception):  # the store is being created
                client = client or open_when_created(tmp_path / "mlflow.db")
                endless = client.search_runs(
                    ["1"],
                    "attributes.status = 'RUNNING' and params.`trainer.max_epochs` = '100000'",
                )
                victim = next(
                    r for r in endless if client.get_metric_history(r.info.run_id, "val_acc")
                )
        pid = int(victim.data.tags["equip.pid"])
        assert pid != proc.pid
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 4, err[-3000:]
    assert f"job #0 failed: its worker process {pid} died (killed or crashed: SIGKILL(-9))" in err
    assert "Traceback" not in err
    parent, children = parent_and_children(client)
    by_epochs = {c.data.params["trainer.max_epochs"]: c for c in children}
    dead = by_epochs["100000"]
    assert dead.info.status == "FAILED"
    assert dead.data.tags["equip.error"].startswith(f"its worker process {pid} died (killed")
    assert by_epochs["2"].info.status == by_epochs["3"].info.status == "FINISHED"
    assert parent.info.status == "FINISHED" and parent.data.metrics["jobs_failed"] == 1


def running_children(client: MlflowClient) -> list:
    try:
        return client.search_runs(
            ["1"], "attributes.status = 'RUNNING' and tags.mlflow.parentRunId != ''"
        )
    except Exception:
        return []


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped training
