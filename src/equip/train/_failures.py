"""How a sweep job that failed before its run existed is recorded (bad data, say): it still
becomes a FAILED child, named like its siblings, so the leaderboard counts it.

A failed run that exists is ended by its `equip.track.run.TrackedRun` (FAILED, or KILLED when
the user stopped it, with the reason, the traceback and the best checkpoint so far).
"""

from __future__ import annotations

from omegaconf import DictConfig

from equip.sweep.context import JobContext, config_hash
from equip.track import record as tracking
from equip.track import schema, store
from equip.track.run import describe, was_stopped_by_user


def record_failed_child(cfg: DictConfig, job: JobContext, error: BaseException) -> None:
    """A FAILED child run for a sweep job that failed before its run started; nothing for a
    plain run or a job the user stopped."""
    if not job.in_sweep or was_stopped_by_user(error):
        return
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
