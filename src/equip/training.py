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
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar

from equip import __version__, reports, sweeps, tracking
from equip.data import (
    ImageDataModule,
    ImageSet,
    check_fractions,
    load_images,
    split_images,
    split_manifest,
)
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


def check_config(cfg: DictConfig) -> None:
    """Every check that needs no data, so that a bad config fails in seconds."""
    check_fractions(cfg.data.val_fraction, cfg.data.test_fraction)
    if cfg.model.name == "baseline":
        from equip.baseline import check_baseline

        check_baseline(cfg.model)
        if cfg.register:
            raise EquipError("register=true registers a CNN that beats the baseline; the "
                             "baseline itself is the reference. Drop register=true.")  # fmt: skip
    else:
        check_model(cfg.model, cfg.data.image_size)
        check_trainer(cfg.trainer)
    if cfg.register:
        if not cfg.tracking.log_model:
            raise EquipError("register=true needs the model logged: drop tracking.log_model=false.")
        if cfg.registry.metric not in ("best_val_acc", "best_val_macro_f1"):
            raise EquipError(f"registry.metric={cfg.registry.metric!r} must be best_val_acc or "
                             "best_val_macro_f1 (higher is better).")  # fmt: skip


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
    expected = "min" if t.monitor == "val_loss" else "max"
    if t.monitor_mode != expected:
        raise EquipError(f"trainer.monitor={t.monitor} is better when lower/higher: set "
                         f"trainer.monitor_mode={expected}.")  # fmt: skip


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
    `model=baseline` trains the scikit-learn baseline through the same path.
    """
    apply_fast_path(parallel_jobs())
    overrides = hydra_overrides() if overrides is None else list(overrides)
    check_config(cfg)
    uri = tracking.connect(cfg.tracking)
    images = load_images(cfg.data)
    d = cfg.data
    split = split_images(images, d.val_fraction, d.test_fraction, d.split_seed, d.group_pattern)
    exp_id = tracking.experiment_id(cfg.tracking.experiment, cfg.tracking.artifact_root)
    parent_id = sweeps.parent_run_id()
    name = tracking.run_name(cfg, sweeps.job_name_overrides(overrides) if parent_id else overrides)
    cfg_hash = sweeps.config_hash(cfg, images.fingerprint)
    if parent_id and cfg.sweep.resume:
        twin = sweeps.finished_twin(exp_id, parent_id, cfg_hash)
        if twin is not None:  # a resumed sweep: this exact config already finished
            return {"run_id": twin.info.run_id, "run_name": twin.info.run_name, "skipped": True,
                    "metrics": twin.data.metrics, "experiment_id": exp_id,
                    "location": tracking.run_location(uri, exp_id, twin.info.run_id)}  # fmt: skip
    tags = {"equip.version": __version__, "equip.data_fingerprint": images.fingerprint,
            "equip.data_source": images.source, "equip.config_hash": cfg_hash,
            "equip.model_kind": str(cfg.model.name),
            **tracking.git_tags(Path(__file__).parent)}  # fmt: skip
    ckpt_dir = tempfile.mkdtemp(prefix="equip-ckpt-")
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best",
        monitor=cfg.trainer.monitor, mode=cfg.trainer.monitor_mode, save_top_k=1,
    )  # fmt: skip
    callbacks = list(callbacks)
    if parent_id and cfg.sweep.median_stop.enabled:
        callbacks.append(MedianStopping(exp_id, parent_id, cfg))
    run = mlflow.start_run(experiment_id=exp_id, run_name=name, tags=tags, parent_run_id=parent_id)
    run_id = run.info.run_id
    try:  # from here on, any failure ends the run as FAILED/KILLED with its reason
        log.info("MLflow run %s (%s)", name, run_id)
        _log_inputs(cfg, overrides, images, split)
        if cfg.model.name == "baseline":
            result = _fit_baseline(cfg, images, split, run_id)
        else:
            result = _fit_cnn(cfg, images, split, run_id, checkpoint, callbacks)
        if cfg.register and result.get("model_uri"):
            from equip.registry import register_if_better

            score = result["metrics"][cfg.registry.metric]
            result["registry"] = register_if_better(
                run_id, result["model_uri"], cfg, images.fingerprint, score
            )
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
    # Lightning turns Ctrl-C during fit() into SystemExit: both mean the user stopped it.
    status = "KILLED" if isinstance(error, KeyboardInterrupt | SystemExit) else "FAILED"
    try:
        mlflow.set_tag("equip.error", f"{type(error).__name__}: {error}"[:5000])
        mlflow.log_text("".join(traceback.format_exception(error)), "error.txt")
        if checkpoint.best_model_path and Path(checkpoint.best_model_path).exists():
            mlflow.log_artifact(checkpoint.best_model_path, "checkpoints")
    except Exception as log_error:  # the store itself may be what failed; still end the run
        log.warning("could not record the failure in MLflow: %s", log_error)
    finally:
        mlflow.end_run(status)


def _log_inputs(cfg: DictConfig, overrides: list[str], images: ImageSet, split: np.ndarray):
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
    mlflow.log_text("\n".join(tracking.redact_overrides(overrides)) + "\n", "config/overrides.txt")
    mlflow.log_text(split_manifest(images, split), "data/split.csv")
    if images.skipped:
        mlflow.log_text("".join(f"{p}\t{why}\n" for p, why in images.skipped), "data/skipped.tsv")


def _log_evaluation(
    run_id: str, classes: list[str], y_true: torch.Tensor, probs: torch.Tensor,
    final: dict[str, float], step: int,
) -> dict[str, float]:  # fmt: skip
    """What came out, the same for CNN and baseline: final metrics (best_val_*), the per-class
    table and the confusion matrix of the selected model on the whole validation set."""
    y_pred = probs.argmax(1)
    table = reports.per_class_table(classes, y_true, y_pred)
    final = {
        "best_val_acc": float((y_true == y_pred).float().mean()),
        "best_val_macro_f1": float(np.mean(table["f1"])),
        "best_val_loss": float(torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), y_true)),
        **final,
    }
    tracking.log_metrics(run_id, final, step=step)
    mlflow.log_table(table, "eval/per_class_metrics.json")
    mlflow.log_text(reports.table_csv(table), "eval/per_class_metrics.csv")
    fig, matrix = reports.confusion_figure(classes, y_true, y_pred)
    mlflow.log_figure(fig, "eval/confusion_matrix.png")
    reports.close(fig)
    mlflow.log_text(reports.matrix_csv(classes, matrix), "eval/confusion_matrix.csv")
    return final


def _fit_cnn(
    cfg: DictConfig,
    images: ImageSet,
    split: np.ndarray,
    run_id: str,
    checkpoint: ModelCheckpoint,
    extra_callbacks: Sequence[pl.Callback],
) -> dict[str, Any]:
    # Seed before the weights exist: a job's result must not depend on the jobs before it.
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = Classifier(OmegaConf.to_container(cfg.model), images.classes, cfg.data.image_size)
    mlflow.log_params({
        "arch.params": sum(p.numel() for p in module.parameters()),
        "arch.mflops_per_image": round(mflops_per_image(module.net, cfg.data.image_size), 3),
    })  # fmt: skip
    epochs = EpochMetrics(run_id)
    callbacks: list[pl.Callback] = [checkpoint, epochs, *extra_callbacks]
    if cfg.trainer.patience > 0:
        callbacks.append(EarlyStopping(cfg.trainer.monitor, patience=cfg.trainer.patience,
                                       mode=cfg.trainer.monitor_mode))  # fmt: skip
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
    if not best:  # no validation score was ever recorded: keep the last weights
        best = str(Path(checkpoint.dirpath) / "last.ckpt")
        trainer.save_checkpoint(best)
    model = Classifier.load_from_checkpoint(best, map_location="cpu").eval()
    y_true, probs = _predict(model, dm.subset("val"))
    final = {
        "best_epoch": _best_epoch(epochs.history, cfg.trainer.monitor, cfg.trainer.monitor_mode),
        "epochs_trained": len(epochs.history),
        "train_time_s": train_time,
        "train_images_per_s": epochs.train_images / max(train_time, 1e-9),
    }
    if (split == "test").any():
        t_true, t_probs = _predict(model, dm.subset("test"))
        final["test_acc"] = float((t_true == t_probs.argmax(1)).float().mean())
    final = _log_evaluation(run_id, images.classes, y_true, probs, final, len(epochs.history))
    if epochs.history:
        fig = reports.learning_curves_figure(epochs.history)
        mlflow.log_figure(fig, "eval/learning_curves.png")
        reports.close(fig)
    mlflow.log_artifact(best, "checkpoints")
    result: dict[str, Any] = {"metrics": final, "history": epochs.history}
    if cfg.tracking.log_model:
        from equip.serving import log_pyfunc

        result["model_uri"] = log_pyfunc(best, images.classes, cfg.data.image_size)
    return result


def _fit_baseline(
    cfg: DictConfig, images: ImageSet, split: np.ndarray, run_id: str
) -> dict[str, Any]:
    from equip.baseline import fit_baseline, predict_proba

    def flat(name: str) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(split == name)
        return images.images[idx].reshape(len(idx), -1).numpy(), images.labels[idx].numpy()

    x_train, y_train = flat("train")
    pipeline, fit_time = fit_baseline(cfg.model, x_train, y_train, cfg.data.image_size, cfg.seed)
    n = len(images.classes)
    x_val, y_val = flat("val")
    probs = torch.from_numpy(predict_proba(pipeline, x_val, n))
    final = {"train_time_s": fit_time, "epochs_trained": 1,
             "train_acc": float((pipeline.predict(x_train) == y_train).mean())}  # fmt: skip
    if (split == "test").any():
        x_test, y_test = flat("test")
        final["test_acc"] = float((pipeline.predict(x_test) == y_test).mean())
    final = _log_evaluation(run_id, images.classes, torch.from_numpy(y_val), probs, final, 0)
    # The per-epoch names too, so baseline and CNN runs sort side by side in the MLflow UI.
    tracking.log_metrics(run_id, {k.removeprefix("best_"): v for k, v in final.items()
                                  if k.startswith("best_val_")}, step=0)  # fmt: skip
    result: dict[str, Any] = {"metrics": final}
    if cfg.tracking.log_model:
        import mlflow.sklearn
        from mlflow.models import infer_signature

        signature = infer_signature(x_val[:2], pipeline.predict(x_val[:2]))
        info = mlflow.sklearn.log_model(pipeline, name="model", signature=signature,
                                        skops_trusted_types=TRUSTED_SKLEARN_TYPES,
                                        metadata={"classes": images.classes,
                                                  "image_size": cfg.data.image_size})  # fmt: skip
        result["model_uri"] = info.model_uri
    return result


# Types skops would refuse to load back: our feature function, and the random forest's trees.
# Both come from this very process, so the saved model is trusted.
TRUSTED_SKLEARN_TYPES = ["equip.baseline.image_features", "sklearn.tree._tree.Tree"]


def _predict(model: Classifier, subset) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and class probabilities of a whole subset."""
    with torch.inference_mode():
        logits = [model(subset.x[i : i + 256]) for i in range(0, len(subset), 256)]
    return subset.y, torch.cat(logits).softmax(1)


def _best_epoch(history: list[dict[str, float]], monitor: str, mode: str) -> int:
    scored = [(h[monitor], h["epoch"]) for h in history if monitor in h]
    if not scored:
        return -1
    return int((max if mode == "max" else min)(scored, key=lambda s: s[0])[1])
