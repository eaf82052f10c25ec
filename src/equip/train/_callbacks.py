"""Lightning callbacks of a training run: per-epoch metrics to MLflow, a loss that is no longer
finite, a stop asked of a launcher's worker, and median stopping."""

from __future__ import annotations

import statistics
import time

import pytorch_lightning as pl
import torch

from equip.errors import TrainingFailed
from equip.runtime import stop_requested
from equip.sweep.context import MedianStop
from equip.track import queries, schema
from equip.track import record as tracking


class EpochMetrics(pl.Callback):
    """Sends each epoch's train and val metrics to MLflow in one batched request.

    Lightning's MLFlowLogger ends the run in finalize(), before we log the evaluation and the
    model, and logs against global_step; we want one step per epoch and the run kept open.
    """

    def __init__(self, run_id: str | None, history: list[dict[str, float]] | None = None):
        """`run_id` None: a rank > 0 of a distributed job, which logs nothing. `history`: the
        epochs a resumed run logged before it was cut off."""
        self.run_id = run_id
        self.history: list[dict[str, float]] = list(history or [])
        self.train_images = 0
        self._t0 = 0.0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        self.train_images += len(batch[1]) * trainer.world_size  # every rank sees its own batch

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
        epoch = trainer.current_epoch
        if self.run_id is None or any(h["epoch"] >= epoch for h in self.history):
            return  # another rank's copy, or an epoch a resumed run already logged
        heartbeat = {schema.HEARTBEAT: str(int(time.time()))}  # alive (equip.track.store)
        tracking.log_metrics(self.run_id, metrics, step=epoch, tags=heartbeat)
        self.history.append({"epoch": epoch, **metrics})


class FiniteLoss(pl.Callback):
    """Stop the run at the first training step whose loss is NaN or infinite, in one line that
    says what to change. Lightning's EarlyStopping(check_finite=True) only looks at an epoch's
    logged metric, and a learning rate that large can overflow the optimizer (an opaque
    RuntimeError) a few steps after the loss went NaN, long before the epoch ends."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None or bool(torch.isfinite(loss).all()):
            return
        what = "NaN" if bool(torch.isnan(loss).any()) else "infinite"
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        raise TrainingFailed(
            f"loss became {what} at epoch {trainer.current_epoch + 1} (step "
            f"{trainer.global_step}); lower model.lr (the learning rate was {lr:g})"
        )


class StopWhenAsked(pl.Callback):
    """A stop asked of a launcher's worker (equip.runtime.stop_requested: the sweep's Ctrl-C)
    ends training after the current batch, as a Ctrl-C there would: Lightning shuts down, and
    the run ends KILLED."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if stop_requested():
            raise KeyboardInterrupt

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, *_) -> None:
        if stop_requested():
            raise KeyboardInterrupt


class MedianStopping(pl.Callback):
    """Stop a sweep job whose monitored metric is worse than the median of its finished
    siblings at the same epoch (the median stopping rule), and tag it as pruned."""

    def __init__(
        self, run_id: str | None, experiment_id: str, parent_id: str, monitor: str, rule: MedianStop
    ):
        self.run_id, self.experiment_id, self.parent_id = run_id, experiment_id, parent_id
        self.monitor, self.mode, self.rule = monitor, schema.monitor_mode(monitor), rule
        self._histories: dict[str, dict[int, float]] = {}  # finished runs never change: cache

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        value = trainer.callback_metrics.get(self.monitor)
        if epoch + 1 < self.rule.after_epochs or value is None:
            return
        # Rank 0 decides, every rank stops: a rank that trains on alone waits forever.
        stop = self._decide(epoch, float(value)) if self.run_id is not None else False
        trainer.should_stop = trainer.should_stop or bool(trainer.strategy.broadcast(stop, src=0))

    def _decide(self, epoch: int, value: float) -> bool:
        from mlflow import MlflowClient

        client = MlflowClient()
        siblings = queries.search_runs(
            client,
            [self.experiment_id],
            queries.children_of(self.parent_id),
            queries.has_status("FINISHED"),
        )
        for s in siblings:
            if s.info.run_id not in self._histories:
                history = client.get_metric_history(s.info.run_id, self.monitor)
                self._histories[s.info.run_id] = {h.step: h.value for h in history}
        at_epoch = [h[epoch] for h in self._histories.values() if epoch in h]
        if len(at_epoch) < self.rule.min_finished:
            return False
        median = statistics.median(at_epoch)
        if (value < median) if self.mode == "max" else (value > median):
            client.set_tag(self.run_id, schema.PRUNED, "true")
            client.set_tag(
                self.run_id,
                schema.PRUNED_REASON,
                f"{self.monitor}={value:.4f} at epoch {epoch} is worse than the median "
                f"{median:.4f} of {len(at_epoch)} finished sibling(s)",
            )
            return True
        return False
