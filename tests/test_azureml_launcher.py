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


def one_error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stderr[-3000:]
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


def azure_sweep(
    tmp_path: Path, store: str, service: FakeAzureML, *args: str
) -> subprocess.CompletedProcess:
    """`python train.py -m hydra/launcher=azureml ... ARGS` in this process: Hydra's real
    multirun, sweeper, sweep callback and the launcher as Hydra builds it, the sweep logged to
    `store` (as MLFLOW_TRACKING_URI set at start does) and its jobs submitted to `service`, the
    stand-in for the workspace's job service (the one thing that cannot run here)."""
    from equip.launchers.azureml.service import JobService
    from tests.conftest import sweep_in_process

    tmp_path.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("equip.track.store.USER_TRACKING_URI", store)
        mp.setattr(JobService, "client", property(lambda self: service))
        return sweep_in_process(
            *LAUNCHER, *WORKSPACE, "hydra.launcher.poll_s=0", *args, cwd=tmp_path
        )


def runs_of(store: str, experiment: str = "equip") -> tuple[object, list]:
    """The sweep's parent run and its children, oldest first."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment).experiment_id
    [parent] = [r for r in client.search_runs([exp]) if "equip.sweep_key" in r.data.tags]
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, sorted(children, key=lambda r: r.info.start_time)


@pytest.mark.slow  # runs the generated commands: real (tiny) training
def test_jobs_run_as_children_of_the_sweep_and_report_their_metric(store, tmp_path):
    from mlflow import MlflowClient

    from tests.conftest import TINY

    service = FakeAzureML(store, code=project_copy(tmp_path))
    lrs = "model.lr=0.001,0.003"
    result = azure_sweep(tmp_path, store, service, "hydra.launcher.max_concurrent=1", lrs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert service.most_active == 1  # max_concurrent

    parent, children = runs_of(store)
    assert parent.info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == [
        "filters=32-64 lr=0.001",
        "filters=32-64 lr=0.003",
    ]
    by_job = {c.data.tags["equip.azureml_job"]: c for c in children}
    assert set(by_job) == set(service.submitted)
    for name, child in by_job.items():  # the launcher read each job's metric from its run
        score = child.data.metrics["best_val_acc"]  # trainer.monitor: val_acc
        assert f"best_val_acc {score:.4f} (run {child.info.run_id})" in result.stderr
        argv = shlex.split(service.submitted[name].command)
        sent = dict(a.split("=", 1) for a in argv[2:] if "=" in a)  # Hydra writes False
        assert {k: sent[k].lower() for k in dict(a.split("=", 1) for a in TINY)} == dict(
            a.split("=", 1) for a in TINY
        )
    for name in service.submitted:  # one line per state change, with the Studio URL
        for state in ("Queued", "Running", "Completed"):
            assert f": {state}  https://ml.azure.com/runs/{name}" in result.stderr
    # The run Azure ML makes for each job stays empty: training made a child of the parent.
    client = MlflowClient(store)
    job_runs = client.search_runs([client.get_experiment_by_name("equip-jobs").experiment_id])
    assert len(job_runs) == 2 and not any(r.data.metrics for r in job_runs)


def test_a_failed_job_and_a_resumed_sweep_submits_only_what_did_not_finish(store, tmp_path):
    lrs = "model.lr=0.001,0.002,0.003"
    service = FakeAzureML(store, fail=("model.lr=0.003",))
    result = azure_sweep(tmp_path, store, service, lrs)
    assert result.returncode == 4, result.stderr[-3000:]  # a sweep with failed jobs: exit 4
    assert "job failed (the sweep goes on)" in result.stderr and len(service.submitted) == 3

    service = FakeAzureML(store)  # the same command again: the parent and 2 jobs reused
    result = azure_sweep(tmp_path, store, service, lrs)
    assert result.returncode == 0, result.stderr[-3000:]
    [again] = service.submitted.values()
    assert "model.lr=0.003" in again.command
    assert result.stderr.count("already FINISHED as run") == 2
    parent, children = runs_of(store)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 3 and parent.info.status == "FINISHED"


def test_optuna_gets_each_jobs_metric_negated_when_lower_is_better(store, tmp_path):
    service = FakeAzureML(store)
    optuna = ["sweep=learning_rate", "hydra.sweeper.n_trials=3", "trainer.monitor=val_loss"]
    result = azure_sweep(tmp_path, store, service, *optuna)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = runs_of(store)
    losses = [c.data.metrics["best_val_loss"] for c in children]  # the stand-in's: lr * 100
    assert len(losses) == 3 and len(set(losses)) == 3
    results = Path(parent.data.tags["equip.sweep_dir"]) / "optimization_results.yaml"
    best = yaml.safe_load(results.read_text())
    assert best["best_value"] == pytest.approx(-min(losses))  # maximised: the lowest loss
    assert best["best_params"]["model.lr"] == pytest.approx(min(losses) / 100)


def test_a_failed_job_stops_the_sweep_when_told_to(store, tmp_path):
    service = FakeAzureML(store, fail=("model.lr=0.004",))
    stop = "multirun.continue_on_failure=false"
    result = azure_sweep(tmp_path, store, service, stop, "model.lr=0.004")
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_error_line(result, code=1)
    assert "ended Failed, it recorded no run; the sweep stops here" in line


def test_ctrl_c_cancels_submitted_jobs(store, tmp_path):
    service = FakeAzureML(store, interrupt_on_poll=True)
    lrs = "model.lr=0.001,0.002,0.003"
    result = azure_sweep(tmp_path, store, service, "hydra.launcher.max_concurrent=2", lrs)
    assert result.returncode == 130, result.stderr[-3000:]
    assert sorted(service.cancelled) == sorted(service.submitted) and len(service.cancelled) == 2
    assert "cancelled 2 Azure ML job(s); 1 were never submitted" in result.stderr
    assert "Traceback" not in result.stderr
    parent, _ = runs_of(store)  # ended as the process exits: the same command resumes it
    assert parent.info.status == "KILLED"


def test_a_refused_submission_cancels_the_others_and_is_one_line(store, tmp_path):
    service = FakeAzureML(store, refuse_after=2)
    lrs = "model.lr=0.001,0.002,0.003"
    result = azure_sweep(tmp_path, store, service, "hydra.launcher.max_concurrent=3", lrs)
    assert "equip: error: Azure ML refused job equip-" in one_error_line(result)
    assert "QuotaExceeded" in result.stderr
    assert sorted(service.cancelled) == sorted(service.submitted) and len(service.cancelled) == 2


def test_status_blips_are_retried_and_a_lasting_outage_stops_the_sweep(store, tmp_path):
    service = FakeAzureML(store)
    service.blips = 3
    result = azure_sweep(tmp_path / "a", store, service, "model.lr=0.001")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("retrying at the next poll") == 3
    assert "best_val_acc 0.9990" in result.stderr

    service = FakeAzureML(store)
    service.blips = 100
    result = azure_sweep(tmp_path / "b", store, service, "model.lr=0.002")
    assert "could not read the status of Azure ML job" in one_error_line(result)
    assert service.cancelled == list(service.submitted)


def test_a_throttled_read_is_retried_and_any_other_failing_read_stops_at_once(store, tmp_path):
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    service = FakeAzureML(store)
    service.blips, service.blip = 2, HttpResponseError("(TooManyRequests) slow down")
    service.blip.status_code = 429
    result = azure_sweep(tmp_path / "a", store, service, "model.lr=0.001")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("retrying at the next poll") == 2

    gone = ResourceNotFoundError("(UserError) job not found")
    service = FakeAzureML(store, read_error=gone)
    result = azure_sweep(tmp_path / "b", store, service, "model.lr=0.002")
    line = one_error_line(result)
    assert "Not retried: not a network or service blip" in line
    assert "ResourceNotFoundError (UserError) job not found" in line
    assert service.cancelled == list(service.submitted) and "retrying" not in result.stderr


@pytest.mark.slow  # runs the generated command: real (tiny) training, which fails
def test_a_job_that_fails_is_a_failed_job_with_its_stderr_not_a_status_read_error(store, tmp_path):
    service = FakeAzureML(store, code=project_copy(tmp_path))
    # val_fraction=0.01 passes the config checks but leaves classes without validation images.
    result = azure_sweep(tmp_path, store, service, "data.val_fraction=0.01")
    assert result.returncode == 4, result.stderr[-3000:]  # a failed job, the sweep went on
    err = result.stderr
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
