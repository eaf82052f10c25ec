"""`train(cfg, job)`: one config in, one trained model and one complete MLflow run out.

A plain function of a config, so tests and sweeps call it directly; `train.py` only wraps it
in Hydra. The job context (equip.sweep.context) says whether the run is a sweep's child.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig

from equip import __version__
from equip.config.checks import check_config, check_hardware, processes_per_node
from equip.data.grouping import GroupRule, group_images
from equip.data.images import ImageSet, load_images
from equip.data.split import split_manifest
from equip.registry import register_if_better
from equip.runtime import apply_fast_path, exit_with
from equip.sweep.context import JobContext, config_hash, cv_key, folds_key, split_key
from equip.sweep.crossval import FinalFitPlan, final_fit_plan, training_split
from equip.track import record as tracking
from equip.track import schema, store
from equip.track.redaction import redact_overrides
from equip.track.run import TrackedRun
from equip.train import _distributed
from equip.train._callbacks import MedianStopping
from equip.train._checkpoints import CheckpointFolder, model_checkpoint
from equip.train._failures import record_failed_child
from equip.train._fit import build_trainer, fit_baseline, fit_cnn
from equip.train._resume import ResumePlan, plan_resume

if TYPE_CHECKING:
    from mlflow.entities import Run

log = logging.getLogger(__name__)
# Deliberate choices Lightning warns about: in-memory data needs no loader workers (measured: 2
# workers gain nothing on 2 cores); the pytree notice is Lightning's own deprecation, not ours.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")


@dataclass(frozen=True)
class JobPlan:
    """What a job will do, decided from its config and data before its run starts."""

    experiment_id: str
    config_hash: str  # the job: config and data (a resumed sweep matches runs on it)
    cv_key: str  # the config on its data, whatever the split (a final fit finds its CV by it)
    split: np.ndarray  # train/val/test per image
    final_fit: FinalFitPlan | None  # set when final_fit=true
    resume: ResumePlan


def train(
    cfg: DictConfig,
    job: JobContext | Sequence[str] | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> dict[str, Any]:
    """Validate, load data, train, evaluate and log. Returns the run's id, name and metrics.

    `job` is the job's context (a list of overrides is a plain run named by them); `callbacks`
    join the Trainer's. `model=baseline` trains the scikit-learn baseline through the same path.
    In a distributed job (trainer.strategy=ddp) only global rank 0 gets here; the others train
    in `_train_other_rank`."""
    if not isinstance(job, JobContext):
        job = JobContext(overrides=list(job or ()))
    if not _distributed.is_rank_zero():
        return _train_other_rank(cfg, job, callbacks)
    folder = CheckpointFolder(cfg)
    run = TrackedRun(partial(record_failed_child, cfg, job), failure_checkpoint=folder.best)
    # Any failure from here on is recorded (a sweep job that fails early still shows); the run
    # ends before its checkpoint folder goes, so a failed run keeps its best checkpoint.
    with folder, run:
        _prepare_process(cfg, job)
        uri = store.connect(cfg.tracking)
        images = load_images(cfg.data)
        plan = _plan(cfg, job, images)
        if plan.resume.finished_twin is not None:  # a resumed sweep: this config FINISHED
            return _finished_twin(plan.resume.finished_twin, uri, plan.experiment_id)
        _start_run(run, cfg, job, images, plan)
        if not run.resumed:
            _log_inputs(cfg, job.overrides, images, plan.split)
        result = _fit(cfg, job, images, plan, run, folder, callbacks)
        result["metrics"].update(_log_cv_estimate(run.id, plan.final_fit))
        # registry.model=ensemble: the sweep's parent registers the folds' average instead
        if cfg.registry.enabled and cfg.registry.model == "single" and result.get("model_uri"):
            result["registry"] = _register(cfg, run.id, images, plan, result)
    result.update(run_id=run.id, run_name=run.name, experiment_id=plan.experiment_id)
    result["location"] = tracking.run_location(uri, plan.experiment_id, run.id)
    return result


def _train_other_rank(
    cfg: DictConfig, job: JobContext, callbacks: Sequence[pl.Callback]
) -> dict[str, Any]:
    """A rank > 0 of a distributed job: the same data, config and Trainer as rank 0, and no
    MLflow at all (rank 0 owns the run). Its checkpoint folder is rank 0's (Lightning
    broadcasts it) and so is the checkpoint it resumes from."""
    check_config(cfg)
    apply_fast_path(job.parallel_jobs * processes_per_node(cfg.trainer))
    images = load_images(cfg.data)
    split = training_split(cfg, images)
    checkpoint = model_checkpoint(cfg, Path(tempfile.gettempdir()))
    extra = [*callbacks, *_median_stopping(cfg, job)]  # takes part in rank 0's decision
    module, trainer, dm, _ = build_trainer(cfg, images, split, None, checkpoint, extra)
    trainer.fit(module, dm, ckpt_path=_distributed.resume_checkpoint())
    _distributed.leave_group()
    return {"run_id": None, "rank_zero": False, "metrics": {}}


def _prepare_process(cfg: DictConfig, job: JobContext) -> None:
    """Check the config (and the hardware a CNN asks for), share the cores out among the
    processes that train side by side, and tie a parallel sweep's worker to the sweep."""
    check_config(cfg)
    cnn = cfg.model.name != "baseline"
    if cnn:
        check_hardware(cfg.trainer)
    apply_fast_path(job.parallel_jobs * (processes_per_node(cfg.trainer) if cnn else 1))
    if job.sweep_pid is not None:
        exit_with(job.sweep_pid)  # a worker of a parallel sweep dies with the sweep


