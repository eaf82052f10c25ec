"""Issue 15: the whole user flow through `tracking=azureml` on the stand-in workspace, and the
same commands with the same assertions on a local sqlite store and a plain `mlflow server`.

One test per store, its steps in the order a user takes them (each needs the one before): one
run (params, per-epoch metrics, artifacts, its logged model); a baseline CV sweep killed while a
fold runs, and resumed (the cut-off run is marked KILLED, finished folds are kept); the CNN's CV
sweep (parent, children, leaderboard, `python -m equip.leaderboard`); its final fit registered
through `registry.gate=cv`; the champion loaded back by `python -m equip.predict`. Every read
the test itself makes is one a workspace serves, so the same assertions hold on every store. On
the workspace, not one request may be refused.

The sqlite and server runs (about 3.5 minutes each here) are marked `stores`, out of the default
run: each step is tested on sqlite by its own tests. `python -m pytest -m stores` runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import (
    ROOT,
    TINY,
    freeze_when,
    start_mlflow_server,
    stop_process,
    train_in_process,
    write_pngs,
)

CNN = ["model.filters=[8,16]", "model.batch_norm=true", "model.head=gap", "model.lr=0.003"]
FOLDS = ["data.folds=2", "data.fold=0,1"]
# A baseline that cannot learn much (one tree on colour histograms): the CNN beats it.
WEAK_BASELINE = [
    "model=baseline",
    "model.estimator=random_forest",
    "model.n_estimators=1",
    "model.features=[color_hist]",
]
QUIET = ["trainer.progress_bar=false"]


@dataclass
class Store:
    """Where the flow records: the settings users give train.py, their shell's environment, and
    the URI other commands (and this test's reads) use."""

    name: str
    uri: str
    overrides: list[str]
    env: dict[str, str] = field(default_factory=dict)
    refused: Callable[[], list] = list  # the workspace's refusals in this test (none elsewhere)
    cwd: Path = Path()

    def train(self, *args: str, wait: bool = True):
        """`python train.py [-m] ARGS` in `cwd`, with the store's settings: run the way
        `__main__` runs it, in this process (its exit status and output), or (wait=False) as a
        process of its own, for the test to stop."""
        flags = [a for a in args if a == "-m"]
        args = [*flags, *TINY, *QUIET, *(a for a in args if a != "-m"), *self.overrides]
        if not wait:
            return self._run([sys.executable, str(ROOT / "train.py"), *args], {}, wait=False)
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # a shell of the store's own
            done = train_in_process(args, self.cwd, self.env)
        assert done.returncode == 0, f"train.py {' '.join(args)}:\n{done.stderr[-4000:]}"
        return done

    def module(self, name: str, *args: str):
        """`python -m NAME ARGS`: MLFLOW_TRACKING_URI names the store."""
        return self._run([sys.executable, "-m", name, *args], {"MLFLOW_TRACKING_URI": self.uri})

    def _run(self, cmd: list[str], extra: dict[str, str], wait: bool = True):
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env.update({**self.env, **extra})
        if not wait:
            return subprocess.Popen(
                cmd,
                cwd=self.cwd,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        done = subprocess.run(
            cmd, cwd=self.cwd, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{' '.join(cmd[1:])}:\n{done.stderr[-4000:]}"
        return done


STORES = [
    pytest.param("sqlite", marks=pytest.mark.stores),
    pytest.param("server", marks=pytest.mark.stores),
    "azureml",
]


@pytest.fixture(params=STORES)
def store(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    monkeypatch.chdir(tmp_path)
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        yield _connected(Store("sqlite", uri, [f"tracking.uri={uri}"], cwd=tmp_path))
    elif request.param == "server":
        server = start_mlflow_server(tmp_path / "server")
        yield _connected(Store("server", server.uri, [f"tracking.uri={server.uri}"], cwd=tmp_path))
        server.stop()
    else:
        workspace = request.getfixturevalue("workspace")
        for name, value in workspace.environment().items():
            monkeypatch.setenv(name, value)  # this test's own reads go the users' way too
        first = len(workspace.rejected)  # the session's stand-in: refusals before are not ours
        yield _connected(
            Store(
                "azureml",
                workspace.uri,
                workspace.settings(),
                workspace.environment(),
                lambda: workspace.rejected[first:],
                tmp_path,
            )
        )


def _connected(store: Store) -> Store:
    mlflow.set_tracking_uri(store.uri)  # azureml-mlflow's artifact store follows this one
    return store


# ---------------------------------------------------------------- reads a workspace serves
def experiment(client: MlflowClient) -> str:
    return client.get_experiment_by_name("equip").experiment_id


def all_runs(client: MlflowClient) -> list:
    return client.search_runs([experiment(client)], "", max_results=1000)


def sweep_parents(client: MlflowClient) -> list:
    """Newest first (search_runs' default order: start_time)."""
    return [r for r in all_runs(client) if "equip.sweep_key" in r.data.tags]


def children(client: MlflowClient, parent_id: str) -> list:
    runs = client.search_runs(
        [experiment(client)], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000
    )
    return sorted(runs, key=lambda r: r.info.start_time)


def artifact_paths(run, path: str) -> set[str]:
    """Through the run's own artifact store (`runs:/` would also search logged models)."""
    found = mlflow.artifacts.list_artifacts(artifact_uri=f"{run.info.artifact_uri}/{path}")
    return {f"{path}/{Path(f.path).name}" for f in found}


# ---------------------------------------------------------------- the flow
def test_the_whole_flow(store: Store):
    client = MlflowClient(store.uri)
    single = one_run(store, client)
    kill_a_sweep_mid_job_and_resume_it(store, client)
    cnn_parent = cv_sweep_with_leaderboard(store, client)
    final_fit_registered_by_the_cv_gate(store, client, cnn_parent)
    champion_predicts(store)
    logged_model_predicts(single)
    refused = Counter(str(r) for r in store.refused())  # each kind once, with its count
    assert not refused, "\n".join(f"{n} x {r}" for r, n in refused.most_common())


def one_run(store: Store, client: MlflowClient) -> str:
    store.train(*CNN)
    [run] = all_runs(client)
    assert run.info.status == "FINISHED"
    assert run.info.run_name.startswith("filters=8-16 lr=0.003 ")  # named by its overrides
    p, m = run.data.params, run.data.metrics
    assert p["model.filters"] == "[8, 16]" and p["trainer.max_epochs"] == "2"
    assert p["dataset.fingerprint"] == run.data.tags["equip.data_fingerprint"]
    for name in ("train_loss", "val_loss", "val_acc", "val_macro_f1"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 2, name
    assert 0 <= m["best_val_acc"] <= 1 and m["epochs_trained"] == 2
    assert {"eval/per_class_metrics.csv", "eval/confusion_matrix.png"} <= artifact_paths(
        run, "eval"
    )
    assert "checkpoints/best.ckpt" in artifact_paths(run, "checkpoints")
    split = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/data/split.csv").splitlines()
    assert (
        split[0] == "path,sha256,class,group,grouped_by,label_conflicts,split"
        and len(split) == 1 + 12 * 8
    )
    return run.info.run_id


def kill_a_sweep_mid_job_and_resume_it(store: Store, client: MlflowClient) -> None:
    """Killed while a fold runs: the rerun marks that run KILLED (its process is gone), keeps
    the finished folds and trains the rest."""
    args = ("-m", *WEAK_BASELINE, "data.folds=3", "data.fold=0,1,2")
    proc = store.train(*args, wait=False)

    def one_finished_one_running() -> tuple[set[str], str] | None:
        parents = sweep_parents(client)
        folds = [c for p in parents[:1] for c in children(client, p.info.run_id)]
        finished = {c.info.run_id for c in folds if c.info.status == "FINISHED"}
        running = [c.info.run_id for c in folds if c.info.status == "RUNNING"]
        return (finished, running[0]) if finished and running else None

    try:
        done_before, cut_off = freeze_when(
            proc, one_finished_one_running, "a fold running after a finished one", timeout_s=300
        )
    finally:
        stop_process(proc)
    assert client.get_run(cut_off).info.status == "RUNNING"  # nobody could say otherwise
    rerun = store.train(*args)
    [parent] = sweep_parents(client)
    folds = children(client, parent.info.run_id)
    finished = [c for c in folds if c.info.status == "FINISHED"]
    assert len({c.data.tags["equip.config_hash"] for c in finished}) == 3
    assert done_before <= {c.info.run_id for c in finished}  # not trained again
    assert rerun.stderr.count("already FINISHED as run") == len(done_before)
    reaped = client.get_run(cut_off)
    assert reaped.info.status == "KILLED" and "is gone" in reaped.data.tags["equip.error"]
    assert parent.info.status == "FINISHED"


def cv_sweep_with_leaderboard(store: Store, client: MlflowClient) -> str:
    done = store.train("-m", *CNN, "tracking.log_model=false", *FOLDS)
    assert "rank" in done.stdout and "2-fold CV (mean ± std): val_acc" in done.stdout + done.stderr
    parent = sweep_parents(client)[0]
    folds = children(client, parent.info.run_id)
    assert len(folds) == 2 and all(c.info.status == "FINISHED" for c in folds)
    tags, m = parent.data.tags, parent.data.metrics
    assert tags["equip.swept_keys"] == "data.fold"
    assert m["cv_folds"] == 2 and m["jobs_finished"] == 2 and 0 <= m["cv_mean_best_val_acc"] <= 1
    assert {"sweep/leaderboard.csv", "sweep/leaderboard.md"} <= artifact_paths(parent, "sweep")
    board = store.module("equip.leaderboard", "latest")
    assert parent.info.run_id in board.stdout and board.stdout.count("FINISHED") == 2
    return parent.info.run_id


def final_fit_registered_by_the_cv_gate(store: Store, client: MlflowClient, cnn_parent: str):
    """The gate finds the CNN's CV sweep and looks for the baseline's CV on the same 2 folds;
    the baseline CV above used 3, so none matches and require_baseline=false lets it register.
    (Beating a baseline by 2 standard errors needs a CNN that learns: minutes, not seconds;
    tests/test_recipe.py proves that gate on sqlite.)"""
    register = ["registry.enabled=true", "registry.gate=cv", "registry.name=gear"]
    on_onnx = "tracking.log_onnx=true"  # the champion runs on ONNX Runtime
    store.train(*CNN, "final_fit=true", *register, "registry.require_baseline=false", on_onnx)
    [run] = [r for r in all_runs(client) if r.data.tags.get("equip.final_fit") == "true"]
    t = run.data.tags
    assert t["equip.registry.decision"] == "registered", t.get("equip.registry.reason")
    assert t["equip.registry.reason"] == "registered without a baseline"
    assert t["equip.cv_parent_run_id"] == cnn_parent and t["equip.registry.version"] == "1"
    assert run.data.metrics["cv_folds"] == 2
    [version] = client.search_model_versions("name='gear'")
    assert version.tags["equip.gate"] == "cv" and version.run_id == run.info.run_id


def champion_predicts(store: Store) -> None:
    files = write_pngs(store.cwd / "photos", 3)
    out = store.module("equip.predict", "model=models:/gear@champion", f"images={files[0].parent}")
    assert "3 image(s)" in out.stdout, out.stdout
    lines = (store.cwd / "predictions.csv").read_text().splitlines()
    assert lines[0].startswith("file,class,probability,p_") and len(lines) == 4


def logged_model_predicts(run_id: str) -> None:
    """The single run's logged model, the way `equip.predict model=RUN_ID` loads it."""
    from equip.serve.predict import load_predictor, predict_files

    files = sorted(Path("photos").glob("*.png"))
    out = predict_files(load_predictor(run_id), files)
    assert len(out) == 3 and set(out.columns) >= {"class", "probability"}
