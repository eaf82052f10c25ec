"""Fitting a model inside an open MLflow run: the CNN through a Lightning Trainer (identical in
every ddp rank), or the scikit-learn baseline, then evaluated and logged the same way."""

from __future__ import annotations

import time
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
    StochasticWeightAveraging,
)

from equip.data.images import ImageSet
from equip.data.loaders import ImageDataModule, TensorImages
from equip.model.cnn import Classifier, mflops_per_image
from equip.runtime import resolve_precision
from equip.track import record as tracking
from equip.track import reports, schema
from equip.track.redaction import redact_tree
from equip.train import _distributed, _resume
from equip.train._callbacks import EpochMetrics, FiniteLoss, StopWhenAsked


def build_trainer(
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
    progress_bar = t.progress_bar and run_id is not None
    callbacks = [checkpoint, epochs, *extra_callbacks, *_trainer_callbacks(cfg, final_fit)]
    if progress_bar:
        callbacks.append(RichProgressBar())
    if t.strategy != "auto":  # distributed
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
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=0 if final_fit else t.limit_val_batches,
        # Our loaders shard themselves: val/test without the padding duplicates Lightning adds.
        use_distributed_sampler=False,
    )
    return module, trainer, ImageDataModule(images, split, cfg.data, cfg.seed), epochs


def _trainer_callbacks(cfg: DictConfig, final_fit: bool) -> list[pl.Callback]:
    """A stop on a loss that is no longer finite or when a launcher's worker is asked to, early
    stopping (nothing to watch in a final fit) and weight averaging, as configured."""
    t = cfg.trainer
    callbacks: list[pl.Callback] = [FiniteLoss(), StopWhenAsked()]
    if t.patience > 0 and not final_fit:
        callbacks.append(
            EarlyStopping(t.monitor, patience=t.patience, mode=schema.monitor_mode(t.monitor))
        )
    if cfg.model.ema_decay:  # validated and checkpointed with the averaged weights
        callbacks.append(EMAWeightAveraging(decay=cfg.model.ema_decay))
    if t.swa_lrs is not None:  # the average becomes the last weights (checks: keep=last)
        callbacks.append(StochasticWeightAveraging(t.swa_lrs, swa_epoch_start=t.swa_epoch_start))
    return callbacks


def fit_cnn(
    cfg: DictConfig,
    images: ImageSet,
    split: np.ndarray,
    run_id: str,
    checkpoint: ModelCheckpoint,
    extra_callbacks: Sequence[pl.Callback],
    resume_from: str | None = None,
    n_epochs: int | None = None,
) -> dict[str, Any]:
    """Train (from `resume_from`, a last.ckpt, when given), evaluate and log the CNN."""
    history = _resume.logged_history(run_id) if resume_from else None
    module, trainer, dm, epochs = build_trainer(
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
    t0 = time.perf_counter()
    with _distributed.launcher_environment():
        _distributed.share_resume_checkpoint(resume_from)
        trainer.fit(module, dm, ckpt_path=resume_from)
        _distributed.leave_group()
    train_time = time.perf_counter() - t0
    best, best_epoch = _selected_model(cfg, trainer, checkpoint, epochs.history, split)
    final = {
        "best_epoch": best_epoch,
        "epochs_trained": len(epochs.history),
        "train_time_s": train_time,
        "train_images_per_s": epochs.train_images / max(train_time, 1e-9),
    }
    final = _evaluate(cfg, run_id, images, split, best, dm, final, epochs.history)
    mlflow.log_artifact(best, "checkpoints")
    result: dict[str, Any] = {"metrics": final, "history": epochs.history}
    if cfg.tracking.log_model:
        from equip.serve.pyfunc import log_pyfunc

        result["model_uri"] = log_pyfunc(
            best, images.classes, cfg.data.image_size, onnx=cfg.tracking.log_onnx
        )
    return result


def _selected_model(
    cfg: DictConfig,
    trainer: pl.Trainer,
    checkpoint: ModelCheckpoint,
    history: list[dict[str, float]],
    split: np.ndarray,
) -> tuple[str, int]:
    """The checkpoint that is the model, and its epoch: the best by trainer.monitor, or the
    last weights (no val images, or picking an epoch on them would flatter the score)."""
    t = cfg.trainer
    best = checkpoint.best_model_path
    if not (split == "val").any() or t.keep == "last" or not best:
        last = str(Path(checkpoint.dirpath) / "final.ckpt")
        trainer.save_checkpoint(last)
        return last, len(history) - 1
    return best, _best_epoch(history, t.monitor, schema.monitor_mode(t.monitor))


def _evaluate(
    cfg: DictConfig,
    run_id: str,
    images: ImageSet,
    split: np.ndarray,
    checkpoint: str,
    dm: ImageDataModule,
    final: dict[str, float],
    history: list[dict[str, float]],
) -> dict[str, float]:
    """Test accuracy, the val evaluation (a final fit has none: its score is the CV estimate)
    and the learning curves, logged; returns the final metrics."""
    model = Classifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    batch = cfg.data.batch_size
    if (split == "test").any():
        t_true, t_probs = _predict(model, dm.subset("test"), batch)
        final["test_acc"] = float((t_true == t_probs.argmax(1)).float().mean())
    if not (split == "val").any():
        tracking.log_metrics(run_id, final, step=len(history))
    else:
        y_true, probs = _predict(model, dm.subset("val"), batch)
        final = reports.log_evaluation(run_id, images.classes, y_true, probs, final, len(history))
    if history:
        fig = reports.learning_curves_figure(history)
        mlflow.log_figure(fig, "eval/learning_curves.png")
        reports.close(fig)
    return final


def _predict(
    model: Classifier, subset: TensorImages, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
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


def fit_baseline(
    cfg: DictConfig, images: ImageSet, split: np.ndarray, run_id: str, parallel_jobs: int
) -> dict[str, Any]:
    """Fit, evaluate and log the scikit-learn baseline; its model takes raw images in, like
    the CNN's pyfunc."""
    from equip.model.baseline import fit_and_log

    result = fit_and_log(cfg, images, split, run_id, parallel_jobs)
    pipeline = result.pop("pipeline")
    if cfg.tracking.log_model:
        from equip.serve.baseline_pyfunc import log_baseline_pyfunc

        result["model_uri"] = log_baseline_pyfunc(pipeline, images.classes, cfg.data.image_size)
    return result
