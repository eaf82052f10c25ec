"""The choices of the config: every option with a fixed set of values is a StrEnum here, the
one list of their names. equip.config.schema types config keys with them (so Hydra refuses an
unknown choice while composing, naming the key); equip.model.cnn maps them to torch.
"""

from __future__ import annotations

from enum import StrEnum


# StrEnum members are str: `cfg.model.pool == "max"`, f-strings and MLflow params read as before.
class DataKind(StrEnum):
    synthetic = "synthetic"
    folder = "folder"


class Pool(StrEnum):
    max = "max"
    avg = "avg"
    none = "none"


class Activation(StrEnum):
    relu = "relu"
    gelu = "gelu"
    silu = "silu"
    leaky_relu = "leaky_relu"


class Head(StrEnum):
    flatten = "flatten"
    gap = "gap"  # global average pool


class Optimizer(StrEnum):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class Scheduler(StrEnum):
    none = "none"
    cosine = "cosine"
    onecycle = "onecycle"
    plateau = "plateau"


class TTA(StrEnum):  # test-time augmentation (equip.model.cnn.tta_views)
    none = "none"
    hflip = "hflip"
    multiscale = "multiscale"  # zoomed out, as is, zoomed in
    multiscale_hflip = "multiscale_hflip"  # each scale and its mirror


class AugmentPolicy(StrEnum):  # torchvision's automatic augmentation policies
    none = "none"
    trivialaugment = "trivialaugment"
    randaugment = "randaugment"


class Mix(StrEnum):  # mixing two training images and their labels (transforms.v2)
    none = "none"
    mixup = "mixup"
    cutmix = "cutmix"


class Estimator(StrEnum):
    logreg = "logreg"
    random_forest = "random_forest"
    svm = "svm"


class Feature(StrEnum):
    pixels = "pixels"
    hog = "hog"
    color_hist = "color_hist"


class GroupBy(StrEnum):  # what ties images into one split group (equip.data.grouping)
    name = "name"  # data.group_pattern matches
    bytes = "bytes"
    near_duplicate = "near_duplicate"


class Monitor(StrEnum):  # equip.track.schema.MONITOR_MODES says which way each is better
    val_acc = "val_acc"
    val_macro_f1 = "val_macro_f1"
    val_loss = "val_loss"


class Keep(StrEnum):
    best = "best"
    last = "last"


class Accelerator(StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    cuda = "cuda"
    mps = "mps"


class Strategy(StrEnum):
    # What is tested. ddp_spawn is left out: it trains in spawned copies, so the run's callbacks
    # in this process never see the result; fsdp/deepspeed are untested here.
    auto = "auto"
    ddp = "ddp"
    ddp_find_unused_parameters_true = "ddp_find_unused_parameters_true"


class RegistryModel(StrEnum):  # what a CV sweep ships (equip.train.ensemble)
    single = "single"  # each run its own model; a final fit is the one to register
    ensemble = "ensemble"  # the sweep's parent logs the fold models' average


class Gate(StrEnum):
    holdout = "holdout"
    cv = "cv"


class RegistryMetric(StrEnum):  # higher is better for both
    best_val_acc = "best_val_acc"
    best_val_macro_f1 = "best_val_macro_f1"


class TrackingKind(StrEnum):
    local = "local"
    azureml = "azureml"


# Every choice: torch.load(weights_only=True) must be told these classes are safe to load when a
# checkpoint's hyper-parameters hold one (equip.model.cnn does).
CHOICES: tuple[type[StrEnum], ...] = (
    *(DataKind, GroupBy, Pool, Activation, Head, Optimizer, Scheduler, TTA, Estimator, Feature),
    *(Monitor, Keep, Accelerator, Strategy, Gate, RegistryMetric, TrackingKind),
    *(AugmentPolicy, Mix, RegistryModel),
)
