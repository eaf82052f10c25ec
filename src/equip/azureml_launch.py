"""`hydra/launcher=azureml`: every job of a sweep runs as an Azure ML command job on a cluster.

    python train.py -m sweep=architecture tracking=azureml tracking.config_path=config.json \
        hydra/launcher=azureml hydra.launcher.compute=cpu-cluster

The sweep itself stays on this machine: Hydra's sweeper (grid or Optuna) picks the points, the
`SweepTracker` callback creates the MLflow parent run in the workspace, and this launcher turns
each point into a command job built with the azure-ai-ml SDK:

- code: the project folder (the one holding train.py), uploaded by the SDK (it honours
  .gitignore / .amlignore);
- environment: a curated Azure ML base image plus a conda file generated here from the project's
  own pyproject.toml (dependencies and the `azure` extra), so the pins live in one place; Azure ML
  caches the built image by content, so jobs and later sweeps reuse it;
- data: `data.root` becomes the `data` input: a local folder is uploaded once (a data asset named
  after the folder, versioned by a fingerprint of its file list) and an `azureml:` path is used as
  it is; the job reads the mounted folder through `data.root=${{inputs.data}}`;
- command: `python train.py -m` with exactly the job's overrides (shell-quoted), minus the
  `tracking.*` keys that locate the workspace from outside (the job logs through the MLflow URI
  that Azure ML injects), plus a few `hydra.*` overrides that make the job a one-point multirun
  without the sweep callback, so that it is a child of the sweep's parent run
  (EQUIP_PARENT_RUN_ID and EQUIP_SWEPT_KEYS in its environment).

The launcher keeps up to `max_concurrent` jobs submitted, prints one line per state change with
the Studio URL, and returns each job's `best_<trainer.monitor>` (negated when lower is better), read
from its child run, so Optuna and the leaderboard work as they do locally. Ctrl-C cancels the
submitted jobs. `dry_run=true` builds every job, validates it with the SDK's own schema
(`azure.ai.ml.load_job`) and writes `<job>.azureml.yaml` files into the sweep folder, with no
network call at all.

`python train.py +launch=azureml launch.compute=NAME ...` sends one run the same way
(`SubmitRun`, a Hydra callback added by conf/launch/azureml.yaml).

torch, lightning and azure-ai-ml are imported only when a sweep launches.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.markup import escape

from equip import sweeps, tracking
from equip.errors import EquipError

log = logging.getLogger(__name__)
console = Console(stderr=True, soft_wrap=True, highlight=False)

DEFAULT_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"
# Azure ML compute names: a letter first, then letters, digits and hyphens (clusters allow
# 2-16 characters, compute instances up to 24); checked here so a typo fails before any upload.
COMPUTE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,23}$")
# Of the tracking.* overrides a job keeps only these: the rest locate the workspace from outside
# (a job logs through the MLflow URI Azure ML injects), and data.root becomes the data input.
REMOTE_TRACKING_KEEP = ("tracking.experiment", "tracking.log_model")
LAUNCHER_ONLY = {"azure-ai-ml"}  # in the `azure` extra for this launcher; jobs do not need it
TERMINAL = {"Completed", "Failed", "Canceled", "NotResponding"}
DRY_RUN_PARENT = "DRY-RUN-NO-PARENT-RUN"
MAX_POLL_ERRORS = 10  # status reads failing in a row before the sweep gives up (and cancels)
JOB_TAG = "equip.azureml_job"  # tag of the child run: the Azure ML job that trained it
KEY_TAG = "equip.launch_key"  # tag of the child run: its overrides and data, for resume


@dataclass
class AzureJob:
    """One sweep point as a command job, before and after submission."""

    idx: int
    overrides: list[str]
    cfg: DictConfig
    name: str
    display_name: str
    launch_key: str
    job: Any  # azure.ai.ml.entities.CommandJob
    local_data: Path | None = None
    status: str = "NotSubmitted"
    url: str = ""
    result: JobReturn | None = None


class AzureMLLauncher(Launcher):
    """Hydra launcher submitting each job to an Azure ML compute cluster (see module doc)."""

    def __init__(
        self,
        compute: str | None = None,
        max_concurrent: int = 4,
        dry_run: bool = False,
        image: str = DEFAULT_IMAGE,
        python: str | None = None,
        pins: str = "pyproject",
        pip_extra_index_url: str | None = None,
        experiment_name: str | None = None,
        data_mode: str = "ro_mount",
        poll_s: float = 20.0,
        **_: Any,
    ) -> None:
        super().__init__()
        self.compute = compute
        self.max_concurrent = max(1, int(max_concurrent))
        self.dry_run = bool(dry_run)
        self.image = image
        self.python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
        self.pins = pins
        self.pip_extra_index_url = pip_extra_index_url
        self.experiment_name = experiment_name
        self.data_mode = data_mode
        self.poll_s = float(poll_s)
        self.config: DictConfig | None = None
        self.hydra_context: Any = None
        self.task_function: Any = None
        self._client: Any = None
        self._poll_errors = 0
        self._uploaded: dict[Path, str] = {}  # local data folder -> azureml:name:version
        self._tag = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    # ------------------------------------------------------------------ launch
    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        try:
            return self._launch(job_overrides, initial_job_idx)
        except EquipError as e:
            console.print(f"[bold red]equip: error:[/] {escape(str(e))}")
            raise SystemExit(2) from None

    def _launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None
        config = self.config
        check_settings(config, self.compute)
        try:
            import azure.ai.ml  # noqa: F401
        except ImportError:
            raise EquipError(
                'hydra/launcher=azureml needs the Azure extra: pip install -e ".[azure]"'
            ) from None
        logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
        logging.getLogger("azure.identity").setLevel(logging.ERROR)  # failures: one line below
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        project = project_root(self.task_function)
        environment = build_environment(
            project, self.image, self.python, self.pins, self.pip_extra_index_url
        )
        parent = DRY_RUN_PARENT if self.dry_run else os.environ.get(sweeps.PARENT_ENV)
        if not parent:
            raise EquipError("hydra/launcher=azureml runs only in a sweep (python train.py -m ...)"
                             " with the equip.sweeps.SweepTracker callback.")  # fmt: skip
        jobs = [
            self._build(initial_job_idx + i, list(o), project, environment, parent)
            for i, o in enumerate(job_overrides)
        ]
        if self.dry_run:
            return self._write_dry_run(jobs, sweep_dir)
        return self._run(jobs, parent)

    def _build(
        self, idx: int, overrides: list[str], project: Path, environment: Any, parent: str
    ) -> AzureJob:
        from azure.ai.ml import Input, command

        assert self.config is not None and self.hydra_context is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        name = f"equip-{self._tag}-{idx:03d}"
        display = tracking.run_name(cfg, sweeps.job_name_overrides(overrides))
        inputs: dict[str, Any] = {}
        cwd = OmegaConf.select(cfg, "hydra.runtime.cwd", default=None) or os.getcwd()
        data_path, local = data_input(cfg, Path(str(cwd)))
        if data_path is not None:
            inputs["data"] = Input(type="uri_folder", path=data_path, mode=self.data_mode)
        key = launch_key(overrides, local or data_path)
        env_vars = {
            sweeps.PARENT_ENV: parent,
            sweeps.SWEPT_ENV: os.environ.get(sweeps.SWEPT_ENV, ""),
            # Tags of the child run that the job creates: how this launcher finds it again.
            "MLFLOW_RUN_CONTEXT": json.dumps({JOB_TAG: name, KEY_TAG: key}),
            "PYTHONPATH": "src",
        }
        node = command(
            name=name,
            display_name=display[:250],
            experiment_name=self.experiment_name or f"{cfg.tracking.experiment}-jobs",
            description=describe(idx, overrides),
            command=remote_command(self.config, cfg, overrides, data_path is not None),
            code=str(project),
            environment=environment,
            compute=self.compute,
            inputs=inputs,
            environment_variables=env_vars,
            tags={"equip.parent_run_id": parent, KEY_TAG: key, "equip.job_idx": str(idx)},
        )
        return AzureJob(idx, overrides, cfg, name, display, key, node._to_job(), local)

    # ------------------------------------------------------------------ dry run
    def _write_dry_run(self, jobs: list[AzureJob], sweep_dir: Path) -> list[JobReturn]:
        for j in jobs:
            write_job_file(j, sweep_dir / f"{j.name}.azureml.yaml")
            # 0.0, not NaN: Optuna (2.10, as hydra-optuna-sweeper pins it) rejects NaN values.
            j.result = job_return(j, 0.0, JobStatus.COMPLETED, sweep_dir)
        console.print(f"dry run: {len(jobs)} Azure ML job(s) validated, nothing submitted; job "
                      f"files in {sweep_dir.resolve()}/*.azureml.yaml")  # fmt: skip
        return [j.result for j in jobs if j.result is not None]

    # ------------------------------------------------------------------ real run
    def _ml_client(self) -> Any:
        if self._client is None:
            from azure.ai.ml import MLClient
            from azure.identity import DefaultAzureCredential

            assert self.config is not None
            sub, group, ws = tracking._workspace(self.config.tracking)
            credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
            client = MLClient(credential, sub, group, ws)
            with azure_errors(f"workspace {ws}"):
                try:
                    client.compute.get(self.compute)
                except Exception as e:
                    if type(e).__name__ != "ResourceNotFoundError":
                        raise
                    names = [c.name for c in client.compute.list()]
                    raise EquipError(
                        f"hydra.launcher.compute={self.compute}: no such compute in workspace "
                        f"{ws}. Create it (az ml compute create --type amlcompute --name "
                        f"{self.compute} ...) or use one of: {', '.join(names) or 'none'}."
                    ) from None
            self._client = client
        return self._client

    def _data_asset(self, client: Any, local: Path) -> str:
        """Upload a local data folder once: a data asset versioned by its file list."""
        if local not in self._uploaded:
            from azure.ai.ml.entities import Data

            name = "equip-" + (re.sub(r"[^A-Za-z0-9_-]", "-", local.name)[:40] or "data")
            version = folder_fingerprint(local)[:12]
            with azure_errors(f"data asset {name}"):
                try:
                    asset = client.data.get(name, version=version)
                except Exception as e:
                    if type(e).__name__ != "ResourceNotFoundError":
                        raise
                    where = escape(str(local))
                    console.print(f"uploading {where} as data asset {name}:{version} (once)")
                    asset = client.data.create_or_update(Data(
                        name=name, version=version, path=str(local), type="uri_folder",
                        description=f"equip data.root={local}"))  # fmt: skip
            self._uploaded[local] = f"azureml:{asset.name}:{asset.version}"
        return self._uploaded[local]

    def _run(self, jobs: list[AzureJob], parent: str) -> list[JobReturn]:
        from mlflow import MlflowClient

        assert self.config is not None
        client = self._ml_client()
        mlflow_client = MlflowClient()
        exp_id = mlflow_client.get_run(parent).info.experiment_id
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        finished = finished_children(mlflow_client, exp_id, parent)
        todo: list[AzureJob] = []
        for j in jobs:
            twin = finished.get(j.launch_key) if setting(j.cfg, "resume", True) else None
            if twin is not None:
                console.print(f"[yellow]skipped[/] {escape(j.display_name)}: already FINISHED "
                              f"as run {twin.info.run_id}")  # fmt: skip
                j.result = job_return(j, monitored(j.cfg, twin), JobStatus.COMPLETED, sweep_dir)
            else:
                if j.local_data is not None:
                    j.job.inputs["data"].path = self._data_asset(client, j.local_data)
                todo.append(j)
        waiting, active = list(todo), []
        if todo:
            console.print(f"submitting {len(todo)} job(s) to Azure ML compute {self.compute}, "
                          f"{self.max_concurrent} at a time")  # fmt: skip
        try:
            while waiting or active:
                while waiting and len(active) < self.max_concurrent:
                    j = waiting.pop(0)
                    with azure_errors(f"job {j.name}"):
                        created = client.jobs.create_or_update(j.job)
                    j.url = getattr(created, "studio_url", "") or ""
                    self._report(j, created.status or "Submitted")
                    active.append(j)
                time.sleep(self.poll_s)
                for j in list(active):
                    status = self._poll(client, j)
                    if status != j.status:
                        self._report(j, status)
                    if status in TERMINAL:
                        active.remove(j)
                        j.result = self._collect(j, mlflow_client, exp_id, parent, sweep_dir)
        except (KeyboardInterrupt, EquipError) as stop:  # Ctrl-C, or Azure refused something
            for j in active:
                try:
                    client.jobs.begin_cancel(j.name)
                except Exception as e:  # best effort: say which one is still running
                    console.print(f"could not cancel {j.name}: {escape(str(e))} ({j.url})")
            why = "interrupted" if isinstance(stop, KeyboardInterrupt) else "stopped"
            console.print(f"[bold red]{why}:[/] cancelled {len(active)} Azure ML job(s); "
                          f"{len(waiting)} were never submitted")  # fmt: skip
            raise
        return [j.result for j in jobs if j.result is not None]

    def _poll(self, client: Any, j: AzureJob) -> str:
        """The job's status; a blip (network, throttling) is retried at the next poll, and only
        MAX_POLL_ERRORS failures in a row stop the sweep."""
        try:
            status = client.jobs.get(j.name).status
        except Exception as e:
            self._poll_errors += 1
            if self._poll_errors >= MAX_POLL_ERRORS:
                why = f"{type(e).__name__} {(str(e).strip().splitlines() or [''])[0]}"
                raise EquipError(f"could not read the status of Azure ML job {j.name} "
                                 f"{self._poll_errors} times in a row: {why}. Check the "
                                 "network and your access.") from None  # fmt: skip
            console.print(f"could not read the status of {j.name} ({type(e).__name__}); "
                          "retrying at the next poll")  # fmt: skip
            return j.status
        self._poll_errors = 0
        return status

    def _report(self, j: AzureJob, status: str) -> None:
        j.status = status
        console.print(f"\\[azureml] #{j.idx} {escape(j.display_name)}: {status}  {j.url}")

    def _collect(
        self, j: AzureJob, mlflow_client: Any, exp_id: str, parent: str, sweep_dir: Path
    ) -> JobReturn:
        runs = mlflow_client.search_runs(
            [exp_id],
            f"tags.mlflow.parentRunId = '{parent}' and tags.`{JOB_TAG}` = '{j.name}'",
            max_results=1,
        )
        run = runs[0] if runs else None
        if run is None and j.status == "Completed":  # skipped inside the job: a FINISHED twin
            run = finished_children(mlflow_client, exp_id, parent).get(j.launch_key)
        if j.status == "Completed" and run is not None and run.info.status == "FINISHED":
            value = monitored(j.cfg, run)
            metric = f"best_{j.cfg.trainer.monitor}"
            score = run.data.metrics.get(metric, math.nan)
            console.print(f"[bold green]done[/] {escape(j.display_name)}: {metric} {score:.4f} "
                          f"(run {run.info.run_id})")  # fmt: skip
            return job_return(j, value, JobStatus.COMPLETED, sweep_dir)
        why = f"Azure ML job {j.name} ended {j.status}" + (
            f", its run is {run.info.status}" if run is not None else ", it recorded no run"
        )
        if setting(j.cfg, "continue_on_failure", True):
            console.print(f"[bold red]job failed[/] (the sweep goes on): {escape(why)}  {j.url}")
            return job_return(j, math.nan, JobStatus.COMPLETED, sweep_dir)
        return job_return(j, RuntimeError(f"{why}: {j.url}"), JobStatus.FAILED, sweep_dir)


# ---------------------------------------------------------------- pieces, testable offline
def write_job_file(j: AzureJob, path: Path) -> None:
    """The job as the YAML `az ml job create --file` takes, checked with the SDK's own schema."""
    import yaml
    from azure.ai.ml import load_job

    spec = json.loads(json.dumps(j.job._to_dict()))
    if j.local_data is not None:  # the SDK writes local paths as `azureml:<path>`
        spec["inputs"]["data"]["path"] = str(j.local_data)
    path.write_text(yaml.safe_dump(spec, sort_keys=False, width=1000))
    try:
        load_job(path)._validate().try_raise()  # offline
    except Exception as e:
        why = str(e).splitlines()[0]
        raise EquipError(f"job {j.idx} ({' '.join(j.overrides)}) does not pass the Azure ML "
                         f"job schema: {why}") from None  # fmt: skip


