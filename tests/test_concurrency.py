"""Commands that meet on one store: sweeps started together on a new sqlite store, the same
sweep started twice, and the locks that keep them apart (real processes, no sleeps)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from equip.errors import EquipError
from equip.sweep.callback import SweepTracker
from tests.conftest import FAST, ROOT

# Two one-epoch jobs on the smallest built-in data: a sweep is mostly process start-up.
JOBS = ["model.filters=[8]", "trainer.max_epochs=1"]
REFUSED = "is already running in this store"


# ---------------------------------------------------------------- the locks, two processes
def _hold_store_lock(path: str, held, release) -> None:  # noqa: ANN001  (mp primitives)
    from equip.track._lock import exclusive

    with exclusive(Path(path), timeout_s=60, what="the store"):
        held.set()
        release.wait(60)


def test_the_store_lock_keeps_a_second_process_out_until_released(tmp_path: Path):
    from equip.track._lock import exclusive

    mp = multiprocessing.get_context("spawn")
    held, release = mp.Event(), mp.Event()
    path = tmp_path / "mlflow.db.lock"
    holder = mp.Process(target=_hold_store_lock, args=(str(path), held, release))
    holder.start()
    try:
        assert held.wait(60)
        with (
            pytest.raises(EquipError, match="locked by another command"),
            exclusive(path, timeout_s=0.2, what="the store"),
        ):
            pass
        release.set()
        holder.join(60)
        with exclusive(path, timeout_s=5, what="the store"):
            pass  # free once its holder let go
    finally:
        release.set()
        holder.join(60)


def _hold_sweep_lock(path: str, held) -> None:  # noqa: ANN001
    from equip.track._lock import OwnedLock

    lock = OwnedLock(Path(path))  # kept: filelock releases a lock it garbage-collects
    assert lock.try_acquire() is None
    held.set()
    signal.pause()  # until killed


def test_a_sweep_lock_names_its_holder_and_dies_with_it(tmp_path: Path):
    from equip.track._lock import OwnedLock

    mp = multiprocessing.get_context("spawn")
    held = mp.Event()
    path = tmp_path / "locks" / "sweep.lock"
    holder = mp.Process(target=_hold_sweep_lock, args=(str(path), held))
    holder.start()
    try:
        assert held.wait(60)
        lock = OwnedLock(path)
        assert lock.try_acquire() == f"pid {holder.pid} on {os.uname().nodename}"
    finally:
        holder.kill()  # no release: the kernel frees a dead process's lock
        holder.join(60)
    assert lock.try_acquire() is None
    lock.release()
    assert not lock.owner_file.exists()


# Each process imports what it needs, says so, then opens the store when told: all at once.
OPEN_STORE = """
import sys
from equip.track.store import open_store
import mlflow
print("ready", flush=True)
sys.stdin.read(1)
open_store(sys.argv[1])
"""


def test_processes_opening_a_new_store_at_once_create_it_once(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd, n = [sys.executable, "-c", OPEN_STORE, uri], 3
    procs = [
        subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * n  # type: ignore[union-attr]
    for p in procs:
        p.stdin.write("go")  # type: ignore[union-attr]
        p.stdin.close()  # type: ignore[union-attr]
    assert [p.wait(120) for p in procs] == [0] * n
    client = MlflowClient(uri)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert not any(t.startswith("_alembic_tmp") for t in tables)


# ---------------------------------------------------------------- a sweep that cannot start
class FailingTracker(SweepTracker):
    """The sweep callback with a start that raises what no check foresaw."""

    def _start(self, config) -> None:  # noqa: ANN001
        raise RuntimeError("the store said no\nsecond line")


def _train(*args: str, cwd: Path) -> tuple[subprocess.Popen, Path]:
    """Start `train.py -m`, its output to files (a pipe left unread could stall a racing sweep).
    Returns the process and the files' common prefix."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cwd.mkdir(parents=True, exist_ok=True)
    log = cwd / f"sweep-{len(list(cwd.glob('sweep-*.err')))}"
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        cmd = [sys.executable, str(ROOT / "train.py"), "-m", *FAST, *JOBS, *args]
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err), log


