"""Every check of a config that needs no data, for single runs and whole-sweep validation alike.

The types and choices of every key are the schema's (equip.config.schema: Hydra refuses a wrong
one while composing); what is left here are ranges, keys the schema cannot type alone (an int or
a list, a fraction or a count) and rules across keys. Each failure is an EquipError whose one
line names the key and the fix. No torch here: a sweep validates all its points in a fraction of
a second.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from equip.config.explain import WHICH_DATA, check_known_keys, check_required, choice_error
from equip.config.modes import check_registry, check_run_mode, check_weight_averaging

# The machine's checks (config.resources), re-exported: importable from here as before.
from equip.config.resources import check_decoded_size as check_decoded_size
from equip.config.resources import check_folder_path
from equip.config.resources import check_hardware as check_hardware
from equip.config.resources import processes_per_node as processes_per_node
from equip.errors import EquipError

MAX_IMAGE_SIZE = 1024
# Lightning's names: no identifiers ('32-true'), and 32 may come as an int, so no Enum.
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
PRECISIONS += ("64-true", "64")


def check_config(cfg: DictConfig) -> None:
    """Raise EquipError for the first bad value, before any data is read or run created."""
    check_known_keys(cfg)
    check_required(cfg)
    check_data(cfg.data)
    if cfg.model.name == "baseline":
        check_baseline(cfg.model)
    else:
        check_model(cfg.model, cfg.data.image_size)
        check_trainer(cfg.trainer)
        check_weight_averaging(cfg)
    check_run_mode(cfg)
    check_registry(cfg)


# ---------------------------------------------------------------- ranges
def _in_range(cfg: Mapping, key: str, low: float | None = None, high: float | None = None) -> Any:
    v = cfg[key]
    if (low is not None and v < low) or (high is not None and v > high):
        raise EquipError(f"{_full(cfg, key)}={v} must be {_bounds(low, high)}.")
    return v


def _full(cfg: Mapping, key: str) -> str:
    """'data.image_size' for key 'image_size' of cfg.data."""
    if isinstance(cfg, DictConfig):
        return cfg._get_full_key(key)  # OmegaConf's own dotted path of a node's key
    return key


def _bounds(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    return f">= {low}" if low is not None else f"<= {high}"


# ---------------------------------------------------------------- data
def check_data(d: DictConfig) -> None:
    _in_range(d, "image_size", 8, MAX_IMAGE_SIZE)
    _in_range(d, "batch_size", 1)
    check_fractions(d.val_fraction, d.test_fraction)
    if d.group_pattern is not None:
        try:
            re.compile(str(d.group_pattern))
        except re.error as e:
            raise EquipError(
                f"data.group_pattern={d.group_pattern!r} is not a valid regex: {e}. "
                r"Example: '^(\d+)[x_]'."
            ) from None
    _in_range(d, "near_duplicate_distance", 0, 16)  # past 16 of 64 bits, unrelated photos tie
    if d.folds is not None:
        folds = _in_range(d, "folds", 2, 100)
        _in_range(d, "fold", 0, folds - 1)
        if d.test_fraction:
            raise EquipError(
                f"data.test_fraction={d.test_fraction} with data.folds={folds}: "
                "each image is validated once; set data.test_fraction=0."
            )
    a = d.augment
    if a.crop_scale is not None and not 0 < a.crop_scale <= 1:
        raise EquipError(f"data.augment.crop_scale={a.crop_scale} must be in (0, 1], or null.")
    _in_range(a, "color_jitter", 0)
    _in_range(a, "rotation", 0, 180)
    _in_range(a, "translate", 0, 0.5)
    _in_range(a, "erasing", 0, 1)
    if not a.mix_alpha > 0:
        raise EquipError(f"data.augment.mix_alpha={a.mix_alpha} must be > 0, e.g. 1.0.")
    _in_range(d, "num_workers", 0)
    _in_range(d, "ram_budget_mb", 0)
    if d.get("cache_dir"):
        check_folder_path(str(d.cache_dir), "data.cache_dir")
    if str(d.kind) != ("synthetic" if "per_class" in d else "folder"):  # not the group's kind
        raise EquipError(f"data.kind={d.kind} does not choose a data set. {WHICH_DATA}")
    if d.kind == "synthetic":
        _in_range(d, "per_class", 1, 100_000)
    elif not d.root:
        raise EquipError(
            "data=folder needs data.root=PATH: a folder with one sub-folder of images per class."
        )


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    if val_fraction == 0:
        raise EquipError(
            "data.val_fraction=0 leaves nothing to validate on: use e.g. 0.2; to train on every "
            "image, final_fit=true (its epochs from a CV sweep, docs/cross-validation.md)."
        )
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
    if not filters or not all(f > 0 for f in filters):
        raise EquipError(
            f"model.filters={filters} must be a non-empty list of positive ints, e.g. [32,64]."
        )
    _check_kernel_sizes(m["kernel_sizes"], filters)
    check_recipe(m)
    if not m["lr"] > 0:
        raise EquipError(f"model.lr={m['lr']} must be positive, e.g. model.lr=0.001.")
    if m["weight_decay"] < 0:
        raise EquipError(f"model.weight_decay={m['weight_decay']} must be >= 0.")
    if not 0 <= m["dropout"] < 1:
        raise EquipError(f"model.dropout={m['dropout']} must be in [0, 1).")
    if not all(h > 0 for h in m["hidden"]):
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


def _check_kernel_sizes(ks: Any, filters: list[int]) -> None:
    """One int for every block, or one per block (typed Any: OmegaConf has no int | list)."""
    if isinstance(ks, bool | str | float):
        raise EquipError(f"model.kernel_sizes={ks!r} must be an int or a list of ints.")
    if isinstance(ks, int):
        return
    if len(ks) != len(filters):
        raise EquipError(
            f"model.kernel_sizes={list(ks)} has {len(ks)} entries but model.filters={filters} "
            f"has {len(filters)}: give one kernel size per conv block, or a single int for all."
        )
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in ks):
        raise EquipError(f"model.kernel_sizes={list(ks)} must be ints.")


def check_recipe(m: Mapping) -> None:
    n = m["convs_per_block"]
    if not 1 <= n <= 8:
        raise EquipError(f"model.convs_per_block={n!r} must be a whole number in [1, 8].")
    ls = m["label_smoothing"]
    if not 0 <= ls < 1:
        raise EquipError(f"model.label_smoothing={ls!r} must be in [0, 1), e.g. 0.1.")
    ema = m["ema_decay"]
    if ema is not None and not 0 < ema < 1:
        raise EquipError(f"model.ema_decay={ema!r} must be in (0, 1), e.g. 0.99, or null (off).")


def check_baseline(m: Mapping[str, Any]) -> None:
    if not m["features"]:
        raise EquipError(
            "model.features=[]: use a non-empty list of pixels, hog, color_hist, "
            "e.g. model.features=[hog,pixels]."
        )
    for key, low in (("pixels_size", 2), ("n_estimators", 1)):
        if m[key] < low:
            raise EquipError(f"model.{key}={m[key]!r} must be a whole number >= {low}.")
    if not m["C"] > 0:
        raise EquipError(f"model.C={m['C']!r} must be a positive number, e.g. model.C=1.0.")


# ---------------------------------------------------------------- trainer
def check_trainer(t: DictConfig) -> None:
    _in_range(t, "max_epochs", 1, 100_000)
    _in_range(t, "patience", 0)
    for key in ("limit_train_batches", "limit_val_batches"):
        _check_limit(key, t[key])
    if str(t.precision) not in PRECISIONS:
        raise EquipError(choice_error("trainer.precision", t.precision, list(PRECISIONS)))
    devices = t.devices
    if devices != "auto" and (
        isinstance(devices, bool) or not isinstance(devices, int) or devices < 1
    ):
        raise EquipError(
            f"trainer.devices={devices!r} must be a whole number >= 1 or auto "
            "(device lists are not supported: set CUDA_VISIBLE_DEVICES)."
        )
    _in_range(t, "num_nodes", 1)
    _in_range(t, "accumulate_grad_batches", 1)
    if t.gradient_clip_val is not None:
        _in_range(t, "gradient_clip_val", 0)
    if t.strategy == "auto" and t.num_nodes > 1:
        raise EquipError(
            f"trainer.num_nodes={t.num_nodes} needs trainer.strategy=ddp (one "
            "process per device on every node)."
        )


def _check_limit(key: str, v: Any) -> None:
    """trainer.limit_*_batches: a fraction of the batches (float) or a count (int)."""
    fraction = isinstance(v, float) and 0 < v <= 1
    count = isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if not (fraction or count):
        raise EquipError(
            f"trainer.{key}={v!r} must be a fraction in (0, 1] of the "
            "batches, or a whole number of batches >= 1."
        )
