"""`train(cfg)`: one config in, one trained model and one complete MLflow run out.

A plain function of a config, so tests and sweeps call it directly; `train.py` only wraps it
in Hydra.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar

from equip import __version__, reports, sweeps, tracking
from equip.data import ImageDataModule, ImageSet, load_images, split_images, split_manifest
from equip.errors import EquipError
from equip.model import Classifier, check_model, mflops_per_image
from equip.runtime import apply_fast_path, parallel_jobs

log = logging.getLogger(__name__)
# Deliberate choices Lightning warns about: in-memory data needs no loader workers (measured: 2
# workers gain nothing on 2 cores); the pytree notice is Lightning's own deprecation, not ours.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")


class EpochMetrics(pl.Callback):
    """Sends each epoch's train and val metrics to MLflow in one batched request.

    Lightning's MLFlowLogger ends the run in finalize(), before we log the evaluation and the
    model, and logs against global_step; we want one step per epoch and the run kept open.
    """

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.history: list[dict[str, float]] = []
        self.train_images = 0
        self._t0 = 0.0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        self.train_images += len(batch[1])

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        metrics = {
            k: float(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("train_", "val_"))
        }
        metrics["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        metrics["epoch_time_s"] = time.perf_counter() - self._t0
        tracking.log_metrics(self.run_id, metrics, step=trainer.current_epoch)
        self.history.append({"epoch": trainer.current_epoch, **metrics})


class MedianStopping(pl.Callback):
    """Stop a sweep job whose monitored metric is worse than the median of its finished
    siblings at the same epoch (the median stopping rule), and tag it as pruned."""

    def __init__(self, experiment_id: str, parent_id: str, cfg: DictConfig):
        self.experiment_id, self.parent_id = experiment_id, parent_id
        self.monitor, self.mode = cfg.trainer.monitor, cfg.trainer.monitor_mode
        self.after, self.min_finished = (
            cfg.sweep.median_stop.after_epochs,
            cfg.sweep.median_stop.min_finished,
        )
        self._histories: dict[str, dict[int, float]] = {}  # finished runs never change: cache

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        value = trainer.callback_metrics.get(self.monitor)
        if epoch + 1 < self.after or value is None:
            return
        from mlflow import MlflowClient

        client = MlflowClient()
        siblings = client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'FINISHED'",
        )
        for s in siblings:
            if s.info.run_id not in self._histories:
                history = client.get_metric_history(s.info.run_id, self.monitor)
                self._histories[s.info.run_id] = {h.step: h.value for h in history}
        at_epoch = [h[epoch] for h in self._histories.values() if epoch in h]
        if len(at_epoch) < self.min_finished:
            return
        median = statistics.median(at_epoch)
        value = float(value)
        if (value < median) if self.mode == "max" else (value > median):
            trainer.should_stop = True
            mlflow.set_tags({
                "equip.pruned": "true",
                "equip.pruned_reason": f"{self.monitor}={value:.4f} at epoch {epoch} is worse "
                f"than the median {median:.4f} of {len(at_epoch)} finished sibling(s)",
            })  # fmt: skip


def check_trainer(t: DictConfig) -> None:
    if t.max_epochs < 1:
        raise EquipError(f"trainer.max_epochs={t.max_epochs} must be at least 1.")
    if t.monitor_mode not in ("min", "max"):
        raise EquipError(f"trainer.monitor_mode={t.monitor_mode!r} must be 'min' or 'max'.")
    known = {f"val_{m}" for m in ("acc", "macro_f1", "loss")}
    if t.monitor not in known:
        raise EquipError(
            f"trainer.monitor={t.monitor!r} is not one of: {', '.join(sorted(known))}."
        )


def hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def train(
    cfg: DictConfig,
    overrides: Sequence[str] | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> dict[str, Any]:
    """Validate, load data, train, evaluate and log. Returns the run's id, name and metrics.

    `overrides` name the run (default: Hydra's task overrides); `callbacks` join the Trainer's.
    """
    apply_fast_path(parallel_jobs())
    overrides = hydra_overrides() if overrides is None else list(overrides)
    # Every check that needs no data comes first: a bad config fails in seconds.
    check_model(cfg.model, cfg.data.image_size)
    check_trainer(cfg.trainer)
    uri = tracking.connect(cfg.tracking)
    images = load_images(cfg.data)
    split = split_images(images, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.split_seed)
    exp_id = tracking.experiment_id(cfg.tracking.experiment, cfg.tracking.artifact_root)
    parent_id = sweeps.parent_run_id()
    name = tracking.run_name(cfg, sweeps.job_name_overrides(overrides) if parent_id else overrides)
    cfg_hash = sweeps.config_hash(cfg)
    if parent_id and cfg.sweep.resume:
        twin = sweeps.finished_twin(exp_id, parent_id, cfg_hash)
        if twin is not None:  # a resumed sweep: this exact config already finished
            return {"run_id": twin.info.run_id, "run_name": twin.info.run_name, "skipped": True,
                    "metrics": twin.data.metrics, "experiment_id": exp_id,
                    "location": tracking.run_location(uri, exp_id, twin.info.run_id)}  # fmt: skip
    tags = {"equip.version": __version__, "equip.data_fingerprint": images.fingerprint,
            "equip.data_source": images.source, "equip.config_hash": cfg_hash,
            **tracking.git_tags(Path(__file__).parent)}  # fmt: skip
    run = mlflow.start_run(experiment_id=exp_id, run_name=name, tags=tags, parent_run_id=parent_id)
    run_id = run.info.run_id
    log.info("MLflow run %s (%s)", name, run_id)
    ckpt_dir = tempfile.mkdtemp(prefix="equip-ckpt-")
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best",
        monitor=cfg.trainer.monitor, mode=cfg.trainer.monitor_mode, save_top_k=1,
    )  # fmt: skip
    callbacks = list(callbacks)
    if parent_id and cfg.sweep.median_stop.enabled:
        callbacks.append(MedianStopping(exp_id, parent_id, cfg))
    try:
        result = _fit_and_log(cfg, overrides, images, split, run_id, checkpoint, callbacks)
    except BaseException as e:
        _record_failure(e, checkpoint)
        e.mlflow_run_id = run_id  # type: ignore[attr-defined]  # tells the CLI a run exists
        raise
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    mlflow.end_run("FINISHED")
    result.update(run_id=run_id, run_name=name, experiment_id=exp_id,
                  location=tracking.run_location(uri, exp_id, run_id))  # fmt: skip
    return result


def _record_failure(error: BaseException, checkpoint: ModelCheckpoint) -> None:
    """Mark the run FAILED (KILLED on Ctrl-C) with the reason; keep the best checkpoint so far."""
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        mlflow.set_tag("equip.error", f"{type(error).__name__}: {error}"[:5000])
        mlflow.log_text("".join(traceback.format_exception(error)), "error.txt")
        if checkpoint.best_model_path and Path(checkpoint.best_model_path).exists():
            mlflow.log_artifact(checkpoint.best_model_path, "checkpoints")
    except Exception as log_error:  # the store itself may be what failed; still end the run
        log.warning("could not record the failure in MLflow: %s", log_error)
    finally:
        mlflow.end_run(status)


def _fit_and_log(
    cfg: DictConfig,
    overrides: list[str],
    images: ImageSet,
    split: np.ndarray,
    run_id: str,
    checkpoint: ModelCheckpoint,
    extra_callbacks: Sequence[pl.Callback],
) -> dict[str, Any]:
    counts = {s: int((split == s).sum()) for s in ("train", "val", "test")}
    module = Classifier(OmegaConf.to_container(cfg.model), images.classes, cfg.data.image_size)
    n_params = sum(p.numel() for p in module.parameters())
    mflops = mflops_per_image(module.net, cfg.data.image_size)
    mlflow.log_params(
        {
            **tracking.config_params(cfg),
            "dataset.fingerprint": images.fingerprint,
            "dataset.classes": ",".join(images.classes),
            "dataset.images": len(images.labels),
            **{f"dataset.{s}_images": n for s, n in counts.items()},
            "dataset.skipped_files": len(images.skipped),
            "dataset.decoded_files": images.decoded,
            "arch.params": n_params,
            "arch.mflops_per_image": round(mflops, 3),
        }
    )
    mlflow.log_text(tracking.redacted_yaml(cfg), "config/config.yaml")
    mlflow.log_text("\n".join(tracking.redact_overrides(overrides)) + "\n", "config/overrides.txt")
    mlflow.log_text(split_manifest(images, split), "data/split.csv")
    if images.skipped:
        mlflow.log_text("".join(f"{p}\t{why}\n" for p, why in images.skipped), "data/skipped.tsv")

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    epochs = EpochMetrics(run_id)
    callbacks: list[pl.Callback] = [checkpoint, epochs, *extra_callbacks]
    if cfg.trainer.patience > 0:
        callbacks.append(
            EarlyStopping(
                cfg.trainer.monitor, patience=cfg.trainer.patience, mode=cfg.trainer.monitor_mode
            )  # fmt: skip
        )
    if cfg.trainer.progress_bar:
        callbacks.append(RichProgressBar())
    trainer = pl.Trainer(
        accelerator="auto", devices=1, max_epochs=cfg.trainer.max_epochs, logger=False,
        callbacks=callbacks, enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0,
        limit_train_batches=cfg.trainer.limit_train_batches,
        limit_val_batches=cfg.trainer.limit_val_batches,
    )  # fmt: skip
    dm = ImageDataModule(images, split, cfg.data, cfg.seed)
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    train_time = time.perf_counter() - t0

    best = checkpoint.best_model_path
    model = Classifier.load_from_checkpoint(best, map_location="cpu") if best else module
    model.eval()
    # The selected (best) model, evaluated on the whole validation set.
    y_true, logits = _predict(model, dm.subset("val"))
    y_pred = logits.argmax(1)
    table = reports.per_class_table(images.classes, y_true, y_pred)
    final = {
        "best_val_acc": float((y_true == y_pred).float().mean()),
        "best_val_macro_f1": float(np.mean(table["f1"])),
        "best_val_loss": float(torch.nn.functional.cross_entropy(logits, y_true)),
        "best_epoch": _best_epoch(epochs.history, cfg.trainer.monitor, cfg.trainer.monitor_mode),
        "epochs_trained": len(epochs.history),
        "train_time_s": train_time,
        "train_images_per_s": epochs.train_images / max(train_time, 1e-9),
    }
    if counts["test"]:
        t_true, t_logits = _predict(model, dm.subset("test"))
        final["test_acc"] = float((t_true == t_logits.argmax(1)).float().mean())
    tracking.log_metrics(run_id, final, step=len(epochs.history))

    mlflow.log_table(table, "eval/per_class_metrics.json")
    mlflow.log_text(reports.table_csv(table), "eval/per_class_metrics.csv")
    fig, matrix = reports.confusion_figure(images.classes, y_true, y_pred)
    mlflow.log_figure(fig, "eval/confusion_matrix.png")
    rows = [",".join(["true\\pred", *images.classes])]
    rows += [
        ",".join([c, *map(str, r)]) for c, r in zip(images.classes, matrix.tolist(), strict=True)
    ]
    mlflow.log_text("\n".join(rows) + "\n", "eval/confusion_matrix.csv")
    if epochs.history:
        mlflow.log_figure(
            reports.learning_curves_figure(epochs.history), "eval/learning_curves.png"
        )
    if best:
        mlflow.log_artifact(best, "checkpoints")
    if cfg.tracking.log_model:
        _log_model(model, cfg.data.image_size)
    return {"metrics": final, "history": epochs.history}


def _predict(model: Classifier, subset) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        logits = [model(subset.x[i : i + 256]) for i in range(0, len(subset), 256)]
    return subset.y, torch.cat(logits)


def _best_epoch(history: list[dict[str, float]], monitor: str, mode: str) -> int:
    scored = [(h[monitor], h["epoch"]) for h in history if monitor in h]
    if not scored:
        return -1
    return int((max if mode == "max" else min)(scored, key=lambda s: s[0])[1])


def _log_model(model: Classifier, image_size: int) -> None:
    """The network as an MLflow PyTorch model: uint8 images (N, 3, S, S) in, class logits out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, image_size, image_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(model.classes)))]),
    )
    # Quiet mlflow's generic pickle warning: the model is our own class, loaded by our own code.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    mlflow.pytorch.log_model(
        model.net.eval(), name="model", signature=signature, serialization_format="pickle",
        metadata={"classes": model.classes, "image_size": image_size},
    )  # fmt: skip