def _finish(started: tuple[subprocess.Popen, Path]) -> tuple[int, str, str]:
    """Wait for a `_train` process: its exit code, stdout and stderr."""
    proc, log = started
    code = proc.wait(timeout=600)
    return code, Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "equip: error:" in line]


def test_a_raising_sweep_start_ends_the_sweep_with_one_line(tmp_path: Path):
    target = "hydra.callbacks.sweep_tracker._target_=tests.test_concurrency.FailingTracker"
    code, out, err = _finish(_train("model.lr=0.001,0.01", target, cwd=tmp_path))
    assert code == 1, err[-3000:]
    assert _errors(err) == [
        "equip: error: the sweep could not start: RuntimeError: the store said no"
    ]
    assert "Traceback" not in err and "done " not in err + out  # no job ran
    assert not (tmp_path / "mlflow.db").exists()


def test_a_store_mlflow_cannot_open_ends_the_sweep_with_one_line(tmp_path: Path):
    # What two racing migrations used to leave behind: MLflow fails on it at every open.
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("CREATE TABLE _alembic_tmp_latest_metrics (x INTEGER)")
    code, out, err = _finish(_train("model.lr=0.001,0.01", cwd=tmp_path))
    assert code == 2, err[-3000:]
    [line] = _errors(err)
    assert "MLflow cannot open" in line and "move it aside" in line
    assert "Traceback" not in err and "done " not in err + out


# ---------------------------------------------------------------- sweeps started together
def _sweep_dir(*overrides: str) -> str:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return str(compose("train", list(overrides), return_hydra_config=True).hydra.sweep.dir)


def test_sweeps_composed_in_the_same_second_get_folders_of_their_own():
    first, second = _sweep_dir(), _sweep_dir()  # (microseconds apart)
    assert first != second and first.startswith("multirun/")
    assert _sweep_dir("hydra.sweep.dir=sweeps/mine") == "sweeps/mine"


A, B = "model.lr=0.001,0.01", "model.lr=0.002,0.02"


def _race(folder: Path, sweeps: list[str]) -> None:
    """Start sweeps at the same moment on a new store; check what they left: the store opens,
    each sweep has one parent run (or a repeat was refused in one line), no job trained twice
    under a parent, and every sweep that ran wrote a folder of its own."""
    started = [_train(lr, cwd=folder) for lr in sweeps]
    results = [_finish(s) for s in started]
    ran = [lr for lr, (code, _, _) in zip(sweeps, results, strict=True) if code == 0]
    for code, _, err in results:
        if code != 0:  # only a repeat of a sweep that runs may be refused, in one line
            assert code == 2 and len(set(sweeps)) < len(sweeps), err[-3000:]
            [line] = _errors(err)
            assert REFUSED in line and "multirun.resume=true" in line, line
    assert set(ran) == set(sweeps)

    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")  # the store opens
    exp = client.get_experiment_by_name("equip")
    parents = client.search_runs([exp.experiment_id], "tags.`equip.sweep_key` != ''")
    assert len(parents) == len(set(sweeps))
    for parent in parents:
        assert parent.info.status == "FINISHED"
        children = client.search_runs(
            [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        hashes = [c.data.tags["equip.config_hash"] for c in children]
        assert len(hashes) == 2 == len(set(hashes)), "a job trained twice under one parent"
        assert all(c.info.status == "FINISHED" for c in children)
    # Job folders 0 and 1 in each sweep's own folder, none shared.
    folders = sorted(folder.glob("multirun/*/*"))
    assert len(folders) == len(ran), folders
    for f in folders:
        assert sorted(p.name for p in f.iterdir() if p.is_dir()) == ["0", "1"]


def test_sweeps_started_together_on_a_new_store(tmp_path: Path):
    _race(tmp_path, [A, A, B])  # the same sweep twice, and another one


@pytest.mark.stress
def test_ten_pairs_of_sweeps_started_together(tmp_path: Path):
    for i in range(10):
        _race(tmp_path / str(i), [A, A] if i % 2 == 0 else [A, B])
