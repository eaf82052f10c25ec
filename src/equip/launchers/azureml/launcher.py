"""`hydra/launcher=azureml`: every job of a sweep runs as an Azure ML command job on a cluster.

    python train.py -m sweep=architecture tracking=azureml tracking.config_path=config.json \
        hydra/launcher=azureml hydra.launcher.compute=cpu-cluster

The sweep itself stays on this machine: Hydra's sweeper (grid or Optuna) picks the points, the
`SweepTracker` callback creates the MLflow parent run in the workspace, and this launcher turns
each point into a command job (`jobs`): the project folder as code, an environment
generated from pyproject.toml, `data.root` as the data input, and the command
`python train.py <the job's overrides>`. The job's environment carries the sweep's parent run id
and swept keys (equip.sweep.context), which is all a plain run needs to be a child of the sweep.

The launcher keeps up to `max_concurrent` jobs submitted, prints one line per state change with
the Studio URL, and returns each job's `best_<trainer.monitor>` (negated when lower is better),
read from its child run, so Optuna and the leaderboard work as they do locally. A resumed sweep
does not resubmit jobs whose child FINISHED. Ctrl-C cancels the submitted jobs.
`dry_run=true` builds and validates every job and writes `<job>.azureml.yaml` files into the
sweep folder, with no network call at all.

azure-ai-ml and mlflow are imported only when a sweep launches.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

from equip.errors import EquipError, JobFailed
from equip.launchers.azureml import jobs
from equip.launchers.azureml.jobs import AzureJob
from equip.launchers.azureml.service import TERMINAL, JobService
from equip.launchers.azureml.settings import LauncherSettings, check_settings, require_sdk
from equip.launchers.runs import record_lost_job
from equip.sweep import context
from equip.terminal import fail, say
from equip.track import queries, schema
from equip.track import record as tracking
from equip.track.redaction import redact_overrides

REMOTE_CALLBACK = "+hydra.callbacks.azureml_job._target_=equip.launchers.azureml.run.RemoteJob"


class AzureMLPreflight(Callback):
    """Before the sweep callback creates the parent run: what the launcher would refuse (no
    compute, no workspace, no SDK) ends the sweep here, so that exit 2 leaves no run behind
    (listed first by conf/hydra/launcher/azureml.yaml)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_settings(config, config.hydra.launcher.get("compute"), "hydra.launcher")
            require_sdk("hydra/launcher=azureml")
        except EquipError as e:
            fail(str(e), 2)


