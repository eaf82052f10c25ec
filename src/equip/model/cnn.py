"""The CNN built from `conf/model/*.yaml` and its LightningModule.

Default = the Lab05 architecture: 3-channel input -> [Conv2d -> MaxPool] x len(filters) -> Dense.
Recipe options: several convs per block, residual blocks, label smoothing, test-time
augmentation (model.tta: mirror and scales, applied by forward() in eval mode, so evaluation,
the pyfunc and equip.serve.predict all use it); soft targets from mixed batches
(data.augment.mix); weight averaging (model.ema_decay, trainer.swa_lrs) is Lightning callbacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn

from equip.config import checks
from equip.config.checks import kernel_sizes
from equip.config.choices import CHOICES, Activation, Optimizer, Pool

# The config's choices (Enums of equip.config.schema) -> torch; str keys match them too.
ACTIVATIONS = {
    Activation.relu: nn.ReLU,
    Activation.gelu: nn.GELU,
    Activation.silu: nn.SiLU,
    Activation.leaky_relu: nn.LeakyReLU,
}
POOLS = {Pool.max: nn.MaxPool2d, Pool.avg: nn.AvgPool2d, Pool.none: None}
OPTIMIZERS = {
    Optimizer.adam: torch.optim.Adam,
    Optimizer.adamw: torch.optim.AdamW,
    Optimizer.sgd: torch.optim.SGD,
}
assert set(ACTIVATIONS) == set(Activation) and set(POOLS) == set(Pool)  # a new choice is mapped
assert set(OPTIMIZERS) == set(Optimizer)
# hparams from OmegaConf.to_container(cfg.model) hold the Enum members: let checkpoints load them.
torch.serialization.add_safe_globals(list(CHOICES))


def _convs(c_in: int, c_out: int, k: int, n: int, batch_norm: bool, act, last_act: bool):
    layers: list[nn.Module] = []
    for i in range(n):
        layers.append(
            nn.Conv2d(c_in if i == 0 else c_out, c_out, k, padding="same", bias=not batch_norm)
        )
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        if last_act or i < n - 1:
            layers.append(act())
    return layers


class ResidualBlock(nn.Module):
    """act(convs(x) + skip(x)); the skip is a 1x1 conv where the width changes."""

    def __init__(self, c_in: int, c_out: int, k: int, n: int, batch_norm: bool, act):
        super().__init__()
        self.body = nn.Sequential(*_convs(c_in, c_out, k, n, batch_norm, act, last_act=False))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


def build_net(m: Mapping, num_classes: int, image_size: int) -> nn.Sequential:
    checks.check_model(m, image_size)
    act = ACTIVATIONS[m["activation"]]
    pool = POOLS[m["pool"]]
    layers: list[nn.Module] = [Normalize()]
    c_in, size = 3, image_size
    n, bn = m["convs_per_block"], m["batch_norm"]
    for c_out, k in zip(m["filters"], kernel_sizes(m), strict=True):
        if m["residual"]:
            layers.append(ResidualBlock(c_in, c_out, k, n, bn, act))
        else:  # flat: the convs sit directly in the Sequential
            layers += _convs(c_in, c_out, k, n, bn, act, last_act=True)
        if pool is not None:
            layers.append(pool(2))
            size //= 2
        c_in = c_out
    if m["head"] == "gap":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        width = c_in
    else:
        layers.append(nn.Flatten())
        width = c_in * size * size
    for h in m["hidden"]:
        if m["dropout"]:
            layers.append(nn.Dropout(m["dropout"]))
        layers += [nn.Linear(width, h), act()]
        width = h
    if m["dropout"]:
        layers.append(nn.Dropout(m["dropout"]))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def mflops_per_image(net: nn.Module, image_size: int) -> float:
    """Forward-pass MFLOPs for one image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    was_training = net.training
    with counter, torch.no_grad():
        net.eval()(torch.zeros(1, 3, image_size, image_size))
    net.train(was_training)
    return counter.get_total_flops() / 1e6


