"""How a job that failed is recorded: the one place that turns an exception into MLflow state.

A run that exists ends FAILED (KILLED when the user stopped it) with the reason, the traceback
and the best checkpoint so far. A sweep job that failed before its run existed (bad data, say)
still becomes a FAILED child, named like its siblings, so the leaderboard counts it.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

from omegaconf import DictConfig

from equip.sweep.context import JobContext, config_hash
from equip.track import record as tracking
from equip.track import schema, store
from equip.track.redaction import strip_secrets

log = logging.getLogger(__name__)


def was_stopped_by_user(error: BaseException) -> bool:
    # Lightning turns Ctrl-C during fit() into SystemExit: both mean the user stopped it.
    return isinstance(error, KeyboardInterrupt | SystemExit)


def describe(error: BaseException) -> str:
    if was_stopped_by_user(error):
        return "stopped by the user (Ctrl-C or a termination signal)"
    return strip_secrets(f"{type(error).__name__}: {error}")


def record_failure(
    error: BaseException,
    cfg: DictConfig,
    job: JobContext,
    run_id: str | None,
    checkpoint: str | None = None,
) -> None:
    """Never raises: the store itself may be what failed."""
    import mlflow

    if store.store_is_down(mlflow.get_tracking_uri()):
        log.warning("the tracking store is unreachable: the failure of this job is not recorded")
        return
    try:
        if run_id is not None:
            _end_run(error, run_id, checkpoint)
        elif job.in_sweep and not was_stopped_by_user(error):
            _record_failed_child(error, cfg, job)
    except Exception as log_error:
        log.warning("could not record the failure in MLflow: %s", strip_secrets(str(log_error)))


def _end_run(error: BaseException, run_id: str, checkpoint: str | None) -> None:
    import mlflow
    from mlflow import MlflowClient

    status = "KILLED" if was_stopped_by_user(error) else "FAILED"
    client = MlflowClient()
    try:
        client.set_tag(run_id, schema.ERROR, schema.truncate(describe(error)))
        text = strip_secrets("".join(traceback.format_exception(error)))
        client.log_text(run_id, text, "error.txt")
        if checkpoint and Path(checkpoint).exists():
            client.log_artifact(run_id, checkpoint, "checkpoints")
    finally:
        if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
            mlflow.end_run(status)
        else:
            client.set_terminated(run_id, status)


def _record_failed_child(error: BaseException, cfg: DictConfig, job: JobContext) -> None:
    from mlflow import MlflowClient

    store.connect(cfg.tracking)
    exp_id = store.experiment_id(cfg.tracking)
    client = MlflowClient()
    run = client.create_run(
        exp_id,
        run_name=tracking.run_name(cfg, job.name_overrides()),
        tags={
            schema.PARENT: job.parent_run_id or "",
            schema.CONFIG_HASH: config_hash(cfg, "unknown"),
            schema.ERROR: schema.truncate(describe(error)),
        },
    )
    client.log_text(run.info.run_id, describe(error) + "\n", "error.txt")
    client.set_terminated(run.info.run_id, "FAILED")
