"""One run on an Azure ML cluster (`+launch=azureml`), and the callback every sweep job of
`hydra/launcher=azureml` runs inside Azure ML (`RemoteJob`).

    python train.py +launch=azureml launch.compute=cpu-cluster tracking=azureml \
        tracking.config_path=config.json model.lr=0.003
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from equip.errors import EquipError
from equip.launchers.azureml import jobs
from equip.launchers.azureml.jobs import AzureJob
from equip.launchers.azureml.service import TERMINAL, JobService
from equip.launchers.azureml.settings import RunSettings, check_settings, require_sdk
from equip.terminal import fail, say
from equip.track import record as tracking
from equip.track import store
from equip.track.redaction import redact_overrides

log = logging.getLogger(__name__)


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
            fail(str(e), 2)
        raise SystemExit(code)

    def service(self, config: DictConfig, s: RunSettings) -> JobService:
        return JobService(config.tracking, str(s.compute), "launch")

    def _submit(self, config: DictConfig) -> int:
        from equip.config.checks import check_config

        s = RunSettings.of(config.launch)
        check_settings(config, s.compute, "launch")
        check_config(config)  # a bad config fails here, not after the cluster has started
        require_sdk("+launch=azureml")
        project = jobs.project_root_of(Path(sys.argv[0]))
        overrides = [
            o for o in config.hydra.overrides.task if jobs.key_of(o).split(".")[0] != "launch"
        ]
        cwd = OmegaConf.select(config, "hydra.runtime.cwd", default=None) or os.getcwd()
        data_path, local = jobs.data_input(config, Path(str(cwd)))
        args = jobs.remote_arguments(config, overrides, data_path is not None)
        name = f"equip-{jobs.new_tag()}"
        display = tracking.run_name(config, overrides)
        command = jobs.command_job(
            name=name,
            display=display,
            project=project,
            s=s,
            experiment=s.experiment_name or str(config.tracking.experiment),
            description=f"equip run: {' '.join(redact_overrides(args))}",
            command=jobs.command_line(args),
            environment=jobs.build_environment(project, s),
            data_path=data_path,
            env={},
        )
        j = AzureJob(0, overrides, config, name, display, "", command, local)
        if s.dry_run:
            path = (Path(str(config.hydra.run.dir)) / f"{name}.azureml.yaml").resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            jobs.write_job_file(j, path)
            say(f"dry run: the Azure ML job is validated, nothing submitted; job file {path}")
            return 0
        service = self.service(config, s)
        service.submit(j)
        try:
            while j.status not in TERMINAL:
                time.sleep(s.poll_s)
                service.poll(j)
        except (KeyboardInterrupt, EquipError):
            service.cancel([j])
            say(("stopped:", "bold red"), f" cancelled Azure ML job {j.name}  {j.url}")
            raise
        return self._result(config, j)

    @staticmethod
    def _result(config: DictConfig, j: AzureJob) -> int:
        from mlflow import MlflowClient

        store.connect(config.tracking)
        try:
            run = MlflowClient().get_run(j.name)  # an Azure ML job's run id is its name
        except Exception:
            run = None
        if j.status != "Completed" or run is None or run.info.status != "FINISHED":
            say(
                ("failed:", "bold red"),
                f" Azure ML job {j.name} ended {j.status}; its log is in Studio: {j.url}",
            )
            return 1
        m = run.data.metrics
        acc, f1 = m.get("best_val_acc", math.nan), m.get("best_val_macro_f1", math.nan)
        say(
            ("done", "bold green"),
            f" {run.info.run_name or j.name}: val_acc {acc:.3f}, macro-F1 {f1:.3f} on Azure ML"
            f"  {j.url}",
        )
        return 0


class RemoteJob(Callback):
    """Added to the command of every sweep job (`launcher`): the job's training run
    becomes a new child of the sweep's parent instead of the run Azure ML created for the job.

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
