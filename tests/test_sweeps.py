"""Real Hydra multiruns (subprocesses of train.py) against real MLflow stores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import (
    freeze_when,
    parent_and_children,
    sweep,
    sweep_in_process,
    train_in_process,
)


def test_sweep_groups_jobs_under_a_parent_with_a_leaderboard(tmp_path: Path, store: str):
    proc = sweep_in_process("model.filters=[8],[8,16]", "model.lr=0.001,0.01", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent, children = parent_and_children(client)
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    tags = parent.data.tags
    assert parent.info.run_name == "sweep filters=[8],[8,16] lr=0.001,0.01"
    assert tags["equip.swept_keys"] == "model.filters,model.lr"
    assert "BasicSweeper" in tags["equip.sweeper"] and "BasicLauncher" in tags["equip.launcher"]
    assert Path(tags["equip.sweep_dir"]).is_dir()
    assert tags["equip.best_run_id"] in {c.info.run_id for c in children}
    assert parent.data.metrics["jobs_finished"] == 4 and parent.data.metrics["jobs_failed"] == 0
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {
        "sweep/leaderboard.csv",
        "sweep/leaderboard.md",
        "sweep/leaderboard.html",
        "sweep/parallel.png",
    } <= names
    assert "rank" in proc.stdout and "filters=8-16 lr=0.01" in proc.stdout

    report = subprocess.run(
        [sys.executable, "-m", "equip.leaderboard", "latest"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    assert report.returncode == 0, report.stderr
    assert parent.info.run_id in report.stdout and report.stdout.count("FINISHED") == 4


def test_an_invalid_grid_point_stops_the_sweep_before_any_training(tmp_path: Path):
    proc = sweep_in_process("model.filters=[8],[8,8,8,8,8,8]", "model.lr=0.001,-1", cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr
    assert "3 sweep point(s) are invalid" in err
    assert "model.filters=[8,8,8,8,8,8] model.lr=0.001" in err and "below 1 px" in err
    assert "model.lr=-1" in err and "must be positive" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_a_data_root_that_is_not_there_stops_the_sweep_before_any_training(tmp_path: Path):
    """As a single run refuses it; the jobs of a local launcher read data.root here."""
    (tmp_path / "photos").mkdir()
    roots = f"data.root={tmp_path}/photos,{tmp_path}/nope"
    proc = train_in_process(["-m", "data=folder", roots], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "1 sweep point(s) are invalid" in proc.stderr
    assert f"data.root={tmp_path}/nope does not exist or is not a folder" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_sweep_of_final_fits_ends_with_its_leaderboard_and_no_best_run(
    tmp_path: Path, store: str
):
    """A final fit validates nothing: the sweep still ends as any other, without a best job."""
    proc = sweep_in_process("final_fit=true", "model.lr=0.001,0.01", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Callback" not in proc.stderr and "finished: 2, failed: 0" in proc.stdout
    client = MlflowClient(store)
    parent, children = parent_and_children(client)
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    assert parent.data.metrics["jobs_finished"] == 2 and "equip.best_run_id" not in parent.data.tags
    assert "sweep/leaderboard.csv" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "sweep")
    }


def test_a_failing_job_is_recorded_the_sweep_goes_on_and_exits_4(tmp_path: Path, store: str):
    # val_fraction=0.01 passes the config checks but leaves classes without validation images.
    proc = sweep_in_process("data.val_fraction=0.25,0.01,0.3", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("equip: error: 1 of 3 jobs of 'sweep val_fraction=") and (
        "failed (FAILED or KILLED on the leaderboard" in last
    )
    parent, children = parent_and_children(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"))
    assert parent.info.status == "FINISHED"
    assert [c.info.status for c in children] == ["FINISHED", "FAILED", "FINISHED"]
    assert "no validation image" in children[1].data.tags["equip.error"]
    assert parent.data.metrics["jobs_failed"] == 1 and parent.data.metrics["jobs_finished"] == 2


def test_killed_sweep_resumes_without_retraining_finished_jobs(tmp_path: Path, store: str):
    args = ("model.filters=[4],[8],[4,8],[8,16]", "trainer.max_epochs=3")
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    proc = sweep(*args, cwd=tmp_path, wait=False)

    def two_or_three_jobs_finished() -> set[str] | None:
        """With the sweep stopped: the FINISHED jobs, once there are 2 of the 4 (or 3)."""
        if not (tmp_path / "mlflow.db").exists():  # the sweep creates the store
            return None
        finished = client.search_runs(
            ["1"], "attributes.status = 'FINISHED' and tags.mlflow.parentRunId != ''"
        )
        return {r.info.run_id for r in finished} if 2 <= len(finished) < 4 else None

    seen = freeze_when(proc, two_or_three_jobs_finished, "2 finished jobs")
    proc.kill()  # stopped since the store was read: it dies in the state seen
    proc.wait()
    done_before = {
        r.info.run_id for r in client.search_runs(["1"], "attributes.status = 'FINISHED'")
    }
    assert done_before == seen
    assert 2 <= len(done_before) < 4

    rerun = sweep_in_process(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    parent, children = parent_and_children(client)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 4
    assert len({c.data.tags["equip.config_hash"] for c in finished}) == 4
    assert done_before <= {c.info.run_id for c in finished}  # the first ones were not retrained
    assert rerun.stderr.count("already FINISHED as run") == len(done_before)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["jobs_skipped"] == len(done_before)
    # the job cut off by the kill is not left RUNNING
    assert all(c.info.status != "RUNNING" for c in children)


def check_nothing_lost(client: MlflowClient, n_jobs: int) -> None:
    parent, children = parent_and_children(client)
    assert len(children) == n_jobs and all(c.info.status == "FINISHED" for c in children)
    for c in children:
        assert len(c.data.params) > 40  # every config leaf, dataset and arch param
        for metric in ("train_loss", "val_acc", "val_macro_f1"):
            assert len(client.get_metric_history(c.info.run_id, metric)) == 2
        assert 0 <= c.data.metrics["best_val_acc"] <= 1


JOBLIB = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]


@pytest.mark.slow
def test_joblib_with_two_workers_loses_nothing_on_sqlite(tmp_path: Path, store: str):
    proc = sweep(*JOBLIB, "model.filters=[4],[8],[4,8],[8,16]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    check_nothing_lost(client, 4)
    parent, _ = parent_and_children(client)
    assert "JoblibLauncher" in parent.data.tags["equip.launcher"]


@pytest.mark.slow
def test_joblib_with_two_workers_loses_nothing_over_http(tmp_path: Path, mlflow_server: str):
    proc = sweep(*JOBLIB, "model.filters=[4],[8]", cwd=tmp_path, env_uri=mlflow_server)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_nothing_lost(MlflowClient(mlflow_server), 2)
    assert "http://127.0.0.1" in proc.stderr  # where the parent run is, as a UI link


def test_median_stopping_prunes_a_hopeless_job(tmp_path: Path, store: str):
    proc = sweep_in_process(
        "model.lr=0.001,0.00000001",
        "data.per_class=24",
        "trainer.max_epochs=4",
        "trainer.monitor=val_loss",
        "multirun.median_stop.enabled=true",
        "multirun.median_stop.after_epochs=2",
        "multirun.median_stop.min_finished=1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = parent_and_children(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"))
    good, hopeless = children
    assert "equip.pruned" not in good.data.tags and good.data.metrics["epochs_trained"] == 4
    assert hopeless.data.tags["equip.pruned"] == "true"
    assert "worse than the median" in hopeless.data.tags["equip.pruned_reason"]
    epochs = hopeless.data.metrics["epochs_trained"]
    assert epochs < 4  # stopped early, right after the epoch that was judged
    assert f"at epoch {int(epochs) - 1} is worse" in hopeless.data.tags["equip.pruned_reason"]
    assert parent.data.metrics["jobs_pruned"] == 1


def test_an_aborted_sweep_does_not_leave_its_parent_running_and_its_rerun_ends_clean(
    tmp_path: Path, store: str
):
    # The parent is ended as the process exits (atexit): train_in_process runs those hooks.
    grid = "data.val_fraction=0.25,0.01,0.3"
    proc = sweep_in_process(grid, "multirun.continue_on_failure=false", cwd=tmp_path)
    assert proc.returncode != 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent, children = parent_and_children(client)
    assert [c.info.status for c in children] == ["FINISHED", "FAILED"]  # the third never ran
    assert parent.info.status == "KILLED" and parent.data.metrics["jobs_failed"] == 1
    assert "stopped before its last job" in parent.data.tags["equip.error"]

    rerun = sweep_in_process(
        grid, cwd=tmp_path
    )  # the same sweep (multirun.* is not part of it), resumed
    assert rerun.returncode == 4, rerun.stderr[-3000:]  # the 0.01 job fails again
    parent, _ = parent_and_children(client)
    assert parent.info.status == "FINISHED"
    assert "equip.error" not in parent.data.tags  # the first invocation's reason is history
    for name in ("jobs_finished", "jobs_failed", "jobs_skipped"):  # once per invocation
        steps = [m.step for m in client.get_metric_history(parent.info.run_id, name)]
        assert sorted(steps) == [0, 1], (name, steps)
    assert parent.data.metrics["jobs_finished"] == 2 and parent.data.metrics["jobs_skipped"] == 1


def test_baseline_grids_are_validated_and_run(tmp_path: Path, store: str):
    proc = sweep_in_process("model=baseline", "model.estimator=logreg,random_forest", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, children = parent_and_children(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"))
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]


def test_optuna_sweep_runs_its_trials_under_one_parent(tmp_path: Path, store: str):
    proc = sweep_in_process(
        "sweep=learning_rate", "hydra.sweeper.n_trials=2", "trainer.max_epochs=1", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parent, children = parent_and_children(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"))
    assert "Optuna" in parent.data.tags["equip.sweeper"]
    assert parent.info.run_name.startswith("sweep learning_rate")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert parent.data.tags["equip.swept_keys"] == "model.lr,model.weight_decay,data.batch_size"
    # The study was given each trial's monitored metric: its best is the best child's.
    results = Path(parent.data.tags["equip.sweep_dir"]) / "optimization_results.yaml"
    best = yaml.safe_load(results.read_text())["best_value"]
    monitor = "best_val_acc"  # trainer.monitor=val_acc, higher is better
    assert best == pytest.approx(max(c.data.metrics[monitor] for c in children))


def test_a_failing_optuna_trial_does_not_stop_the_study(tmp_path: Path, store: str):
    # val_fraction=0.01 leaves classes without validation images: every trial fails at the split.
    proc = sweep_in_process(
        "sweep=learning_rate", "hydra.sweeper.n_trials=2", "data.val_fraction=0.01", cwd=tmp_path
    )
    assert proc.returncode == 4, proc.stderr[-3000:]  # every trial failed: not a success
    assert "equip: error: 2 of 2 jobs of 'sweep learning_rate" in proc.stderr
    _, children = parent_and_children(MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"))
    assert [c.info.status for c in children] == ["FAILED", "FAILED"]
