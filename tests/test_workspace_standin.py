"""The stand-in Azure ML workspace (tests/workspace_standin.py) behaves like one, through
azureml-mlflow's own stores: it refuses each request the support matrices rule out and serves the
supported ones. And what equip tells users when a workspace says no: a token it does not accept
is one line naming `az login`; a refusal equip did not expect is one line naming the request."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.conftest import ROOT, TINY, make_cfg
from tests.workspace_standin import Workspace


@pytest.fixture(scope="module")
def client(workspace: Workspace) -> Iterator[MlflowClient]:
    """An MLflow client of the workspace in this process, reaching it as users do."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in workspace.environment().items():
            env.setenv(name, value)
        yield MlflowClient(workspace.uri)


@pytest.fixture(scope="module")
def known(client: MlflowClient) -> dict[str, str]:
    """An experiment, a run with a param, metric, tag and artifact, and a registered model."""
    exp = client.create_experiment("standin-rules")
    run = client.create_run(exp, tags={"kind": "cnn"})
    rid = run.info.run_id
    client.log_param(rid, "p", "a")
    client.log_metric(rid, "acc", 0.7)
    mlflow.set_tracking_uri(client.tracking_uri)  # the artifact store follows the global one
    client.log_text(rid, "hello", "notes/hello.txt")
    client.set_terminated(rid)
    client.create_registered_model("standin-model")
    client.create_model_version("standin-model", f"{run.info.artifact_uri}/notes", rid)
    return {"exp": exp, "run": rid, "artifacts": run.info.artifact_uri}


Call = Callable[[MlflowClient, dict[str, str]], object]
REFUSED: list[tuple[str, Call, str]] = [
    (
        "status filter",
        lambda c, k: c.search_runs([k["exp"]], "attributes.status = 'FINISHED'"),
        "run fields or attributes is not supported (attribute status)",
    ),
    (
        "run field filter",
        lambda c, k: c.search_runs([k["exp"]], "attributes.start_time > 0"),
        "run fields or attributes is not supported (attribute start_time)",
    ),
    (
        "backticks",
        lambda c, k: c.search_runs([k["exp"]], "params.`data.folds` = '2'"),
        "names that need escaping",
    ),
    (
        "double quotes",
        lambda c, k: c.search_runs([k["exp"]], "tags.\"equip.key\" = 'x'"),
        "names that need escaping",
    ),
    ("!= on a tag", lambda c, k: c.search_runs([k["exp"]], "tags.kind != 'x'"), "!= on tags"),
    ("LIKE", lambda c, k: c.search_runs([k["exp"]], "params.p LIKE 'a%'"), "LIKE is not"),
    ("ILIKE", lambda c, k: c.search_runs([k["exp"]], "tags.kind ILIKE 'C%'"), "ILIKE is not"),
    (
        "OR",
        lambda c, k: c.search_runs([k["exp"]], "tags.kind = 'a' OR tags.kind = 'b'"),
        "OR in a filter",
    ),
    (
        "order by metric",
        lambda c, k: c.search_runs([k["exp"]], order_by=["metrics.acc DESC"]),
        "ordering runs by 'metrics.acc DESC'",
    ),
    (
        "order by param",
        lambda c, k: c.search_runs([k["exp"]], order_by=["params.p"]),
        "ordering runs by 'params.p'",
    ),
    (
        "models by LIKE",
        lambda c, k: c.search_registered_models("name LIKE 'standin%'"),
        "only name = is supported, not attribute name LIKE",
    ),
    (
        "models by tag",
        lambda c, k: c.search_registered_models("tags.team = 'x'"),
        "only name = is supported, not tag team =",
    ),
    (
        "models at all: MLflow 3 adds a tag filter",
        lambda c, k: c.search_registered_models("name = 'standin-model'"),
        "not tag mlflow.prompt.is_prompt !=",
    ),
    (
        "versions by tag",
        lambda c, k: c.search_model_versions("name = 'standin-model' and tags.champion = 'true'"),
        "only name = or run_id = is supported",
    ),
    (
        "set an alias",
        lambda c, k: c.set_registered_model_alias("standin-model", "champion", "1"),
        "model aliases",
    ),
    (
        "read an alias",
        lambda c, k: c.get_model_version_by_alias("standin-model", "champion"),
        "model aliases",
    ),
    (
        "delete an alias",
        lambda c, k: c.delete_registered_model_alias("standin-model", "x"),
        "model aliases",
    ),
    (
        "delete a model",
        lambda c, k: c.delete_registered_model("standin-model"),
        "deleting a registered model",
    ),
    (
        "rename a model",
        lambda c, k: c.rename_registered_model("standin-model", "other"),
        "renaming a registered model",
    ),
    (
        "rename an experiment",
        lambda c, k: c.rename_experiment(k["exp"], "other"),
        "renaming an experiment",
    ),
    ("search logged models", lambda c, k: c.search_logged_models([k["exp"]]), "logged-model"),
    ("create a logged model", lambda c, k: c.create_logged_model(k["exp"]), "logged-model"),
]