def check_settings(config: DictConfig, compute: str | None) -> None:
    """Everything that can be wrong before the SDK is touched, as one EquipError."""
    if not compute:
        raise EquipError("hydra/launcher=azureml needs hydra.launcher.compute=NAME, the name of "
                         "a compute cluster in the workspace.")  # fmt: skip
    if not COMPUTE_NAME.match(str(compute)) or str(compute).endswith("-"):
        raise EquipError(f"hydra.launcher.compute={compute!r} is not an Azure ML compute name: "
                         "2-24 letters, digits or hyphens, starting with a letter, e.g. "
                         "hydra.launcher.compute=cpu-cluster.")  # fmt: skip
    kind = config.tracking.get("kind")
    if kind != "azureml" and not str(tracking.USER_TRACKING_URI or "").startswith("azureml:"):
        raise EquipError("hydra/launcher=azureml logs the sweep to the workspace: add "
                         "tracking=azureml with tracking.config_path=config.json (or "
                         "tracking.subscription_id, tracking.resource_group, "
                         "tracking.workspace_name).")  # fmt: skip
    tracking._workspace(config.tracking)  # names the missing keys


def project_root(task_function: Any) -> Path:
    """The folder of the script Hydra runs (train.py): the code snapshot of every job."""
    import inspect

    source = inspect.getsourcefile(task_function) if task_function is not None else None
    return project_root_of(Path(source) if source else Path.cwd() / "train.py")