class AzureMLLauncher(Launcher):
    """Hydra launcher submitting each job to an Azure ML compute cluster (see module doc)."""

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = LauncherSettings.of(settings)
        self.config: DictConfig | None = None
        self.hydra_context: Any = None
        self.task_function: Any = None
        self.service: JobService | None = None
        self._tag = jobs.new_tag()

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function
        if self.settings.compute:
            self.service = JobService(config.tracking, self.settings.compute, "hydra.launcher")

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        try:
            return self._launch(job_overrides, initial_job_idx)
        except EquipError as e:
            fail(str(e), 2)
        except KeyboardInterrupt:  # the jobs are cancelled and said so (_run): no traceback
            raise SystemExit(130) from None

    def _launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None
        config, s = self.config, self.settings
        check_settings(config, s.compute, "hydra.launcher")
        require_sdk("hydra/launcher=azureml")
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        source = inspect.getsourcefile(self.task_function) if self.task_function else None
        project = jobs.project_root_of(Path(source) if source else Path.cwd() / "train.py")
        environment = jobs.build_environment(project, s)
        ctx = context.JobContext.from_environment(config, [])
        parent = context.DRY_RUN_PARENT if s.dry_run else ctx.parent_run_id
        if not parent:
            raise EquipError(
                "hydra/launcher=azureml runs only in a sweep (python train.py -m ...)"
                " with the equip.sweep.callback.SweepTracker callback."
            )
        built = [
            self._build(initial_job_idx + i, list(o), project, environment, parent, ctx.swept_keys)
            for i, o in enumerate(job_overrides)
        ]
        if s.dry_run:
            return self._write_dry_run(built, sweep_dir)
        return self._run(built, parent, sweep_dir)

    def _build(
        self,
        idx: int,
        overrides: list[str],
        project: Path,
        environment: Any,
        parent: str,
        swept: Sequence[str],
    ) -> AzureJob:
        assert self.config is not None and self.hydra_context is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        name = f"equip-{self._tag}-{idx:03d}"
        display = tracking.run_name(cfg, context.swept_overrides(overrides, swept))
        cwd = OmegaConf.select(cfg, "hydra.runtime.cwd", default=None) or os.getcwd()
        data_path, local = jobs.data_input(cfg, Path(str(cwd)))
        key = jobs.launch_key(overrides, local or data_path)
        # A failed training fails the Azure ML job: the launcher decides for the sweep.
        args = [
            *jobs.remote_arguments(cfg, overrides, data_path is not None),
            "multirun.continue_on_failure=false",
            REMOTE_CALLBACK,
        ]
        shown = redact_overrides(jobs.identity_overrides(overrides))
        command = jobs.command_job(
            name=name,
            display=display,
            project=project,
            environment=environment,
            experiment=self.settings.experiment_name or f"{cfg.tracking.experiment}-jobs",
            description=f"equip sweep job {idx}: {' '.join(shown)}",
            command=jobs.command_line(args),
            s=self.settings,
            data_path=data_path,
            env={
                context.PARENT_ENV: parent,
                context.SWEPT_ENV: ",".join(swept),
                # Tags of the child run the job creates: how this launcher finds it again.
                "MLFLOW_RUN_CONTEXT": json.dumps({jobs.JOB_TAG: name, jobs.KEY_TAG: key}),
            },
            tags={"equip.parent_run_id": parent, jobs.KEY_TAG: key, "equip.job_idx": str(idx)},
        )
        return AzureJob(idx, overrides, cfg, name, display, key, command, local)

    def _write_dry_run(self, built: list[AzureJob], sweep_dir: Path) -> list[JobReturn]:
        for j in built:
            jobs.write_job_file(j, sweep_dir / f"{j.name}.azureml.yaml")
            # 0.0, not NaN: Optuna (2.10, as hydra-optuna-sweeper pins it) rejects NaN values.
            j.result = job_return(j, 0.0, JobStatus.COMPLETED, sweep_dir)
        say(
            f"dry run: {len(built)} Azure ML job(s) validated, nothing submitted; job "
            f"files in {sweep_dir.resolve()}/*.azureml.yaml"
        )
        return [j.result for j in built]

    def _run(self, built: list[AzureJob], parent: str, sweep_dir: Path) -> list[JobReturn]:
        from mlflow import MlflowClient

        assert self.service is not None
        service, s = self.service, self.settings
        mlflow_client = MlflowClient()
        exp_id = mlflow_client.get_run(parent).info.experiment_id
        finished = finished_children(mlflow_client, exp_id, parent)
        todo: list[AzureJob] = []
        for j in built:
            twin = finished.get(j.launch_key) if j.cfg.multirun.resume else None
            if twin is None:
                todo.append(j)
                continue
            say(
                ("skipped", "yellow"),
                f" {j.display_name}: already FINISHED as run {twin.info.run_id}",
            )
            j.result = job_return(j, monitored(j.cfg, twin), JobStatus.COMPLETED, sweep_dir)
        waiting, active = list(todo), []
        if todo:
            say(
                f"submitting {len(todo)} job(s) to Azure ML compute {s.compute}, "
                f"{s.max_concurrent} at a time"
            )
        try:
            while waiting or active:
                while waiting and len(active) < s.max_concurrent:
                    j = waiting[0]
                    service.submit(j)
                    active.append(waiting.pop(0))
                time.sleep(s.poll_s)
                for j in list(active):
                    if service.poll(j) in TERMINAL:
                        active.remove(j)
                        j.result = self._collect(j, mlflow_client, exp_id, parent, sweep_dir)
        except (KeyboardInterrupt, EquipError) as stop:  # Ctrl-C, or Azure refused something
            service.cancel(active)
            why = "interrupted" if isinstance(stop, KeyboardInterrupt) else "stopped"
            say(
                (f"{why}:", "bold red"),
                f" cancelled {len(active)} Azure ML job(s); {len(waiting)} were never submitted",
            )
            raise
        return [j.result for j in built]

    def _collect(
        self, j: AzureJob, mlflow_client: Any, exp_id: str, parent: str, sweep_dir: Path
    ) -> JobReturn:
        where = queries.children_of(parent, {jobs.JOB_TAG: j.name})
        run = queries.first_run(mlflow_client, [exp_id], where)
        if run is None and j.status == "Completed":  # skipped inside the job: a FINISHED twin
            run = finished_children(mlflow_client, exp_id, parent).get(j.launch_key)
        if j.status == "Completed" and run is not None and run.info.status == "FINISHED":
            metric = f"best_{j.cfg.trainer.monitor}"
            score = run.data.metrics.get(metric, math.nan)
            say(
                ("done", "bold green"),
                f" {j.display_name}: {metric} {score:.4f} (run {run.info.run_id})",
            )
            return job_return(j, monitored(j.cfg, run), JobStatus.COMPLETED, sweep_dir)
        why = f"Azure ML job {j.name} ended {j.status}" + (
            f", its run is {run.info.status}" if run is not None else ", it recorded no run"
        )
        if run is None:  # failed before training (image build, quota, a lost node): counted
            job_tags = {jobs.JOB_TAG: j.name, jobs.KEY_TAG: j.launch_key}
            record_lost_job(parent, j.overrides, f"{why}; its logs: {j.url}", job_tags)
        if j.cfg.multirun.continue_on_failure:
            say(("job failed", "bold red"), f" (the sweep goes on): {why}  {j.url}")
            return job_return(j, context.FAILED_JOB_SCORE, JobStatus.COMPLETED, sweep_dir)
        stop = JobFailed(
            f"{why}; the sweep stops here (multirun.continue_on_failure=false): {j.url}"
        )
        return job_return(j, stop, JobStatus.FAILED, sweep_dir)


def finished_children(client: Any, exp_id: str, parent: str) -> dict[str, Any]:
    """FINISHED children of the parent by launch key: what a resumed sweep does not resubmit."""
    finished = queries.has_status("FINISHED")
    runs = queries.search_runs(client, [exp_id], queries.children_of(parent), finished)
    return {r.data.tags[jobs.KEY_TAG]: r for r in runs if jobs.KEY_TAG in r.data.tags}


def monitored(cfg: DictConfig, run: Any) -> float:
    """What the sweeper maximises, as equip.train.cli.run_training returns it locally."""
    value = float(run.data.metrics.get(f"best_{cfg.trainer.monitor}", math.nan))
    return -value if schema.monitor_mode(cfg.trainer.monitor) == "min" else value


def job_return(j: AzureJob, value: Any, status: JobStatus, sweep_dir: Path) -> JobReturn:
    cfg = j.cfg.copy()
    hydra_cfg = OmegaConf.create({"hydra": cfg.hydra})
    with open_dict(cfg):
        del cfg["hydra"]
    return JobReturn(
        overrides=j.overrides,
        cfg=cfg,
        hydra_cfg=hydra_cfg,
        working_dir=str(sweep_dir),
        task_name=str(hydra_cfg.hydra.job.name),
        status=status,
        _return_value=value,
    )
