"""`train(cfg, job)`: one config in, one trained model and one complete MLflow run out.

A plain function of a config, so tests and sweeps call it directly; `train.py` only wraps it
in Hydra. The job context (equip.sweep.context) says whether the run is a sweep's child.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import (
    EarlyStopping,
    EMAWeightAveraging,
    ModelCheckpoint,
    RichProgressBar,
)

from equip import __version__
from equip.config.checks import check_config, check_hardware, processes_per_node
from equip.data.images import ImageSet, load_images
from equip.data.loaders import ImageDataModule
from equip.data.split import split_for, split_manifest
from equip.model.cnn import Classifier, mflops_per_image
from equip.runtime import apply_fast_path, exit_with, resolve_precision
from equip.sweep.context import JobContext, config_hash, cv_key, finished_twin
from equip.track import record as tracking
from equip.track import reports, schema, store
from equip.track.redaction import redact_overrides, redact_tree
from equip.train import _distributed, _resume
from equip.train._callbacks import EpochMetrics, MedianStopping
from equip.train._failures import record_failure

log = logging.getLogger(__name__)
# Deliberate choices Lightning warns about: in-memory data needs no loader workers (measured: 2
# workers gain nothing on 2 cores); the pytree notice is Lightning's own deprecation, not ours.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")


def train(
    cfg: DictConfig,
    job: JobContext | Sequence[str] | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> dict[str, Any]:
    """Validate, load data, train, evaluate and log. Returns the run's id, name and metrics.

    `job` is the job's context (a list of overrides is a plain run named by them); `callbacks`
    join the Trainer's. `model=baseline` trains the scikit-learn baseline through the same path.
    In a distributed job (trainer.strategy=ddp) only global rank 0 gets here; the others train
    in `_train_other_rank`.
    """
    if not isinstance(job, JobContext):
        job = JobContext(overrides=list(job or ()))
    if not _distributed.is_rank_zero():
        return _train_other_rank(cfg, job, callbacks)
    run_id: str | None = None
    checkpoint: ModelCheckpoint | None = None
    ckpt_dir: Path | None = None
    try:  # any failure from here on is recorded (a sweep job that fails early still shows)
        check_config(cfg)
        cnn = cfg.model.name != "baseline"
        if cnn:
            check_hardware(cfg.trainer)
        apply_fast_path(job.parallel_jobs * (processes_per_node(cfg.trainer) if cnn else 1))
        if job.sweep_pid is not None:
            exit_with(job.sweep_pid)  # a worker of a parallel sweep dies with the sweep
        uri = store.connect(cfg.tracking)
        images = load_images(cfg.data)
        d = cfg.data
        exp_id = store.experiment_id(cfg.tracking)
        name = tracking.run_name(cfg, job.name_overrides())
        cfg_hash = config_hash(cfg, images.fingerprint)
        key = cv_key(cfg, images.fingerprint)
        cv_tags, cv_metrics, epochs = {}, {}, None
        split = _split(cfg, images)
        if cfg.final_fit:  # every image trains; the score is this config's CV estimate
            from equip.sweep.crossval import final_fit_plan

            cv, epochs = final_fit_plan(cfg, exp_id, key)
            if cv is not None:
                cv_tags[schema.CV_PARENT] = cv.parent_id
                cv_metrics = {
                    f"cv_mean_{cfg.registry.metric}": cv.mean,
                    "cv_folds": float(cv.folds),
                }
            cv_tags[schema.FINAL_FIT] = "true"
        resume_id = _resume.find_run(cfg, exp_id, cfg_hash) if cfg.resume else None
        if job.in_sweep and job.resume and resume_id is None:
            twin = finished_twin(exp_id, job.parent_run_id, cfg_hash)
            if twin is not None:  # a resumed sweep: this exact config already finished
                where = tracking.run_location(uri, exp_id, twin.info.run_id)
                return {
                    "run_id": twin.info.run_id,
                    "run_name": twin.info.run_name,
                    "skipped": True,
                    "metrics": twin.data.metrics,
                    "experiment_id": exp_id,
                    "location": where,
                }
            if cnn and d.cache_dir:  # cut off mid-training: continue from its last checkpoint
                resume_id = _resume.unfinished_twin(cfg, exp_id, job.parent_run_id, cfg_hash)
        tags = {
            schema.VERSION: __version__,
            schema.DATA_FINGERPRINT: images.fingerprint,
            schema.DATA_SOURCE: images.source,
            schema.CONFIG_HASH: cfg_hash,
            schema.MODEL_KIND: str(cfg.model.name),
            schema.CV_KEY: key,
            **cv_tags,
            **job.extra_tags,
            **store.process_tags(),
            **tracking.git_tags(Path(__file__).parent),
        }
        if resume_id is not None:
            run = mlflow.start_run(run_id=resume_id)
            mlflow.set_tags(
                {schema.DATA_SOURCE: images.source, schema.RESUMED: "true", **store.process_tags()}
            )
            if schema.ERROR in run.data.tags:  # the error that cut it off is history now
                mlflow.delete_tag(schema.ERROR)
            name = run.info.run_name
        else:
            run = mlflow.start_run(
                experiment_id=exp_id, run_name=name, tags=tags, parent_run_id=job.parent_run_id
            )
        run_id = run.info.run_id
        log.info("MLflow run %s (%s)%s", name, run_id, " resumed" if resume_id else "")
        if d.cache_dir and cnn:  # kept until the run FINISHES: resume= continues from last.ckpt
            ckpt_dir = _resume.checkpoint_dir(cfg, run_id)
        else:
            ckpt_dir = Path(tempfile.mkdtemp(prefix="equip-ckpt-"))
        checkpoint = _checkpoint(cfg, ckpt_dir)
        if resume_id is None:
            _log_inputs(cfg, job.overrides, images, split)
        if not cnn:
            from equip.model.baseline import fit_and_log

            result = fit_and_log(cfg, images, split, run_id, job.parallel_jobs)
            pipeline = result.pop("pipeline")
            if cfg.tracking.log_model:  # raw images in, like the CNN's pyfunc
                from equip.serve.baseline_pyfunc import log_baseline_pyfunc

                result["model_uri"] = log_baseline_pyfunc(
                    pipeline, images.classes, cfg.data.image_size
                )
        else:
            extra = list(callbacks)
            if job.in_sweep and job.median_stop is not None:
                extra.append(
                    MedianStopping(
                        run_id, exp_id, job.parent_run_id, cfg.trainer.monitor, job.median_stop
                    )
                )
            last = str(ckpt_dir / _resume.LAST) if resume_id else None
            result = _fit_cnn(cfg, images, split, run_id, checkpoint, extra, last, epochs)
        if cv_metrics:
            tracking.log_metrics(run_id, cv_metrics, step=0)
            result["metrics"].update(cv_metrics)
        if cfg.registry.enabled and result.get("model_uri"):
            from equip.registry import register_if_better

            score = result["metrics"].get(cfg.registry.metric, float("nan"))
            result["registry"] = register_if_better(
                run_id, result["model_uri"], cfg, images.fingerprint, score, key
            )
    except BaseException as e:
        best = checkpoint.best_model_path if checkpoint is not None else None
        record_failure(e, cfg, job, run_id, best)
        resumable = ckpt_dir is not None and d.cache_dir and (ckpt_dir / _resume.LAST).exists()
        if ckpt_dir is not None and not resumable:
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # nothing resume= could continue
        raise
    mlflow.end_run("FINISHED")
    if ckpt_dir is not None:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # best.ckpt is in the run now
    result.update(
        run_id=run_id,
        run_name=name,
        experiment_id=exp_id,
        location=tracking.run_location(uri, exp_id, run_id),
    )
    return result


def _train_other_rank(cfg: DictConfig, job: JobContext, callbacks: Sequence[pl.Callback]):
    """A rank > 0 of a distributed job: the same data, config and Trainer as rank 0, and no
    MLflow at all (rank 0 owns the run). Its checkpoint folder is rank 0's (Lightning
    broadcasts it) and so is the checkpoint it resumes from."""
    check_config(cfg)
    apply_fast_path(job.parallel_jobs * processes_per_node(cfg.trainer))
    images = load_images(cfg.data)
    split = _split(cfg, images)
    checkpoint = _checkpoint(cfg, Path(tempfile.gettempdir()))
    extra = list(callbacks)
    if job.in_sweep and job.median_stop is not None:  # takes part in rank 0's decision
        extra.append(
            MedianStopping(None, "", job.parent_run_id or "", cfg.trainer.monitor, job.median_stop)
        )
    module, trainer, dm, epochs = _trainer(cfg, images, split, None, checkpoint, extra)
    trainer.fit(module, dm, ckpt_path=_distributed.resume_checkpoint())
    _distributed.leave_group()
    return {"run_id": None, "rank_zero": False, "metrics": {}}


def _split(cfg: DictConfig, images: ImageSet) -> np.ndarray:
    """A final fit trains on every image; any other run on the hold-out split or its fold."""
    return np.full(len(images.labels), "train") if cfg.final_fit else split_for(images, cfg.data)


def _checkpoint(cfg: DictConfig, dirpath: Path) -> ModelCheckpoint:
    """best.ckpt by trainer.monitor and last.ckpt (resume=); a final fit has no score to watch."""
    t = cfg.trainer
    return ModelCheckpoint(
        dirpath=dirpath,
        filename="best",
        save_top_k=1,
        save_last=True,
        monitor=None if cfg.final_fit else str(t.monitor),  # a plain str in the checkpoint
        mode=schema.monitor_mode(t.monitor),
    )


def _log_inputs(cfg: DictConfig, overrides: Sequence[str], images: ImageSet, split: np.ndarray):
    """What went in: the config, the data and its split."""
    counts = {s: int((split == s).sum()) for s in ("train", "val", "test")}
    mlflow.log_params(
        {
            **tracking.config_params(cfg),
            "dataset.fingerprint": images.fingerprint,
            "dataset.classes": ",".join(images.classes),
            "dataset.images": len(images.labels),
            **{f"dataset.{s}_images": n for s, n in counts.items()},
            "dataset.skipped_files": len(images.skipped),
            "dataset.decoded_files": images.decoded,
        }
    )
    mlflow.log_text(tracking.redacted_yaml(cfg), "config/config.yaml")
    mlflow.log_text("\n".join(redact_overrides(overrides)) + "\n", "config/overrides.txt")
    mlflow.log_text(split_manifest(images, split), "data/split.csv")
    if images.skipped:
        mlflow.log_text("".join(f"{p}\t{why}\n" for p, why in images.skipped), "data/skipped.tsv")


def _trainer(
    cfg: DictConfig,
    images: ImageSet,
    split: np.ndarray,
    run_id: str | None,
    checkpoint: ModelCheckpoint,
    extra_callbacks: Sequence[pl.Callback],
    history: list[dict[str, float]] | None = None,
    n_epochs: int | None = None,
) -> tuple[Classifier, pl.Trainer, ImageDataModule, EpochMetrics]:
    """The module, Trainer and data of a CNN job: identical in every rank. Without val images
    (a final fit) it trains `n_epochs` epochs and keeps the last weights."""
    final_fit = not (split == "val").any()
    # Seed before the weights exist: a job's result must not depend on the jobs before it.
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    # Lightning saves these hyper-parameters inside every checkpoint: never a secret among them.
    # enum_to_str: the schema's choices go in as plain str (torch.load refuses other classes).
    model_cfg = redact_tree(OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True))
    module = Classifier(model_cfg, images.classes, cfg.data.image_size)
    t = cfg.trainer
    epochs = EpochMetrics(run_id, history)
    callbacks: list[pl.Callback] = [checkpoint, epochs, *extra_callbacks]
    if t.patience > 0 and not final_fit:
        callbacks.append(
            EarlyStopping(t.monitor, patience=t.patience, mode=schema.monitor_mode(t.monitor))
        )
    if cfg.model.ema_decay:  # validated and checkpointed with the averaged weights
        callbacks.append(EMAWeightAveraging(decay=cfg.model.ema_decay))
    if t.progress_bar and run_id is not None:
        callbacks.append(RichProgressBar())
    distributed_run = t.strategy != "auto"
    if distributed_run:
        _distributed.use_job_command()
    trainer = pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=resolve_precision(t.precision, t.accelerator),
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        max_epochs=n_epochs or t.max_epochs,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=t.progress_bar and run_id is not None,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=0 if final_fit else t.limit_val_batches,
        # Our loaders shard themselves: val/test without the padding duplicates Lightning adds.
        use_distributed_sampler=False,
    )
    dm = ImageDataModule(images, split, cfg.data, cfg.seed)
    return module, trainer, dm, epochs


def _fit_cnn(
    cfg: DictConfig,
    images: ImageSet,
    split: np.ndarray,
    run_id: str,
    checkpoint: ModelCheckpoint,
    extra_callbacks: Sequence[pl.Callback],
    resume_from: str | None = None,
    n_epochs: int | None = None,
) -> dict[str, Any]:
    final_fit = not (split == "val").any()
    history = _resume.logged_history(run_id) if resume_from else None
    module, trainer, dm, epochs = _trainer(
        cfg, images, split, run_id, checkpoint, extra_callbacks, history, n_epochs
    )
    if resume_from is None:
        mlflow.log_params(
            {
                "arch.params": sum(p.numel() for p in module.parameters()),
                "arch.mflops_per_image": round(
                    mflops_per_image(module.net, cfg.data.image_size), 3
                ),
                "runtime.precision": trainer.precision,  # what trainer.precision=auto chose
            }
        )
    t = cfg.trainer
    mode = schema.monitor_mode(t.monitor)
    t0 = time.perf_counter()
    with _distributed.launcher_environment():
        _distributed.share_resume_checkpoint(resume_from)
        trainer.fit(module, dm, ckpt_path=resume_from)
        _distributed.leave_group()
    train_time = time.perf_counter() - t0

    best = checkpoint.best_model_path
    keep_last = final_fit or t.keep == "last" or not best
    if keep_last:  # the last weights are the model (no val images, or picking an epoch on
        best = str(Path(checkpoint.dirpath) / "final.ckpt")  # them would flatter the score)
        trainer.save_checkpoint(best)
    model = Classifier.load_from_checkpoint(best, map_location="cpu").eval()
    last_epoch = len(epochs.history) - 1
    final = {
        "best_epoch": last_epoch if keep_last else _best_epoch(epochs.history, t.monitor, mode),
        "epochs_trained": len(epochs.history),
        "train_time_s": train_time,
        "train_images_per_s": epochs.train_images / max(train_time, 1e-9),
    }
    if (split == "test").any():
        t_true, t_probs = _predict(model, dm.subset("test"), cfg.data.batch_size)
        final["test_acc"] = float((t_true == t_probs.argmax(1)).float().mean())
    if final_fit:  # nothing left to validate on: the score is the CV estimate
        tracking.log_metrics(run_id, final, step=len(epochs.history))
    else:
        y_true, probs = _predict(model, dm.subset("val"), cfg.data.batch_size)
        final = reports.log_evaluation(
            run_id, images.classes, y_true, probs, final, len(epochs.history)
        )
    if epochs.history:
        fig = reports.learning_curves_figure(epochs.history)
        mlflow.log_figure(fig, "eval/learning_curves.png")
        reports.close(fig)
    mlflow.log_artifact(best, "checkpoints")
    result: dict[str, Any] = {"metrics": final, "history": epochs.history}
    if cfg.tracking.log_model:
        from equip.serve.pyfunc import log_pyfunc

        result["model_uri"] = log_pyfunc(best, images.classes, cfg.data.image_size)
    return result


def _predict(model: Classifier, subset, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and class probabilities of a whole subset, a training batch at a time: the
    subset may be streamed from disk, and activations stay the size training needed."""
    ys, probs = [], []
    with torch.inference_mode():
        for i in range(0, len(subset), batch):
            x, y = subset.__getitems__(range(i, min(i + batch, len(subset))))
            probs.append(model(x).softmax(1))
            ys.append(y)
    if not ys:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, len(model.classes))
    return torch.cat(ys), torch.cat(probs)


def _best_epoch(history: list[dict[str, float]], monitor: str, mode: str) -> int:
    scored = [(h[monitor], h["epoch"]) for h in history if monitor in h]
    if not scored:
        return -1
    return int((max if mode == "max" else min)(scored, key=lambda s: s[0])[1])
