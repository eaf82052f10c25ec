"""hydra/launcher=azureml: the jobs a sweep would submit, checked with the azure-ai-ml SDK's own
job schema, and the one-line errors. Nothing here reaches Azure or any network: dry runs run with
every IPv4/IPv6 connection refused (and recorded), and azure-identity is limited to the Azure CLI
credential, which is absent here (as in tests/test_azure.py)."""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

pytest.importorskip("azure.ai.ml")
pytest.importorskip("azureml.mlflow")

from azure.ai.ml import load_job  # noqa: E402

from equip.launchers.azureml.jobs import pip_requirements  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

WORKSPACE = [
    "tracking=azureml",
    "tracking.subscription_id=00000000-0000-0000-0000-000000000000",
    "tracking.resource_group=rg",
    "tracking.workspace_name=ws",
]
LAUNCHER = ["hydra/launcher=azureml", "hydra.launcher.compute=cpu-cluster"]
# Runs train.py with outgoing connections refused; an attempt is written to NET_LOG.
NO_NETWORK = """
import os, runpy, socket, sys
_connect = socket.socket.connect
def guarded(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        with open(os.environ["NET_LOG"], "a") as f:
            f.write(repr(address) + "\\n")
        raise ConnectionRefusedError("network is off in this test")
    return _connect(self, address)
socket.socket.connect = guarded
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "EQUIP_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env["AZURE_TOKEN_CREDENTIALS"] = "AzureCliCredential"  # no metadata / token endpoint probes
    env["NET_LOG"] = str(tmp_path / "network.log")
    return subprocess.run(
        [sys.executable, "-c", NO_NETWORK, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def job_files(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("multirun/*/*/*.azureml.yaml"))


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("equip: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_dry_run_builds_every_job_of_the_architecture_sweep(tmp_path: Path):
    result = train(
        tmp_path, "-m", "sweep=architecture", *LAUNCHER, "hydra.launcher.dry_run=true", *WORKSPACE
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "network.log").exists()  # no connection was even attempted
    assert not (tmp_path / "mlflow.db").exists()  # and no local store stands in for Azure
    files = job_files(tmp_path)
    assert len(files) == 24
    assert f"job files in {files[0].parent}/*.azureml.yaml" in result.stderr

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    azure = [d for d in meta["optional-dependencies"]["azure"] if not d.startswith("azure-ai-ml")]
    expected_pip = pip_requirements(ROOT)
    assert expected_pip == meta["dependencies"] + azure  # the pins, from pyproject.toml only
    assert "mlflow==3.15.0" in expected_pip and any("azureml-mlflow" in p for p in expected_pip)
    points = set()
    for f in files:
        job = load_job(f)  # the SDK's own schema accepts the file as it is
        assert job._validate().passed
        assert job.type == "command" and job.compute == "cpu-cluster"
        assert Path(job.code) == ROOT
        assert not job.inputs  # built-in data: nothing to mount
        env = job.environment
        assert env.image.startswith("mcr.microsoft.com/azureml/")
        assert env.conda_file["dependencies"][-1]["pip"] == expected_pip
        assert job.environment_variables["EQUIP_PARENT_RUN_ID"] == "DRY-RUN-NO-PARENT-RUN"
        assert job.environment_variables["EQUIP_SWEPT_KEYS"] == (
            "model.filters,model.kernel_sizes,model.hidden,model.batch_norm"
        )
        child_tags = json.loads(job.environment_variables["MLFLOW_RUN_CONTEXT"])
        assert child_tags == {
            "equip.azureml_job": job.name,
            "equip.launch_key": job.tags["equip.launch_key"],
        }
        argv = shlex.split(job.command)
        assert argv[:2] == ["python", "train.py"] and "-m" not in argv  # a plain run: a child
        overrides = dict(a.split("=", 1) for a in argv[2:] if "=" in a)  # through its env vars
        assert overrides["sweep"] == "architecture" and overrides["tracking"] == "azureml"
        assert not any(k.startswith("tracking.") for k in overrides)  # the injected URI is used
        assert overrides["multirun.continue_on_failure"] == "false"  # the launcher decides
        remote_job = "equip.launchers.azureml.run.RemoteJob"
        assert overrides["+hydra.callbacks.azureml_job._target_"] == remote_job
        assert not any(k.startswith(("hydra/", "hydra.s")) for k in overrides)
        points.add(
            tuple(
                overrides[k]
                for k in ("model.filters", "model.kernel_sizes", "model.hidden", "model.batch_norm")
            )
        )
    grid = itertools.product(
        ["[32,64]", "[32,64,128]", "[16,32,64,128]"], ["3", "5"], ["[]", "[128]"], ["False", "True"]
    )
    assert points == set(grid)


def test_an_optuna_sweep_gets_one_job_per_trial_each_a_single_trial_on_the_cluster(tmp_path):
    result = train(
        tmp_path,
        "-m",
        "sweep=learning_rate",
        "hydra.sweeper.n_trials=2",
        *LAUNCHER,
        "hydra.launcher.dry_run=true",
        *WORKSPACE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [load_job(f) for f in job_files(tmp_path)]
    assert len(jobs) == 2
    for job in jobs:
        argv = shlex.split(job.command)
        assert "sweep=learning_rate" in argv and "-m" not in argv  # one trial = one plain run
        assert not [a for a in argv if a.startswith("hydra.sweeper")]
        assert {a.split("=")[0] for a in argv if a.startswith(("model.", "data."))} == {
            "model.lr",
            "model.weight_decay",
            "data.batch_size",
        }  # the trial's sampled values


def test_a_local_data_folder_is_an_input_and_an_azureml_path_is_used_as_is(tmp_path: Path):
    photos = tmp_path / "photos"
    for c in ("ropes", "helmets"):
        (photos / c).mkdir(parents=True)
        (photos / c / "1.png").write_bytes(b"not decoded in a dry run")
    result = train(
        tmp_path,
        "-m",
        "data=folder",
        f"data.root={photos},azureml:gear-photos:3",
        *LAUNCHER,
        "hydra.launcher.dry_run=true",
        *WORKSPACE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = job_files(tmp_path)
    written = sorted(yaml.safe_load(f.read_text())["inputs"]["data"]["path"] for f in files)
    assert written == sorted([str(photos), "azureml:gear-photos:3"])
    for j in map(load_job, files):
        assert j.inputs["data"]._data.type == "uri_folder"
        assert j.inputs["data"]._data.path in (str(photos), "gear-photos:3")  # asset name:version
        argv = shlex.split(j.command)
        assert "data.root=${{inputs.data}}" in argv  # the mounted folder, substituted by Azure ML
        assert str(photos) not in j.command


def test_a_bad_compute_name_is_one_line(tmp_path: Path):
    result = train(
        tmp_path,
        "-m",
        "model.lr=0.001,0.01",
        "hydra/launcher=azureml",
        "hydra.launcher.compute=cpu_cluster",
        "hydra.launcher.dry_run=true",
        *WORKSPACE,
    )
    line = one_error_line(result)
    assert "hydra.launcher.compute='cpu_cluster' is not an Azure ML compute name" in line
    assert not job_files(tmp_path)


def test_a_sweep_without_a_compute_is_one_line_and_leaves_no_run(tmp_path: Path):
    """Checked before the sweep callback creates the parent run (it was left KILLED)."""
    result = train(tmp_path, "-m", "model.lr=0.001,0.01", "hydra/launcher=azureml")
    assert "needs hydra.launcher.compute=NAME" in one_error_line(result)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()


def test_missing_workspace_settings_are_one_line(tmp_path: Path):
    result = train(
        tmp_path,
        "-m",
        "model.lr=0.001,0.01",
        *LAUNCHER,
        "hydra.launcher.dry_run=true",
        "tracking=azureml",
    )
    line = one_error_line(result)
    assert "missing: subscription_id, resource_group, workspace_name" in line


def test_a_sweep_on_azure_must_log_to_the_workspace(tmp_path: Path):
    result = train(tmp_path, "-m", "model.lr=0.001,0.01", *LAUNCHER, "hydra.launcher.dry_run=true")
    assert "add tracking=azureml" in one_error_line(result)


def test_without_credentials_nothing_is_submitted(tmp_path: Path):
    result = train(tmp_path, "-m", "model.lr=0.001,0.01", *LAUNCHER, *WORKSPACE)
    assert "no usable Azure credentials: sign in with `az login`" in one_error_line(result)
    assert "DefaultAzureCredential" not in result.stdout  # azure-identity's own log stays quiet
    assert not (tmp_path / "network.log").exists()


# ---------------------------------------------------------------- submission, on a stand-in service
class FakeAzureML:
    """Azure ML's job service as the launcher sees it (create_or_update, get, begin_cancel), on
    this machine. The jobs are the real SDK's CommandJob objects. A job goes Queued -> Running ->
    Completed (or Failed); when it runs, either its command really runs here (code given: a copy
    of the project as the code snapshot, the job's environment variables, MLflow pointed at the
    test's store and MLFLOW_RUN_ID at a run standing for the one Azure ML creates per job), or
    the child run the job would log is written directly (fast). A command that exits non-zero
    is a Failed job, its stderr shown, as in the job's logs on Azure. `blips` status reads fail
    with `blip` (a network error) before the service answers again; `read_error` makes every
    status read fail with it."""

    def __init__(
        self,
        store: str,
        code: Path | None = None,
        fail: tuple[str, ...] = (),
        interrupt_on_poll: bool = False,
        refuse_after: int | None = None,
        read_error: Exception | None = None,
    ):
        from azure.core.exceptions import ServiceRequestError

        self.jobs, self.store, self.code, self.fail = self, store, code, fail
        self.interrupt_on_poll, self.refuse_after = interrupt_on_poll, refuse_after
        self.blips = 0  # status reads that fail before the service answers again
        self.blip: Exception = ServiceRequestError("connection reset by peer")
        self.read_error = read_error
        self.submitted: dict[str, object] = {}
        self.states: dict[str, list[str]] = {}
        self.cancelled: list[str] = []
        self.most_active = 0

    def create_or_update(self, job):
        from types import SimpleNamespace

        if self.refuse_after is not None and len(self.submitted) >= self.refuse_after:
            from azure.core.exceptions import HttpResponseError

            raise HttpResponseError("(QuotaExceeded) the cluster's core quota is used up")
        if "EQUIP_PARENT_RUN_ID" not in job.environment_variables:  # +launch=azureml
            job.name = self._job_run(job.experiment_name, job.name)  # Azure: run id = job name
        self.submitted[job.name] = job
        self.states[job.name] = ["Queued", "Running", "Completed"]
        active = sum(s[0] not in ("Completed", "Failed") for s in self.states.values())
        self.most_active = max(self.most_active, active)
        return SimpleNamespace(
            name=job.name, status="Queued", studio_url=f"https://ml.azure.com/runs/{job.name}"
        )

    def _job_run(self, experiment: str, name: str) -> str:
        """The MLflow run Azure ML creates for every job."""
        from mlflow import MlflowClient

        client = MlflowClient(self.store)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
        return client.create_run(exp_id, run_name=name).info.run_id

    def get(self, name: str):
        from types import SimpleNamespace

        if self.interrupt_on_poll:
            raise KeyboardInterrupt
        if self.read_error is not None:
            raise self.read_error
        if self.blips:
            self.blips -= 1
            raise self.blip
        states = self.states[name]
        if len(states) > 1:
            states.pop(0)
        if states[0] == "Completed":
            states[0] = self._run(self.submitted[name])
        return SimpleNamespace(status=states[0])

    def begin_cancel(self, name: str):
        self.cancelled.append(name)

    def _run(self, job) -> str:
        from mlflow import MlflowClient

        client = MlflowClient(self.store)
        env = dict(job.environment_variables)
        if self.code is None:
            if any(f in job.command for f in self.fail):
                return "Failed"
            exp = client.get_experiment_by_name("equip").experiment_id
            tags = {
                **json.loads(env["MLFLOW_RUN_CONTEXT"]),
                "mlflow.parentRunId": env["EQUIP_PARENT_RUN_ID"],
            }
            run = client.create_run(exp, run_name=job.display_name, tags=tags)
            lr = float(next(a for a in shlex.split(job.command) if a.startswith("model.lr="))[9:])
            client.log_metric(run.info.run_id, "best_val_loss", lr * 100)
            client.log_metric(run.info.run_id, "best_val_acc", 1 - lr)
            client.set_terminated(run.info.run_id, "FINISHED")
            return "Completed"
        single = "EQUIP_PARENT_RUN_ID" not in env
        job_run = job.name if single else self._job_run(job.experiment_name, job.name)
        env.update(
            MLFLOW_TRACKING_URI=self.store,
            MLFLOW_RUN_ID=job_run,
            PATH=os.environ["PATH"],
            HOME=os.environ.get("HOME", "/root"),
        )
        argv = [sys.executable if a == "python" else a for a in shlex.split(job.command)]
        done = subprocess.run(
            argv, cwd=self.code, env=env, capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:  # on Azure: the job's std_log.txt, in the Studio
            print(f"[stand-in] job {job.name} exited {done.returncode}:", file=sys.stderr)
            print(done.stderr[-3000:], file=sys.stderr)
            return "Failed"
        return "Completed"


def project_copy(tmp_path: Path) -> Path:
    """What Azure ML unpacks from the uploaded code snapshot."""
    import shutil

    code = tmp_path / "code"
    code.mkdir()
    for part in ("train.py", "pyproject.toml"):
        shutil.copy(ROOT / part, code / part)
    for part in ("conf", "sweeps", "src"):
        shutil.copytree(ROOT / part, code / part, ignore=shutil.ignore_patterns("__pycache__"))
    return code


def launcher_for(store: str, *overrides: str):
    """The launcher as Hydra sets it up for `python train.py -m ... hydra/launcher=azureml`, and
    the sweep's parent run (what SweepTracker makes)."""
    import inspect

    import mlflow
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.utils import setup_globals
    from hydra.types import HydraContext
    from mlflow import MlflowClient
    from omegaconf import OmegaConf

    import train as train_script
    from equip.launchers.azureml.launcher import AzureMLLauncher

    setup_globals()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train", overrides=[*LAUNCHER, *WORKSPACE, *overrides], return_hydra_config=True
        )
    settings = OmegaConf.to_container(cfg.hydra.launcher)
    settings.pop("_target_")
    launcher = AzureMLLauncher(**{**settings, "poll_s": 0})
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(ROOT / "conf")))
    launcher.setup(
        hydra_context=HydraContext(config_loader=loader, callbacks=None),
        task_function=inspect.unwrap(train_script.main),
        config=cfg,
    )
    mlflow.set_tracking_uri(store)
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("equip")
    exp = exp.experiment_id if exp else client.create_experiment("equip")
    parent = client.search_runs([exp], "tags.`equip.sweep_key` = 'test'")
    if parent:
        parent_id = parent[0].info.run_id
    else:
        parent_id = client.create_run(exp, tags={"equip.sweep_key": "test"}).info.run_id
    os.environ["EQUIP_PARENT_RUN_ID"] = parent_id
    os.environ["EQUIP_SWEPT_KEYS"] = "model.lr"
    return launcher, parent_id