def _plan(cfg: DictConfig, job: JobContext, images: ImageSet) -> JobPlan:
    experiment_id = store.experiment_id(cfg.tracking)
    cfg_hash = config_hash(cfg, images.fingerprint)
    key = cv_key(cfg, images.fingerprint)
    split = training_split(cfg, images)
    final_fit = final_fit_plan(cfg, experiment_id, key) if cfg.final_fit else None
    resume = plan_resume(cfg, job, experiment_id, cfg_hash)
    return JobPlan(experiment_id, cfg_hash, key, split, final_fit, resume)


def _finished_twin(twin: Run, uri: str, experiment_id: str) -> dict[str, Any]:
    """The result of a job a resumed sweep already finished: its run, not trained again."""
    return {
        "run_id": twin.info.run_id,
        "run_name": twin.info.run_name,
        "skipped": True,
        "metrics": twin.data.metrics,
        "experiment_id": experiment_id,
        "location": tracking.run_location(uri, experiment_id, twin.info.run_id),
    }


def _start_run(
    run: TrackedRun, cfg: DictConfig, job: JobContext, images: ImageSet, plan: JobPlan
) -> None:
    """Reopen the run to resume, or start a new one tagged with what identifies it."""
    if plan.resume.run_id is not None:
        run.reopen(plan.resume.run_id, {schema.DATA_SOURCE: images.source})
    else:
        tags = {
            schema.VERSION: __version__,
            schema.DATA_FINGERPRINT: images.fingerprint,
            schema.DATA_SOURCE: images.source,
            schema.CONFIG_HASH: plan.config_hash,
            schema.MODEL_KIND: str(cfg.model.name),
            schema.CV_KEY: plan.cv_key,
            schema.SPLIT_KEY: split_key(cfg),  # what the registry's gates search by
            schema.FOLDS_KEY: folds_key(cfg),
            **(plan.final_fit.tags() if plan.final_fit is not None else {}),
            **job.extra_tags,
            **tracking.git_tags(Path(__file__).parent),
        }
        name = tracking.run_name(cfg, job.name_overrides())
        run.start(plan.experiment_id, name, tags, job.parent_run_id)
    log.info("MLflow run %s (%s)%s", run.name, run.id, " resumed" if run.resumed else "")