def pip_requirements(project: Path, pins: str = "pyproject") -> list[str]:
    """The project's dependencies plus its `azure` extra (minus launcher-only packages), read from
    pyproject.toml. pins=installed pins each to the version installed here instead."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    reqs = [*meta.get("dependencies", []), *meta.get("optional-dependencies", {}).get("azure", [])]
    out = []
    for text in reqs:
        req = Requirement(text)
        if req.name in LAUNCHER_ONLY or req.name == meta["name"]:
            continue
        if pins == "installed":
            with contextlib.suppress(PackageNotFoundError):  # not installed: as declared
                text = f"{req.name}=={version(req.name).split('+')[0]}"  # no local labels (+cpu)
        elif pins != "pyproject":
            raise EquipError(f"hydra.launcher.pins={pins!r}: use pyproject or installed.")
        out.append(text)
    return out


def conda_spec(project: Path, python: str, pins: str, extra_index_url: str | None) -> dict:
    pip = pip_requirements(project, pins)
    if extra_index_url:
        pip.insert(0, f"--extra-index-url {extra_index_url}")
    return {"name": "equip", "channels": ["conda-forge"],
            "dependencies": [f"python={python}", "pip", {"pip": pip}]}  # fmt: skip


def build_environment(
    project: Path, image: str, python: str, pins: str, extra_index_url: str | None
) -> Any:
    """An anonymous environment: base image + generated conda file. Azure ML names it by a hash
    of its content, so an unchanged pyproject.toml reuses the image built before."""
    from azure.ai.ml.entities import Environment

    return Environment(
        image=image, conda_file=conda_spec(project, python, pins, extra_index_url),
        description="equip: generated from pyproject.toml by hydra/launcher=azureml",
    )  # fmt: skip


def data_input(cfg: DictConfig, cwd: Path) -> tuple[str | None, Path | None]:
    """(input path, local folder) for the job's data.root; (None, None) for built-in data."""
    root = OmegaConf.select(cfg, "data.root", default=None, throw_on_missing=False)
    if root is None or cfg.data.get("kind") == "synthetic":
        return None, None
    root = str(root)
    if re.match(r"^(azureml:|https://|wasbs://|abfss://|adl://)", root):
        return root, None
    local = Path(root).expanduser()
    local = (local if local.is_absolute() else cwd / local).resolve()
    if not local.is_dir():
        raise EquipError(f"data.root={root}: no such folder ({local}); give a local folder to "
                         "upload or an azureml:NAME:VERSION / azureml:// data path.")  # fmt: skip
    return str(local), local


