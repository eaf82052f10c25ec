"""Continuing a run that was killed or preempted: `python train.py ... resume=RUN_ID|last`.

Every CNN run keeps `last.ckpt` (weights, optimizer, scheduler, early stopping, epoch) in its own
folder under data.cache_dir until it FINISHES. Resuming reopens the same MLflow run and hands
that file to `trainer.fit(ckpt_path=...)`; the metric history goes on at the next epoch. A
resumed sweep (multirun.resume) does the same for a child it finds KILLED or FAILED with a
checkpoint, and trains nothing for a config whose child already FINISHED.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from equip.errors import EquipError
from equip.sweep.context import JobContext, finished_twin
from equip.track import queries, schema
from equip.train._checkpoints import LAST, checkpoint_dir

if TYPE_CHECKING:
    from mlflow.entities import Run

UNFINISHED = ("RUNNING", "KILLED", "FAILED")


@dataclass(frozen=True)
class ResumePlan:
    """What a job does with runs of its config that came before it."""

    run_id: str | None = None  # reopen this run and continue from its last.ckpt
    finished_twin: Run | None = None  # a resumed sweep's FINISHED run of this config: train nothing


def plan_resume(cfg: DictConfig, job: JobContext, experiment_id: str, cfg_hash: str) -> ResumePlan:
    """`resume=` names the run to continue. A resumed sweep reuses this config's FINISHED
    child, or continues its cut-off one from the last checkpoint (CNN runs with a cache)."""
    resume_id = find_run(cfg, experiment_id, cfg_hash) if cfg.resume else None
    if resume_id is not None or not (job.in_sweep and job.resume):
        return ResumePlan(resume_id)
    parent = job.parent_run_id or ""
    twin = finished_twin(experiment_id, parent, cfg_hash)
    if twin is not None:
        return ResumePlan(finished_twin=twin)
    if cfg.model.name != "baseline" and cfg.data.cache_dir:
        return ResumePlan(unfinished_twin(cfg, experiment_id, parent, cfg_hash))
    return ResumePlan()


def find_run(cfg: DictConfig, experiment_id: str, cfg_hash: str) -> str:
    """The run `resume=` names, checked: exists, unfinished, same config, has a checkpoint."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    wanted = str(cfg.resume)
    if wanted == "last":
        newest = queries.search_runs(client, [experiment_id], limit=50)
        ids = [r.info.run_id for r in newest if r.info.status in UNFINISHED]
        found = [i for i in ids if (checkpoint_dir(cfg, i) / LAST).exists()]
        if not found:
            raise EquipError(
                f"resume=last: no unfinished run with a checkpoint in experiment "
                f"{cfg.tracking.experiment!r}. Drop resume= to start a new one."
            )
        wanted = found[0]
    try:
        run = client.get_run(wanted)
    except MlflowException:
        raise EquipError(
            f"resume={wanted}: no such MLflow run in {client.tracking_uri}. "
            "Give the id of a killed run (MLflow UI), or resume=last."
        ) from None
    if run.info.status == "FINISHED":
        raise EquipError(
            f"resume={wanted}: that run already FINISHED; nothing to continue. "
            "Drop resume= to train a new run."
        )
    if run.data.tags.get(schema.CONFIG_HASH) != cfg_hash:
        raise EquipError(
            f"resume={wanted}: that run trained another config or data. "
            "Resume with the command that started it plus resume=."
        )
    if not (checkpoint_dir(cfg, wanted) / LAST).exists():
        where = checkpoint_dir(cfg, wanted) / LAST
        raise EquipError(
            f"resume={wanted}: no checkpoint at {where} (stopped before its "
            "first epoch ended, or another data.cache_dir). Drop resume= to start "
            "again."
        )
    return wanted


def unfinished_twin(cfg: DictConfig, experiment_id: str, parent_id: str, cfg_hash: str):
    """In a resumed sweep: a KILLED or FAILED child with this config and a last checkpoint."""
    from mlflow import MlflowClient

    client = MlflowClient()
    where = queries.children_of(parent_id, {schema.CONFIG_HASH: cfg_hash})
    runs = queries.search_runs(client, [experiment_id], where)
    for status in ("KILLED", "FAILED"):
        for run in runs:
            if run.info.status == status and (checkpoint_dir(cfg, run.info.run_id) / LAST).exists():
                return run.info.run_id
    return None


# Logged once, when the training is over, at the step after its last epoch: not an epoch.
RUN_SUMMARY = {"train_time_s", "train_images_per_s", "val_images"}


def logged_history(run_id: str) -> list[dict[str, float]]:
    """The per-epoch metrics a run logged before it was cut off, oldest epoch first."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    by_epoch: dict[int, dict[str, float]] = {}
    for key in run.data.metrics.keys() - RUN_SUMMARY:
        if key.startswith(("train_", "val_")) or key in ("lr", "epoch_time_s"):
            for m in client.get_metric_history(run_id, key):
                by_epoch.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [by_epoch[e] for e in sorted(by_epoch)]