@pytest.fixture
def sweep_env(monkeypatch):
    monkeypatch.delenv("EQUIP_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("EQUIP_SWEPT_KEYS", raising=False)
    yield
    os.environ.pop("EQUIP_PARENT_RUN_ID", None)
    os.environ.pop("EQUIP_SWEPT_KEYS", None)


@pytest.mark.slow  # runs the generated commands: real (tiny) training
def test_jobs_run_as_children_of_the_sweep_and_return_their_metric(
    store, tmp_path, sweep_env, capsys
):
    from mlflow import MlflowClient

    from tests.conftest import TINY

    code = project_copy(tmp_path)
    launcher, parent = launcher_for(store, "hydra.launcher.max_concurrent=1")
    service = FakeAzureML(store, code=code)
    launcher.service.client = service
    points = [[*TINY, "tracking.log_model=false", f"model.lr={lr}"] for lr in (0.001, 0.003)]
    returns = launcher.launch(points, initial_job_idx=0)

    assert service.most_active == 1  # max_concurrent
    client = MlflowClient(store)
    exp = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(c.info.run_name for c in children) == [
        "filters=32-64 lr=0.001",
        "filters=32-64 lr=0.003",
    ]
    by_job = {c.data.tags["equip.azureml_job"]: c for c in children}
    assert set(by_job) == set(service.submitted)
    for ret, name in zip(returns, service.submitted, strict=True):
        assert ret.return_value == by_job[name].data.metrics["best_val_acc"]  # monitor: val_acc
    err = capsys.readouterr().err
    for name in service.submitted:  # one line per state change, with the Studio URL
        for state in ("Queued", "Running", "Completed"):
            assert f": {state}  https://ml.azure.com/runs/{name}" in err
    # The run Azure ML makes for each job stays empty: training made a child of the parent.
    job_runs = client.search_runs([client.get_experiment_by_name("equip-jobs").experiment_id])
    assert len(job_runs) == 2 and not any(r.data.metrics for r in job_runs)


def test_resume_failures_and_lower_is_better(store, sweep_env, capsys):
    over = ["trainer.monitor=val_loss"]  # lower is better
    points = [[*over, f"model.lr={lr}"] for lr in (0.001, 0.002, 0.003)]
    launcher, _ = launcher_for(store)
    launcher.service.client = service = FakeAzureML(store, fail=("model.lr=0.003",))
    returns = launcher.launch(points, initial_job_idx=0)
    values = [r.return_value for r in returns]
    assert values[:2] == pytest.approx([-0.1, -0.2])  # val_loss, negated for the sweeper
    assert values[2] == float("-inf")  # failed (the worst score), and the sweep goes on
    assert "job failed" in capsys.readouterr().err

    # Resumed: finished jobs are not submitted again; the failed one is.
    launcher, _ = launcher_for(store)
    launcher.service.client = service = FakeAzureML(store)
    returns = launcher.launch(points, initial_job_idx=0)
    assert len(service.submitted) == 1
    assert "model.lr=0.003" in next(iter(service.submitted.values())).command
    assert [r.return_value for r in returns] == pytest.approx([-0.1, -0.2, -0.3])
    assert capsys.readouterr().err.count("already FINISHED as run") == 2

    launcher, _ = launcher_for(store)
    launcher.service.client = FakeAzureML(store, fail=("model.lr=0.004",))
    point = [*over, "multirun.continue_on_failure=false", "model.lr=0.004"]
    (ret,) = launcher.launch([point], initial_job_idx=3)
    with pytest.raises(RuntimeError, match="ended Failed"):
        _ = ret.return_value  # Hydra's sweeper raises it and the sweep stops


def test_ctrl_c_cancels_submitted_jobs(store, sweep_env, capsys):
    launcher, _ = launcher_for(store, "hydra.launcher.max_concurrent=2")
    launcher.service.client = service = FakeAzureML(store, interrupt_on_poll=True)
    with pytest.raises(KeyboardInterrupt):
        launcher.launch([[f"model.lr={lr}"] for lr in (0.001, 0.002, 0.003)], initial_job_idx=0)
    assert sorted(service.cancelled) == sorted(service.submitted) and len(service.cancelled) == 2
    assert "cancelled 2 Azure ML job(s); 1 were never submitted" in capsys.readouterr().err


def test_a_refused_submission_cancels_the_others_and_is_one_line(store, sweep_env, capsys):
    launcher, _ = launcher_for(store, "hydra.launcher.max_concurrent=3")
    launcher.service.client = service = FakeAzureML(store, refuse_after=2)
    with pytest.raises(SystemExit) as stop:
        launcher.launch([[f"model.lr={lr}"] for lr in (0.001, 0.002, 0.003)], initial_job_idx=0)
    assert stop.value.code == 2
    assert sorted(service.cancelled) == sorted(service.submitted) and len(service.cancelled) == 2
    err = capsys.readouterr().err
    assert "equip: error: Azure ML refused job equip-" in err and "QuotaExceeded" in err


def test_status_blips_are_retried_and_a_lasting_outage_stops_the_sweep(store, sweep_env, capsys):
    launcher, _ = launcher_for(store)
    launcher.service.client = service = FakeAzureML(store)
    service.blips = 3
    (ret,) = launcher.launch([["model.lr=0.001"]], initial_job_idx=0)
    assert ret.return_value == pytest.approx(0.999)
    assert capsys.readouterr().err.count("retrying at the next poll") == 3

    launcher, _ = launcher_for(store)
    launcher.service.client = service = FakeAzureML(store)
    service.blips = 100
    with pytest.raises(SystemExit):
        launcher.launch([["model.lr=0.002"]], initial_job_idx=1)
    assert service.cancelled == list(service.submitted)
    assert "could not read the status of Azure ML job" in capsys.readouterr().err


def test_a_throttled_read_is_retried_and_any_other_failing_read_stops_at_once(
    store, sweep_env, capsys
):
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    launcher, _ = launcher_for(store)
    launcher.service.client = service = FakeAzureML(store)
    service.blips, service.blip = 2, HttpResponseError("(TooManyRequests) slow down")
    service.blip.status_code = 429
    (ret,) = launcher.launch([["model.lr=0.001"]], initial_job_idx=0)
    assert ret.return_value == pytest.approx(0.999)
    assert capsys.readouterr().err.count("retrying at the next poll") == 2

    launcher, _ = launcher_for(store)
    gone = ResourceNotFoundError("(UserError) job not found")
    launcher.service.client = service = FakeAzureML(store, read_error=gone)
    with pytest.raises(SystemExit):
        launcher.launch([["model.lr=0.002"]], initial_job_idx=1)
    assert service.cancelled == list(service.submitted)
    err = capsys.readouterr().err
    assert "retrying" not in err and "Not retried: not a network or service blip" in err
    assert "ResourceNotFoundError (UserError) job not found" in err


@pytest.mark.slow  # runs the generated command: real (tiny) training, which fails
def test_a_job_that_fails_is_a_failed_job_with_its_stderr_not_a_status_read_error(
    store, tmp_path, sweep_env, capsys
):
    from tests.conftest import TINY

    launcher, _ = launcher_for(store)
    launcher.service.client = service = FakeAzureML(store, code=project_copy(tmp_path))
    # val_fraction=0.01 passes the config checks but leaves classes without validation images.
    point = [*TINY, "tracking.log_model=false", "data.val_fraction=0.01"]
    (ret,) = launcher.launch([point], initial_job_idx=0)
    assert ret.return_value == float("-inf")  # failed: the worst score, and the sweep goes on
    err = capsys.readouterr().err
    [name] = service.submitted
    assert f": Failed  https://ml.azure.com/runs/{name}" in err and "job failed" in err
    assert f"[stand-in] job {name} exited 2:" in err, err[-3000:]
    assert "no validation image" in err, err[-3000:]
    assert "could not read the status" not in err and not service.cancelled


# ---------------------------------------------------------------- a single run: +launch=azureml
def test_a_single_run_dry_run_writes_one_plain_run_job(tmp_path: Path):
    result = train(
        tmp_path,
        "+launch=azureml",
        "launch.compute=cpu-cluster",
        "launch.dry_run=true",
        *WORKSPACE,
        "model.lr=0.003",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "network.log").exists() and not (tmp_path / "mlflow.db").exists()
    [path] = tmp_path.glob("outputs/*/*/*.azureml.yaml")
    assert f"job file {path}" in result.stderr
    job = load_job(path)
    assert shlex.split(job.command) == [
        "python",
        "train.py",
        "tracking=azureml",
        "model.lr=0.003",
        "trainer.progress_bar=false",
    ]
    assert job.compute == "cpu-cluster" and job.experiment_name == "equip"
    assert "EQUIP_PARENT_RUN_ID" not in job.environment_variables  # no sweep, no parent


@pytest.mark.slow  # runs the generated commands: real (tiny) training
def test_a_single_run_trains_on_the_cluster_into_the_jobs_own_run(
    store, tmp_path, monkeypatch, capsys
):
    from hydra import compose, initialize_config_dir
    from mlflow import MlflowClient

    from equip.launchers.azureml.run import SubmitRun
    from equip.launchers.azureml.service import JobService
    from tests.conftest import TINY

    code = project_copy(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py")])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "+launch=azureml",
                "launch.compute=cpu-cluster",
                "launch.poll_s=0",
                *WORKSPACE,
                *TINY,
                "tracking.log_model=false",
                "model.lr=0.003",
            ],
            return_hydra_config=True,
        )
    service = FakeAzureML(store, code=code)
    jobs = JobService(cfg.tracking, "cpu-cluster", "launch")
    jobs.client = service
    monkeypatch.setattr(SubmitRun, "service", lambda self, config, settings: jobs)
    monkeypatch.setattr("equip.track.store.resolve_uri", lambda tracking: store)
    with pytest.raises(SystemExit) as done:
        SubmitRun().on_run_start(cfg)
    assert done.value.code == 0
    [name] = service.submitted
    run = MlflowClient(store).get_run(name)  # the run Azure ML made for the job, trained into
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("filters=32-64 lr=0.003")
    assert "best_val_acc" in run.data.metrics
    err = capsys.readouterr().err
    assert f"Completed  https://ml.azure.com/runs/{name}" in err
    assert "done filters=32-64 lr=0.003 image_size=32" in err and ": val_acc" in err


def test_a_single_run_with_a_bad_config_fails_here(tmp_path: Path):
    result = train(
        tmp_path,
        "+launch=azureml",
        "launch.compute=cpu-cluster",
        "launch.dry_run=true",
        *WORKSPACE,
        "model.filters=[8,8,8,8,8,8,8,8]",
    )
    assert "8 pooling blocks shrink a 128 px image" in one_error_line(result)
    assert not list(tmp_path.glob("outputs/*/*/*.azureml.yaml"))