@functools.lru_cache(maxsize=16)
def folder_fingerprint(folder: Path) -> str:
    """Cheap identity of a folder's content: relative paths, sizes and modification times."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def launch_key(overrides: Sequence[str], data: Path | str | None) -> str:
    """Identity of a job for resume: the overrides that define what it trains, and its data."""
    keep = [o for o in sweeps._key_overrides(overrides) if not _key(o).startswith("data.root")]
    data_id = folder_fingerprint(data) if isinstance(data, Path) else str(data or "")
    return hashlib.sha256(repr([keep, data_id]).encode()).hexdigest()[:16]


def describe(idx: int, overrides: Sequence[str]) -> str:
    shown = tracking.redact_overrides(sweeps._key_overrides(overrides))
    return f"equip sweep job {idx}: {' '.join(shown)}"[:1000]


def _remote_keeps(key: str) -> bool:
    if key == "data.root":
        return False
    return not key.startswith("tracking.") or key in REMOTE_TRACKING_KEEP


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def setting(cfg: DictConfig, name: str, default: Any) -> Any:
    """A multirun setting under its new name (multirun.*) or its old one (sweep.*)."""
    for section in ("multirun", "sweep"):
        node = cfg.get(section)
        if isinstance(node, DictConfig) and name in node:
            return node[name]
    return default


def _setting_key(cfg: DictConfig, name: str) -> str | None:
    for section in ("multirun", "sweep"):
        node = cfg.get(section)
        if isinstance(node, DictConfig) and name in node:
            return f"{section}.{name}"
    return None


def remote_command(
    config: DictConfig, cfg: DictConfig, overrides: Sequence[str], has_data: bool
) -> str:
    """`python train.py -m` with the job's own overrides, as one job of a one-point multirun:
    no sweep callback (the parent exists), the basic launcher, and no sweep parameters."""
    args = [o for o in overrides if _remote_keeps(_key(o))]
    if has_data:
        args.append("data.root=${{inputs.data}}")
    for name, cb in (config.hydra.get("callbacks") or {}).items():
        if str(cb.get("_target_", "")) == "equip.sweeps.SweepTracker":
            args.append(f"~hydra.callbacks.{name}")
    args.append(f"+hydra.callbacks.azureml_job._target_={__name__}.RemoteJob")
    args += ["hydra/launcher=basic", "hydra.sweep.dir=outputs/hydra", "hydra.sweeper.params=null"]
    sweeper = cfg.hydra.sweeper
    for key, value in (("n_trials", 1), ("n_jobs", 1), ("storage", "null")):
        if key in sweeper:  # Optuna: one trial, all of whose values are fixed overrides
            args.append(f"hydra.sweeper.{key}={value}")
    failure = _setting_key(cfg, "continue_on_failure")
    if failure:  # a failed training fails the Azure ML job; the launcher decides for the sweep
        args.append(f"{failure}=false")
    if "trainer" in cfg and "progress_bar" in cfg.trainer:
        args.append("trainer.progress_bar=false")  # logs, not a terminal
    return "python train.py -m " + " ".join(shlex.quote(a) for a in args)


def finished_children(client: Any, exp_id: str, parent: str) -> dict[str, Any]:
    """FINISHED children of the parent by launch key: what a resumed sweep does not resubmit."""
    runs = client.search_runs(
        [exp_id],
        f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'FINISHED'",
        max_results=5000,
    )
    return {r.data.tags[KEY_TAG]: r for r in runs if KEY_TAG in r.data.tags}


def monitored(cfg: DictConfig, run: Any) -> float:
    """What the sweeper maximises, as run_training returns it locally."""
    value = float(run.data.metrics.get(f"best_{cfg.trainer.monitor}", math.nan))
    return -value if cfg.trainer.monitor_mode == "min" else value


def job_return(j: AzureJob, value: Any, status: JobStatus, sweep_dir: Path) -> JobReturn:
    cfg = j.cfg.copy()
    hydra_cfg = OmegaConf.create({"hydra": cfg.hydra})
    with open_dict(cfg):
        del cfg["hydra"]
    return JobReturn(overrides=j.overrides, cfg=cfg, hydra_cfg=hydra_cfg,
                     working_dir=str(sweep_dir), task_name=str(hydra_cfg.hydra.job.name),
                     status=status, _return_value=value)  # fmt: skip


class azure_errors:  # noqa: N801  # used as `with azure_errors(what):`
    """Azure SDK failures -> one EquipError line saying what to do."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> bool:
        if error is None or isinstance(error, EquipError | KeyboardInterrupt):
            return False
        name = type(error).__name__
        text = str(error).strip().splitlines()[0] if str(error).strip() else name
        if name in ("ClientAuthenticationError", "CredentialUnavailableError"):
            raise EquipError(
                "no usable Azure credentials: sign in with `az login`, or set AZURE_CLIENT_ID, "
                f"AZURE_TENANT_ID and AZURE_CLIENT_SECRET for a service principal. ({text})"
            ) from None
        if name in ("ServiceRequestError", "ServiceRequestTimeoutError", "ConnectionError"):
            raise EquipError(
                f"cannot reach Azure for {self.what}: {text}. Check the network "
                "or proxy; hydra.launcher.dry_run=true works offline."
            ) from None
        if name in ("HttpResponseError", "ResourceNotFoundError", "ValidationException",
                    "ValidationError", "UserErrorException"):  # fmt: skip
            raise EquipError(f"Azure ML refused {self.what}: {text}") from None
        return False