TTA_SCALES = (0.9, 1.1)  # zoomed out and in around the image as it is; crop_scale=0.8 covers it


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The images a prediction averages over (model.tta), each the size of `x`: zooming out
    pads with white (the preprocessing's background), zooming in crops the centre."""
    from torchvision.transforms.v2 import functional as tvf

    views = [x]
    if tta in ("multiscale", "multiscale_hflip"):
        size = x.shape[-1]
        for scale in TTA_SCALES:
            side = round(size * scale)
            resized = tvf.resize(x, [side, side], antialias=True)
            if side < size:
                before = (size - side) // 2
                pad = [before, before, size - side - before, size - side - before]
                views.append(tvf.pad(resized, pad, fill=255))
            else:
                views.append(tvf.center_crop(resized, [size, size]))
    if tta in ("hflip", "multiscale_hflip"):
        views += [v.flip(-1) for v in views]
    return views


class Normalize(nn.Module):
    """uint8 images -> float in [-1, 1], channels_last (about 10% faster convolutions on CPU).
    Part of the network, so a logged model takes the same uint8 images the data module yields."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.get_default_dtype()).mul(2 / 255).sub(1)  # a *-true precision sets it
        return x.contiguous(memory_format=torch.channels_last)


class Classifier(pl.LightningModule):
    """Everything needed to rebuild it is in its hyperparameters, so a checkpoint loads alone:
    `Classifier.load_from_checkpoint(path)`."""

    def __init__(self, model: dict[str, Any], classes: list[str], image_size: int):
        super().__init__()
        self.save_hyperparameters()
        num_classes = len(classes)
        self.classes, self.image_size = list(classes), image_size
        self.net = build_net(model, num_classes, image_size).to(memory_format=torch.channels_last)
        self.opt = model
        self.tta = model["tta"]
        self.loss = nn.CrossEntropyLoss(label_smoothing=model["label_smoothing"])
        metrics = torchmetrics.MetricCollection(
            {
                "acc": torchmetrics.classification.MulticlassAccuracy(num_classes, average="micro"),
                "macro_f1": torchmetrics.classification.MulticlassF1Score(num_classes),
            }
        )
        self.train_metrics = metrics.clone(prefix="train_")
        self.val_metrics = metrics.clone(prefix="val_")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.tta == "none":
            return self.net(x)
        # TTA: mean of the probabilities of the views, returned as log probabilities so that
        # softmax (serving) and cross-entropy (val_loss) still apply.
        # The views go through the network as one batch: one call, not one per view.
        views = tta_views(x, self.tta)
        probs = self.net(torch.cat(views)).softmax(1)
        return probs.unflatten(0, (len(views), x.shape[0])).mean(0).log()

    def _step(self, batch, stage: str, metrics: torchmetrics.MetricCollection) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss(logits, y)  # y: class ids, or class probabilities (a mixed batch)
        metrics.update(logits, y.argmax(1) if y.ndim == 2 else y)
        # sync_dist: with several processes the epoch loss is the mean over every rank's images
        # (the torchmetrics objects sync their own states).
        self.log(
            f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True
        )
        self.log_dict(metrics, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val", self.val_metrics)

    def configure_optimizers(self):
        o = self.opt
        kwargs = {"lr": o["lr"], "weight_decay": o["weight_decay"]}
        if o["optimizer"] == "sgd":
            kwargs["momentum"] = 0.9
        optimizer = OPTIMIZERS[o["optimizer"]](self.parameters(), **kwargs)
        if o["scheduler"] == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=max(self.trainer.max_epochs or 1, 1)
            )
            return {"optimizer": optimizer, "lr_scheduler": sched}
        if o["scheduler"] == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=o["lr"], total_steps=self.trainer.estimated_stepping_batches
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": sched, "interval": "step"},
            }
        if o["scheduler"] == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=2)
            # A final fit runs no validation: there the plateau is the training loss's.
            validates = self.trainer.limit_val_batches != 0
            monitor = "val_loss" if validates else "train_loss"
            scheduler = {"scheduler": sched, "monitor": monitor}
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        return optimizer


def load_classifier(path: str) -> Classifier:
    """A trained CNN from its checkpoint, for inference. torch.load reads only tensors and plain
    values here (Lightning's default, weights_only): a file that would run code when unpickled
    is refused, in one line that names the file and what it tried to load."""
    import pickle
    import warnings

    from equip.errors import EquipError

    try:
        with warnings.catch_warnings():  # torch's notice on a raw pickle's protocol: noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return Classifier.load_from_checkpoint(path, map_location="cpu").eval()
    except pickle.UnpicklingError as e:
        # torch's text suggests weights_only=False, i.e. running the file's code: never that.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), "")
        raise EquipError(
            f"{path} is not a checkpoint that can be loaded safely: it holds objects other than "
            f"weights ({why.rstrip('.') or 'unknown content'}). Use a checkpoint that equip wrote "
            "(a run's checkpoints/ artifact) from a source you trust."
        ) from None