def _log_inputs(
    cfg: DictConfig, overrides: Sequence[str], images: ImageSet, split: np.ndarray
) -> None:
    """What went in: the config, the data, its groups and its split."""
    counts = {s: int((split == s).sum()) for s in ("train", "val", "test")}
    groups = group_images(images, GroupRule.of(cfg.data))
    log.info("split groups: %s", groups.summary())
    if groups.conflicts:
        log.warning(
            "%d label conflict(s): near-duplicate photos in different classes, e.g. %s ~ %s; "
            "all are listed in the run's data/split.csv (label_conflicts)",
            len(groups.conflicts),
            *(images.paths[k] for k in groups.conflicts[0]),
        )
    mlflow.log_params(
        {
            **tracking.config_params(cfg),
            "dataset.fingerprint": images.fingerprint,
            "dataset.classes": ",".join(images.classes),
            "dataset.images": len(images.labels),
            **{f"dataset.{s}_images": n for s, n in counts.items()},
            "dataset.skipped_files": len(images.skipped),
            "dataset.decoded_files": images.decoded,
            **groups.params(),
        }
    )
    mlflow.log_text(tracking.redacted_yaml(cfg), "config/config.yaml")
    mlflow.log_text("\n".join(redact_overrides(overrides)) + "\n", "config/overrides.txt")
    mlflow.log_text(split_manifest(images, split, groups), "data/split.csv")
    if images.skipped:
        mlflow.log_text("".join(f"{p}\t{why}\n" for p, why in images.skipped), "data/skipped.tsv")


def _fit(
    cfg: DictConfig,
    job: JobContext,
    images: ImageSet,
    plan: JobPlan,
    run: TrackedRun,
    folder: CheckpointFolder,
    callbacks: Sequence[pl.Callback],
) -> dict[str, Any]:
    """The baseline; or the CNN, from its last checkpoint when resumed, for the final fit's
    epochs, with the sweep's median stopping."""
    run_id = run.id
    if cfg.model.name == "baseline":
        return fit_baseline(cfg, images, plan.split, run_id, job.parallel_jobs)
    checkpoint = folder.open(run_id)
    extra = [*callbacks, *_median_stopping(cfg, job, run_id, plan.experiment_id)]
    resume_from = folder.last() if run.resumed else None
    epochs = plan.final_fit.epochs if plan.final_fit is not None else None
    return fit_cnn(cfg, images, plan.split, run_id, checkpoint, extra, resume_from, epochs)


def _median_stopping(
    cfg: DictConfig, job: JobContext, run_id: str | None = None, experiment_id: str = ""
) -> list[pl.Callback]:
    """The sweep's median stopping rule, if it has one (`run_id` None: a rank > 0)."""
    if not job.in_sweep or job.median_stop is None:
        return []
    parent = job.parent_run_id or ""
    return [MedianStopping(run_id, experiment_id, parent, cfg.trainer.monitor, job.median_stop)]


def _log_cv_estimate(run_id: str, final_fit: FinalFitPlan | None) -> dict[str, float]:
    """A final fit's score: its CV sweep's estimate, logged on the run (nothing without one)."""
    metrics = final_fit.metrics() if final_fit is not None else {}
    if metrics:
        tracking.log_metrics(run_id, metrics, step=0)
    return metrics


def _register(
    cfg: DictConfig, run_id: str, images: ImageSet, plan: JobPlan, result: dict[str, Any]
) -> dict[str, Any]:
    """The registry's decision on the run's model (equip.registry)."""
    score = result["metrics"].get(cfg.registry.metric, float("nan"))
    model_uri = result["model_uri"]
    return register_if_better(run_id, model_uri, cfg, images.fingerprint, score, plan.cv_key)