# ---------------------------------------------------------------- inside the Azure ML job
class RemoteJob(Callback):
    """Added to every job's command: makes the job's training run a new child of the sweep's
    parent instead of the run Azure ML created for the job.

    Azure ML sets MLFLOW_RUN_ID, and mlflow.start_run() would resume that run (dropping the parent
    link). azureml-mlflow authenticates with the job's token while that variable is set and keeps
    the result per tracking URI, so the store is opened first, then the variable is removed."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not (uri and os.environ.get("MLFLOW_RUN_ID")):
            return
        from mlflow import MlflowClient

        try:
            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as e:  # training will report the store's problem itself
            log.warning("could not open the workspace's MLflow store early: %s", e)
        os.environ.pop("MLFLOW_RUN_ID", None)


# ---------------------------------------------------------------- a single run: +launch=azureml
class SubmitRun(Callback):
    """`python train.py +launch=azureml launch.compute=NAME ...`: this one run goes to the cluster
    instead of training here (conf/launch/azureml.yaml adds this callback and `launch.*`).

    The job runs `python train.py` with the same overrides (minus launch.*, minus the tracking
    keys that locate the workspace from outside) and is the MLflow run itself: Azure ML creates a
    run per job and training records into it. This process waits, prints the status changes and
    the result, and exits (0 when the run FINISHED) before Hydra would train locally."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            code = self._submit(config)
        except EquipError as e:
            console.print(f"[bold red]equip: error:[/] {escape(str(e))}")
            code = 2
        raise SystemExit(code)

    def _submit(self, config: DictConfig) -> int:
        settings = OmegaConf.to_container(config.launch, resolve=True)
        launcher = AzureMLLauncher(**settings)  # type: ignore[arg-type]
        launcher.config = config
        check_settings(config, launcher.compute)
        from equip.training import check_config

        check_config(config)  # a bad config fails here, not after the cluster has started
        try:
            from azure.ai.ml import Input, command
        except ImportError:
            raise EquipError(
                '+launch=azureml needs the Azure extra: pip install -e ".[azure]"'
            ) from None
        logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
        logging.getLogger("azure.identity").setLevel(logging.ERROR)
        project = project_root_of(Path(sys.argv[0]))
        overrides = [o for o in config.hydra.overrides.task if _key(o).split(".")[0] != "launch"]
        cwd = OmegaConf.select(config, "hydra.runtime.cwd", default=None) or os.getcwd()
        data_path, local = data_input(config, Path(str(cwd)))
        args = [o for o in overrides if _remote_keeps(_key(o))]
        if data_path is not None:
            args.append("data.root=${{inputs.data}}")
        if "progress_bar" in config.trainer:
            args.append("trainer.progress_bar=false")
        name = f"equip-{launcher._tag}"
        display = tracking.run_name(config, overrides)
        node = command(
            name=name,
            display_name=display[:250],
            experiment_name=launcher.experiment_name or str(config.tracking.experiment),
            description=f"equip run: {' '.join(tracking.redact_overrides(args))}"[:1000],
            command="python train.py " + " ".join(shlex.quote(a) for a in args),
            code=str(project),
            environment=build_environment(project, launcher.image, launcher.python,
                                          launcher.pins, launcher.pip_extra_index_url),
            compute=launcher.compute,
            inputs={"data": Input(type="uri_folder", path=data_path, mode=launcher.data_mode)}
            if data_path is not None else {},
            environment_variables={"PYTHONPATH": "src"},
        )  # fmt: skip
        j = AzureJob(0, overrides, config, name, display, "", node._to_job(), local)
        if launcher.dry_run:
            folder = Path(str(config.hydra.run.dir))
            folder.mkdir(parents=True, exist_ok=True)
            write_job_file(j, folder / f"{name}.azureml.yaml")
            console.print(f"dry run: the Azure ML job is validated, nothing submitted; job file "
                          f"{(folder / f'{name}.azureml.yaml').resolve()}")  # fmt: skip
            return 0
        client = launcher._ml_client()
        if local is not None:
            j.job.inputs["data"].path = launcher._data_asset(client, local)
        with azure_errors(f"job {name}"):
            created = client.jobs.create_or_update(j.job)
        j.name = getattr(created, "name", None) or name
        j.url = getattr(created, "studio_url", "") or ""
        launcher._report(j, created.status or "Submitted")
        try:
            while j.status not in TERMINAL:
                time.sleep(launcher.poll_s)
                status = launcher._poll(client, j)
                if status != j.status:
                    launcher._report(j, status)
        except (KeyboardInterrupt, EquipError):
            with contextlib.suppress(Exception):
                client.jobs.begin_cancel(j.name)
            console.print(f"[bold red]stopped:[/] cancelled Azure ML job {j.name}  {j.url}")
            raise
        return self._result(config, j)

    @staticmethod
    def _result(config: DictConfig, j: AzureJob) -> int:
        from mlflow import MlflowClient

        tracking.connect(config.tracking)
        try:
            run = MlflowClient().get_run(j.name)  # an Azure ML job's run id is its name
        except Exception:
            run = None
        if j.status != "Completed" or run is None or run.info.status != "FINISHED":
            console.print(f"[bold red]failed:[/] Azure ML job {j.name} ended {j.status}; its "
                          f"log is in Studio: {j.url}")  # fmt: skip
            return 1
        m = run.data.metrics
        acc, f1 = m.get("best_val_acc", math.nan), m.get("best_val_macro_f1", math.nan)
        console.print(f"[bold green]done[/] {escape(run.info.run_name or j.name)}: val_acc "
                      f"{acc:.3f}, macro-F1 {f1:.3f} on Azure ML  {j.url}")  # fmt: skip
        return 0


def project_root_of(script: Path) -> Path:
    root = script.resolve().parent
    if not (root / "pyproject.toml").exists():
        raise EquipError(f"{root} has no pyproject.toml: Azure ML jobs ship the project folder "
                         "and build their environment from pyproject.toml.")  # fmt: skip
    return root