@pytest.mark.parametrize(("call", "reason"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_it_refuses_what_the_support_matrices_rule_out(
    workspace: Workspace, client: MlflowClient, known: dict[str, str], call: Call, reason: str
):
    before = len(workspace.rejected)
    with pytest.raises(MlflowException):
        call(client, known)
    [refused] = workspace.rejected[before:]
    assert reason in refused.reason
    assert refused.status == (404 if "logged-model" in reason else 400)


SERVED: dict[str, Call] = {
    "all runs": lambda c, k: c.search_runs([k["exp"]], ""),
    "children": lambda c, k: c.search_runs([k["exp"]], f"tags.mlflow.parentRunId = '{k['run']}'"),
    "= on params and tags": lambda c, k: c.search_runs(
        [k["exp"]], "params.p = 'a' and tags.kind = 'cnn'"
    ),
    "!= on params, metrics": lambda c, k: c.search_runs(
        [k["exp"]], "params.p != 'b' and metrics.acc >= 0.5 and metrics.acc != 0.1"
    ),
    "by start_time": lambda c, k: c.search_runs([k["exp"]], order_by=["start_time DESC"]),
    "by end_time": lambda c, k: c.search_runs([k["exp"]], order_by=["attributes.end_time ASC"]),
    "a run": lambda c, k: c.get_run(k["run"]),
    "metric history": lambda c, k: c.get_metric_history(k["run"], "acc"),
    "experiments": lambda c, k: c.search_experiments(),
    "experiment by name": lambda c, k: c.get_experiment_by_name("standin-rules"),
    "a registered model": lambda c, k: c.get_registered_model("standin-model"),
    "versions by name": lambda c, k: c.search_model_versions("name = 'standin-model'"),
    "versions by run": lambda c, k: c.search_model_versions(f"run_id = '{k['run']}'"),
    "a version": lambda c, k: c.get_model_version("standin-model", "1"),
    "tag a version": lambda c, k: c.set_model_version_tag("standin-model", "1", "champ", "true"),
    "untag a version": lambda c, k: c.delete_model_version_tag("standin-model", "1", "champ"),
    "describe a version": lambda c, k: c.update_model_version("standin-model", "1", "checked"),
    "tag an experiment": lambda c, k: c.set_experiment_tag(k["exp"], "team", "gear"),
    "an artifact": lambda c, k: mlflow.artifacts.load_text(f"{k['artifacts']}/notes/hello.txt"),
    "artifacts": lambda c, k: mlflow.artifacts.list_artifacts(f"{k['artifacts']}/notes"),
}


def test_it_serves_what_a_workspace_supports(
    workspace: Workspace, client: MlflowClient, known: dict[str, str]
):
    before = len(workspace.rejected)
    got = {what: call(client, known) for what, call in SERVED.items()}
    assert workspace.rejected[before:] == []
    assert [r.info.run_id for r in got["= on params and tags"]] == [known["run"]]
    assert got["!= on params, metrics"] and got["by start_time"] and not got["children"]
    assert [v.version for v in got["versions by run"]] == ["1"]
    assert got["an artifact"] == "hello"
    assert [f.path for f in got["artifacts"]] == ["notes/hello.txt"]
    assert client.get_model_version("standin-model", "1").description == "checked"


def test_equips_experiments_open_as_model_training_on_a_workspace(
    workspace: Workspace, client: MlflowClient, known: dict[str, str]
):
    """A new experiment is created with mlflow.experimentKind; one made without it (`known`'s)
    gets it when equip uses it; both with requests the workspace serves."""
    from omegaconf import OmegaConf

    from equip.track import schema, store

    before = len(workspace.rejected)
    assert schema.EXPERIMENT_KIND not in client.get_experiment(known["exp"]).tags
    made = store.experiment_id(OmegaConf.create({"experiment": "standin-kind"}))
    used = store.experiment_id(OmegaConf.create({"experiment": "standin-rules"}))
    assert used == known["exp"] and workspace.rejected[before:] == []
    for exp in (made, used):
        assert client.get_experiment(exp).tags[schema.EXPERIMENT_KIND] == "custom_model_development"


def test_the_workspace_uri_is_read_from_azure_resource_manager(workspace: Workspace, client):
    """tracking=azureml with the workspace's names: equip asks ARM for its MLflow URI, with the
    signed-in user's token; each way that fails is one message with its fix."""
    from equip.errors import EquipError
    from equip.track.store import azureml_uri

    settings = make_cfg(*workspace.settings()).tracking
    assert azureml_uri(settings) == workspace.uri
    wrong = make_cfg(*workspace.settings(), "tracking.workspace_name=nosuch").tracking
    with pytest.raises(EquipError, match="could not read the MLflow URI of workspace nosuch"):
        azureml_uri(wrong)
    workspace.revoke()
    try:
        with pytest.raises(EquipError, match=r"\(HTTP 401\): sign in again with `az login`"):
            azureml_uri(settings)
        workspace.logout()
        with pytest.raises(
            EquipError, match="no usable Azure credentials: sign in with `az login`"
        ):
            azureml_uri(settings)
    finally:
        workspace.login()


# ---------------------------------------------------------------- what users see
def run_equip(workspace: Workspace, *args: str, env: dict[str, str] | None = None):
    """An equip command the way a user runs it (train.py ARGS, or -m MODULE ARGS)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    base |= {**workspace.environment(), "MLFLOW_TRACKING_URI": workspace.uri, **(env or {})}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, env=base, cwd=ROOT
    )


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_token_the_workspace_does_not_accept_is_one_line_naming_az_login(
    workspace: Workspace, tmp_path: Path
):
    workspace.revoke()  # az still prints a token; the workspace no longer takes it
    try:
        train = str(ROOT / "train.py")  # MLFLOW_TRACKING_URI: the workspace's URI, as exported
        proc = run_equip(workspace, train, *TINY, "tracking=azureml", f"hydra.run.dir={tmp_path}")
    finally:
        workspace.login()
    line = one_line(proc)
    assert proc.returncode == 2, line
    assert line.startswith(
        "equip: error: the Azure ML workspace did not accept equip's credentials"
    )
    assert "HTTP 401 on get_experiment_by_name" in line and "`az login`" in line
    assert workspace.rejected[-1].status == 401


def test_a_refusal_equip_does_not_expect_is_one_line_naming_the_request(workspace: Workspace):
    workspace.refuse_next("experiments/get-by-name", "the workspace is in maintenance")
    proc = run_equip(workspace, "-m", "equip.leaderboard", "latest")
    line = one_line(proc)
    assert proc.returncode == 1, line
    assert (
        "the Azure ML workspace refused a get_experiment_by_name request (HTTP 400: "
        "BAD_REQUEST: the workspace is in maintenance)" in line
    )
    assert "Traceback" not in proc.stderr


def test_a_jobs_token_reaches_the_workspace_without_the_azure_cli(workspace: Workspace, known):
    """Inside an Azure ML job azureml-mlflow takes the token from the environment."""
    token = workspace.issue()
    job = {
        "MLFLOW_TRACKING_TOKEN": token,
        "MLFLOW_RUN_ID": known["run"],
        "MLFLOW_EXPERIMENT_NAME": "standin-rules",
        "PATH": os.pathsep.join(  # no `az` on it
            p for p in os.environ["PATH"].split(os.pathsep) if p != str(workspace.folder / "bin")
        ),
    }
    proc = run_equip(workspace, "-m", "equip.leaderboard", known["run"], env=job)
    assert "is a single run, not a sweep's parent" in one_line(proc)
    assert token in workspace.used_tokens
