"""Every check of a config that needs no data, for single runs and whole-sweep validation alike.

Each failure is an EquipError whose one line names the key and the fix. No torch here: a sweep
validates all its points in a fraction of a second.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from equip.errors import EquipError
from equip.track import schema

# The names a config may use; equip.model.cnn maps them to torch classes.
POOLS = ("max", "avg", "none")
ACTIVATIONS = ("relu", "gelu", "silu", "leaky_relu")
HEADS = ("flatten", "gap")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "onecycle", "plateau")
TTAS = ("none", "hflip")
ESTIMATORS = ("logreg", "random_forest", "svm")
FEATURES = ("pixels", "hog", "color_hist")
DATA_KINDS = ("synthetic", "folder")
MAX_IMAGE_SIZE = 1024
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
# What is tested. ddp_spawn is left out: it trains in spawned copies, so the run's callbacks in
# this process never see the result; fsdp/deepspeed are untested here.
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true")
PRECISIONS = (
    "auto",
    "32-true",
    "32",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "64-true",
    "64",
)


def check_config(cfg: DictConfig) -> None:
    """Raise EquipError for the first bad value, before any data is read or run created."""
    check_data(cfg.data)
    if cfg.model.name == "baseline":
        check_baseline(cfg.model)
        if cfg.registry.enabled:
            raise EquipError(
                "registry.enabled=true registers a CNN that beats the baseline, "
                "the reference itself. Drop registry.enabled=true."
            )
    else:
        check_model(cfg.model, cfg.data.image_size)
        check_trainer(cfg.trainer)
    _integer(cfg, "seed")
    if _flag(cfg, "final_fit"):
        if cfg.model.name == "baseline":
            raise EquipError(
                "final_fit=true retrains a CNN on every image; the baseline is "
                "fitted in seconds on any split: drop final_fit=true."
            )
        if cfg.data.folds is not None:
            raise EquipError(
                f"final_fit=true trains on every image: drop data.folds="
                f"{cfg.data.folds} (its CV sweep gives the score)."
            )
        if cfg.trainer.strategy != "auto" and cfg.trainer.keep != "last":
            # only rank 0 reads the folds' epochs from MLflow; the other ranks must agree
            raise EquipError(
                "final_fit=true with trainer.strategy=ddp needs trainer.keep=last "
                "(every rank trains trainer.max_epochs)."
            )
    _choice(cfg.registry, "gate", ("holdout", "cv"), "registry")
    if cfg.registry.enabled and cfg.registry.gate == "cv" and cfg.data.folds is not None:
        raise EquipError(
            "registry.gate=cv registers a model trained outside the CV sweep: "
            "drop data.folds and use final_fit=true."
        )
    if cfg.registry.enabled and cfg.final_fit and cfg.registry.gate != "cv":
        raise EquipError(
            "final_fit=true has no validation score to compare: use "
            "registry.gate=cv with registry.enabled=true."
        )
    if cfg.resume is not None:
        if cfg.model.name == "baseline":
            raise EquipError(
                "resume= continues a CNN run from its checkpoint; the baseline "
                "trains in one go. Drop resume=."
            )
        if not cfg.data.cache_dir:
            raise EquipError(
                "resume= needs data.cache_dir, where runs keep their last "
                "checkpoint. Set it back (default .cache/equip)."
            )
    if cfg.registry.enabled:
        if not cfg.tracking.log_model:
            raise EquipError(
                "registry.enabled=true needs the model logged: drop tracking.log_model=false."
            )
        if cfg.registry.metric not in ("best_val_acc", "best_val_macro_f1"):
            raise EquipError(
                f"registry.metric={cfg.registry.metric!r} must be best_val_acc or "
                "best_val_macro_f1 (higher is better)."
            )


# ---------------------------------------------------------------- typed values
def _value(cfg: DictConfig, key: str) -> Any:
    if OmegaConf.is_missing(cfg, key):
        raise EquipError(
            f"{_full(cfg, key)} is required: set it on the command line ({_full(cfg, key)}=...)."
        )
    return cfg[key]


def _full(cfg: DictConfig, key: str) -> str:
    """'data.image_size' for key 'image_size' of cfg.data."""
    return cfg._get_full_key(key)  # OmegaConf's own dotted path of a node's key


def _integer(cfg: DictConfig, key: str, low: int | None = None, high: int | None = None) -> int:
    v = _value(cfg, key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise EquipError(f"{_full(cfg, key)}={v!r} must be a whole number.")
    _in_range(cfg, key, v, low, high)
    return v


def _number(cfg: DictConfig, key: str, low: float | None = None, high: float | None = None):
    v = _value(cfg, key)
    if isinstance(v, bool) or not isinstance(v, int | float) or v != v:
        raise EquipError(f"{_full(cfg, key)}={v!r} must be a number.")
    _in_range(cfg, key, v, low, high)
    return float(v)


def _in_range(cfg: DictConfig, key: str, v: float, low, high) -> None:
    if (low is not None and v < low) or (high is not None and v > high):
        raise EquipError(f"{_full(cfg, key)}={v} must be {_bounds(low, high)}.")


def _bounds(low, high) -> str:
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    return f">= {low}" if low is not None else f"<= {high}"


def _choice(cfg: DictConfig | Mapping, key: str, allowed: tuple[str, ...], where: str) -> str:
    v = cfg[key]
    if v not in allowed:
        raise EquipError(f"{where}.{key}={v!r} is not one of: {', '.join(allowed)}.")
    return v


def _flag(cfg: DictConfig, key: str) -> bool:
    v = _value(cfg, key)
    if not isinstance(v, bool):
        raise EquipError(f"{_full(cfg, key)}={v!r} must be true or false.")
    return v


# ---------------------------------------------------------------- data
def check_data(d: DictConfig) -> None:
    kind = _choice(d, "kind", DATA_KINDS, "data")
    _integer(d, "image_size", 8, MAX_IMAGE_SIZE)
    _integer(d, "batch_size", 1)
    check_fractions(_number(d, "val_fraction"), _number(d, "test_fraction"))
    _integer(d, "split_seed")
    if d.group_pattern is not None:
        try:
            re.compile(str(d.group_pattern))
        except re.error as e:
            raise EquipError(
                f"data.group_pattern={d.group_pattern!r} is not a valid regex: {e}. "
                r"Example: '^(\d+)[x_]'."
            ) from None
    if d.folds is not None:
        folds = _integer(d, "folds", 2, 100)
        _integer(d, "fold", 0, folds - 1)
        if d.test_fraction:
            raise EquipError(
                f"data.test_fraction={d.test_fraction} with data.folds={folds}: "
                "each image is validated once; set data.test_fraction=0."
            )
    a = d.augment
    if a.crop_scale is not None and not 0 < _number(a, "crop_scale") <= 1:
        raise EquipError(f"data.augment.crop_scale={a.crop_scale} must be in (0, 1], or null.")
    _number(a, "color_jitter", 0)
    _number(a, "rotation", 0, 180)
    _number(a, "translate", 0, 0.5)
    _number(a, "erasing", 0, 1)
    _flag(a, "hflip")
    _flag(a, "vflip")
    _integer(d, "num_workers", 0)
    _number(d, "ram_budget_mb", 0)
    if kind == "synthetic":
        _integer(d, "per_class", 1, 100_000)
        _integer(d, "generator_seed")
    else:
        if OmegaConf.is_missing(d, "root") or not d.root:
            raise EquipError(
                "data=folder needs data.root=PATH: a folder with one sub-folder of "
                "images per class."
            )


def check_decoded_size(n_images: int, image_size: int, cache_dir: str | None, count: str) -> None:
    """Fail in a moment, not after hours of decoding, when the decoded images cannot fit where
    they go: the disk of data.cache_dir, or RAM without one. `count` is the key that sets N."""
    import os
    import shutil
    from pathlib import Path

    need = n_images * 3 * image_size * image_size
    if cache_dir:
        where = Path(cache_dir).expanduser().resolve()
        while not where.exists():  # not made yet: the disk it will be made on
            where = where.parent
        free, place = shutil.disk_usage(where).free, f"the disk of data.cache_dir={cache_dir}"
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        place = "RAM (data.cache_dir=null)"
    if need > free:
        raise EquipError(
            f"{count} with data.image_size={image_size}: {n_images} decoded images "
            f"need {need / 2**30:.1f} GiB but {place} has {free / 2**30:.1f} GiB "
            f"free. Lower data.image_size or {count.split('=')[0]}, or point "
            "data.cache_dir at a bigger disk."
        )


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise EquipError(f"data.val_fraction={val_fraction} must be between 0 and 1 (e.g. 0.2).")
    if not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise EquipError(
            f"data.test_fraction={test_fraction} must be >= 0 and leave training images "
            f"(val_fraction + test_fraction < 1, now {val_fraction + test_fraction})."
        )


# ---------------------------------------------------------------- model
def kernel_sizes(m: Mapping) -> list[int]:
    ks = m["kernel_sizes"]
    return [int(ks)] * len(m["filters"]) if isinstance(ks, int) else [int(k) for k in ks]


def check_model(m: Mapping, image_size: int) -> None:
    """Raise EquipError naming the key for any architecture that cannot be built or trained."""
    filters = list(m["filters"])
    if not filters or not all(
        isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in filters
    ):
        raise EquipError(
            f"model.filters={filters} must be a non-empty list of positive ints, e.g. [32,64]."
        )
    ks = m["kernel_sizes"]
    if isinstance(ks, int | str | float):
        if not isinstance(ks, int):
            raise EquipError(f"model.kernel_sizes={ks!r} must be an int or a list of ints.")
    elif len(ks) != len(filters):
        raise EquipError(
            f"model.kernel_sizes={list(ks)} has {len(ks)} entries but model.filters={filters} "
            f"has {len(filters)}: give one kernel size per conv block, or a single int for all."
        )
    elif not all(isinstance(k, int) for k in ks):
        raise EquipError(f"model.kernel_sizes={list(ks)} must be ints.")
    for key, allowed in (
        ("pool", POOLS),
        ("activation", ACTIVATIONS),
        ("head", HEADS),
        ("optimizer", OPTIMIZERS),
        ("scheduler", SCHEDULERS),
        ("tta", TTAS),
    ):
        _choice(m, key, allowed, "model")
    check_recipe(m)
    for key in ("lr", "weight_decay", "dropout"):
        if isinstance(m[key], bool) or not isinstance(m[key], int | float):
            raise EquipError(f"model.{key}={m[key]!r} must be a number.")
    if not m["lr"] > 0:
        raise EquipError(f"model.lr={m['lr']} must be positive, e.g. model.lr=0.001.")
    if m["weight_decay"] < 0:
        raise EquipError(f"model.weight_decay={m['weight_decay']} must be >= 0.")
    if not 0 <= m["dropout"] < 1:
        raise EquipError(f"model.dropout={m['dropout']} must be in [0, 1).")
    if isinstance(m["hidden"], str | int) or not all(
        isinstance(h, int) and h > 0 for h in m["hidden"]
    ):
        raise EquipError(f"model.hidden={m['hidden']} must be a list of positive ints, e.g. [128].")
    blocks = len(filters)
    if m["pool"] != "none" and image_size >> blocks < 1:
        raise EquipError(
            f"model.filters={filters}: {blocks} pooling blocks shrink a {image_size} px image "
            f"below 1 px. Use at most {image_size.bit_length() - 1} blocks, or raise "
            "data.image_size."
        )
    size = image_size
    for i, k in enumerate(kernel_sizes(m)):
        if k < 1:
            raise EquipError(f"model.kernel_sizes: block {i} has kernel {k}; use 1 or more.")
        if k > size:
            raise EquipError(
                f"model.kernel_sizes: block {i} has kernel {k} but its input is {size} px "
                f"(data.image_size={image_size} halved by each pooling block before it). Use a "
                "smaller kernel, fewer blocks or a larger data.image_size."
            )
        if m["pool"] != "none":
            size //= 2


def check_recipe(m: Mapping) -> None:
    n = m["convs_per_block"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 8:
        raise EquipError(f"model.convs_per_block={n!r} must be a whole number in [1, 8].")
    if not isinstance(m["residual"], bool):
        raise EquipError(f"model.residual={m['residual']!r} must be true or false.")
    ls = m["label_smoothing"]
    if isinstance(ls, bool) or not isinstance(ls, int | float) or not 0 <= ls < 1:
        raise EquipError(f"model.label_smoothing={ls!r} must be in [0, 1), e.g. 0.1.")
    ema = m["ema_decay"]
    if ema is not None and (
        isinstance(ema, bool) or not isinstance(ema, int | float) or not 0 < ema < 1
    ):
        raise EquipError(f"model.ema_decay={ema!r} must be in (0, 1), e.g. 0.99, or null (off).")


def check_baseline(m: Mapping[str, Any]) -> None:
    _choice(m, "estimator", ESTIMATORS, "model")
    features = m["features"]
    if isinstance(features, str) or not features or any(f not in FEATURES for f in features):
        raise EquipError(
            f"model.features={features}: use a non-empty list of "
            f"{', '.join(FEATURES)}, e.g. model.features=[hog,pixels]."
        )
    for key, low in (("pixels_size", 2), ("n_estimators", 1)):
        if isinstance(m[key], bool) or not isinstance(m[key], int) or m[key] < low:
            raise EquipError(f"model.{key}={m[key]!r} must be a whole number >= {low}.")
    if isinstance(m["C"], bool) or not isinstance(m["C"], int | float) or not m["C"] > 0:
        raise EquipError(f"model.C={m['C']!r} must be a positive number, e.g. model.C=1.0.")


# ---------------------------------------------------------------- trainer
def check_trainer(t: DictConfig) -> None:
    _integer(t, "max_epochs", 1, 100_000)
    _integer(t, "patience", 0)
    for key in ("limit_train_batches", "limit_val_batches"):
        if isinstance(t[key], float):
            if not 0 < t[key] <= 1:
                raise EquipError(
                    f"trainer.{key}={t[key]} must be a fraction in (0, 1] of the "
                    "batches, or a whole number of batches >= 1."
                )
        else:
            _integer(t, key, 1)
    _flag(t, "progress_bar")
    if t.monitor not in schema.MONITOR_MODES:
        raise EquipError(
            f"trainer.monitor={t.monitor!r} is not one of: "
            f"{', '.join(sorted(schema.MONITOR_MODES))}."
        )
    _choice(t, "keep", ("best", "last"), "trainer")
    _choice(t, "accelerator", ACCELERATORS, "trainer")
    _choice(t, "strategy", STRATEGIES, "trainer")
    if str(t.precision) not in PRECISIONS:
        raise EquipError(
            f"trainer.precision={t.precision!r} is not one of: {', '.join(PRECISIONS)}."
        )
    devices = t.devices
    if devices != "auto" and (
        isinstance(devices, bool) or not isinstance(devices, int) or devices < 1
    ):
        raise EquipError(
            f"trainer.devices={devices!r} must be a whole number >= 1 or auto "
            "(device lists are not supported: set CUDA_VISIBLE_DEVICES)."
        )
    _integer(t, "num_nodes", 1)
    _integer(t, "accumulate_grad_batches", 1)
    if t.gradient_clip_val is not None:
        _number(t, "gradient_clip_val", 0)
    if t.strategy == "auto" and t.num_nodes > 1:
        raise EquipError(
            f"trainer.num_nodes={t.num_nodes} needs trainer.strategy=ddp (one "
            "process per device on every node)."
        )


def processes_per_node(t: DictConfig) -> int:
    """Training processes this node runs for one job (1 unless devices > 1)."""
    return t.devices if isinstance(t.devices, int) else 1


def check_hardware(t: DictConfig) -> None:
    """What the machine can run: asks torch, so only jobs about to train call it."""
    import torch

    from equip.runtime import cpu_count

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if t.accelerator in ("gpu", "cuda") and gpus == 0:
        raise EquipError(
            f"trainer.accelerator={t.accelerator}: this machine has no usable "
            "GPU (CUDA). Use trainer.accelerator=auto or cpu."
        )
    if t.accelerator == "mps" and not torch.backends.mps.is_available():
        raise EquipError(
            "trainer.accelerator=mps: Apple's MPS is not available here. Use "
            "trainer.accelerator=auto or cpu."
        )
    on_cpu = t.accelerator == "cpu" or (
        t.accelerator == "auto" and gpus == 0 and not torch.backends.mps.is_available()
    )
    n = processes_per_node(t)
    if on_cpu:
        if n > cpu_count():
            raise EquipError(
                f"trainer.devices={n} CPU processes on {cpu_count()} core(s): use "
                f"trainer.devices={cpu_count()} or fewer."
            )
        if str(t.precision) in ("16-mixed", "16-true"):
            raise EquipError(
                f"trainer.precision={t.precision} needs a GPU; on CPU use "
                "trainer.precision=bf16-mixed or 32-true."
            )
    elif t.accelerator != "mps" and gpus and n > gpus:
        raise EquipError(
            f"trainer.devices={n} but this machine has {gpus} GPU(s): use "
            f"trainer.devices={gpus} or fewer, or trainer.num_nodes."
        )
    if n > 1 and t.strategy == "auto":
        raise EquipError(
            f"trainer.devices={n} needs trainer.strategy=ddp (one process per "
            "device, gradients all-reduced)."
        )
