"""Typed schema of every config group: Hydra's "structured config as schema" pattern.

conf/*.yaml keep the values and their comments; each lists its `/schema/<group>/<name>` first
in its defaults list, so Hydra checks every key's type and choice when it composes (a YAML file or a
command-line override with a wrong type or an unknown choice fails there, naming the key).
`register()` puts the schemas into Hydra's ConfigStore; train.py and the tests call it before
composing. The choices it types keys with are the Enums of equip.config.choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from equip.config.choices import (
    TTA,
    Accelerator,
    Activation,
    AugmentPolicy,
    DataKind,
    Estimator,
    Feature,
    Gate,
    GroupBy,
    Head,
    Keep,
    Mix,
    Monitor,
    Optimizer,
    Pool,
    RegistryMetric,
    RegistryModel,
    Scheduler,
    Strategy,
    TrackingKind,
)


# ---------------------------------------------------------------- groups
# Values live in conf/; MISSING here means "the YAML file sets it".
@dataclass
class AugmentConfig:
    hflip: bool = MISSING
    vflip: bool = MISSING
    crop_scale: float | None = MISSING
    color_jitter: float = MISSING
    rotation: float = MISSING
    translate: float = MISSING
    erasing: float = MISSING
    policy: AugmentPolicy = MISSING
    mix: Mix = MISSING
    mix_alpha: float = MISSING


@dataclass
class DataConfig:
    kind: DataKind = MISSING
    image_size: int = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    split_seed: int = MISSING
    group_pattern: str | None = MISSING
    group_by: list[GroupBy] = MISSING
    near_duplicate_distance: int = MISSING
    folds: int | None = MISSING
    fold: int = MISSING
    batch_size: int = MISSING
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache_dir: str | None = MISSING
    ram_budget_mb: float = MISSING
    num_workers: int = MISSING


@dataclass
class SyntheticDataConfig(DataConfig):
    per_class: int = MISSING
    generator_seed: int = MISSING


@dataclass
class FolderDataConfig(DataConfig):
    root: str = MISSING


@dataclass
class CNNConfig:
    name: str = "cnn"
    filters: list[int] = MISSING
    kernel_sizes: Any = MISSING  # one int, or one per block: no Union in OmegaConf; checks.py
    convs_per_block: int = MISSING
    residual: bool = MISSING
    pool: Pool = MISSING
    batch_norm: bool = MISSING
    dropout: float = MISSING
    hidden: list[int] = MISSING
    head: Head = MISSING
    activation: Activation = MISSING
    optimizer: Optimizer = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    scheduler: Scheduler = MISSING
    label_smoothing: float = MISSING
    ema_decay: float | None = MISSING
    tta: TTA = MISSING


@dataclass
class BaselineConfig:
    name: str = "baseline"
    estimator: Estimator = MISSING
    features: list[Feature] = MISSING
    pixels_size: int = MISSING
    C: float = MISSING
    n_estimators: int = MISSING


@dataclass
class TrainerConfig:
    max_epochs: int = MISSING
    monitor: Monitor = MISSING
    patience: int = MISSING
    keep: Keep = MISSING
    limit_train_batches: Any = MISSING  # a fraction (float) or a number of batches (int)
    limit_val_batches: Any = MISSING
    progress_bar: bool = MISSING
    accelerator: Accelerator = MISSING
    devices: Any = MISSING  # an int or "auto"
    num_nodes: int = MISSING
    strategy: Strategy = MISSING
    precision: str = MISSING  # not an Enum: '32-true' is no identifier; checks.PRECISIONS
    accumulate_grad_batches: int = MISSING
    gradient_clip_val: float | None = MISSING
    swa_lrs: float | None = MISSING
    swa_epoch_start: Any = MISSING  # a fraction of max_epochs (float) or an epoch (int)


@dataclass
class TrackingConfig:
    kind: TrackingKind = MISSING
    uri: str | None = MISSING
    artifact_root: str | None = MISSING
    experiment: str = MISSING
    log_model: bool = MISSING
    log_onnx: bool = MISSING
    outage_s: float = MISSING
    stale_after_s: float = MISSING


@dataclass
class AzureTrackingConfig(TrackingConfig):
    config_path: str | None = MISSING
    subscription_id: str | None = MISSING
    resource_group: str | None = MISSING
    workspace_name: str | None = MISSING


@dataclass
class RegistryConfig:
    enabled: bool = MISSING
    name: str = MISSING
    metric: RegistryMetric = MISSING
    gate: Gate = MISSING
    model: RegistryModel = MISSING
    require_baseline: bool = MISSING
    alias: str | None = MISSING


@dataclass
class MedianStopConfig:
    enabled: bool = MISSING
    after_epochs: int = MISSING
    min_finished: int = MISSING


@dataclass
class MultirunConfig:
    resume: bool = MISSING
    continue_on_failure: bool = MISSING
    median_stop: MedianStopConfig = field(default_factory=MedianStopConfig)


@dataclass
class TrainConfig:
    """The top level of conf/train.yaml: its groups typed by their own schemas above."""

    data: Any = MISSING
    model: Any = MISSING
    trainer: TrainerConfig = MISSING
    tracking: Any = MISSING
    registry: RegistryConfig = MISSING
    seed: int = MISSING
    final_fit: bool = MISSING
    resume: str | None = MISSING
    multirun: MultirunConfig = field(default_factory=MultirunConfig)
    # Set by `+launch=azureml` (conf/launch/): one run submitted to an Azure ML cluster.
    launch: dict[str, Any] = field(default_factory=dict)
    # Free-form: +notes.KEY=VALUE is recorded with the run (params notes.*), never read by equip;
    # the one place for keys of your own, as every other unknown key is refused.
    notes: dict[str, Any] = field(default_factory=dict)


# (group, name, node): conf/<group>/*.yaml name `/schema/<group>/<name>@_here_` first in their
# defaults list. Under schema/, so `python train.py --help` keeps them apart from the options.
SCHEMAS: tuple[tuple[str | None, str, type], ...] = (
    (None, "train_schema", TrainConfig),
    ("schema/data", "common", DataConfig),
    ("schema/data", "synthetic", SyntheticDataConfig),
    ("schema/data", "folder", FolderDataConfig),
    ("schema/model", "cnn", CNNConfig),
    ("schema/model", "baseline", BaselineConfig),
    ("schema/trainer", "default", TrainerConfig),
    ("schema/tracking", "local", TrackingConfig),
    ("schema/tracking", "azureml", AzureTrackingConfig),
    ("schema/registry", "default", RegistryConfig),
)


def register() -> None:
    """Store the schemas where Hydra looks before it composes (idempotent)."""
    cs = ConfigStore.instance()
    for group, name, node in SCHEMAS:
        cs.store(group=group, name=name, node=node)
