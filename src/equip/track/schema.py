"""What equip writes into MLflow besides params: tag names and limits (the searches over
them are `queries`).

One place, so a tag is spelled the same by the job that writes it and the report that reads it.
"""

from __future__ import annotations

# ---------------------------------------------------------------- limits (MLflow 3)
MAX_TAG_VALUE = 5000  # we cut tag values well below MLflow's 8,000 characters
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_RUN_NAME = 250

# ---------------------------------------------------------------- tags of every run
VERSION = "equip.version"
DATA_FINGERPRINT = "equip.data_fingerprint"
DATA_SOURCE = "equip.data_source"  # decoded | disk-cache | memory
CONFIG_HASH = "equip.config_hash"  # identity of a job: resumed sweeps skip FINISHED twins
MODEL_KIND = "equip.model_kind"
CV_KEY = "equip.cv_key"  # a config's identity bar its split: a CV sweep and its final fit share it
SPLIT_KEY = "equip.split_key"  # the exact split (seed, fractions, groups, folds, fold): gates
FOLDS_KEY = "equip.folds_key"  # the folds a CV is over (seed, groups, count): the CV gate
FINAL_FIT = "equip.final_fit"  # 'true' on a model retrained on every image (final_fit=true)
CV_PARENT = "equip.cv_parent_run_id"  # the CV sweep whose estimate a final fit carries
ENSEMBLE_FOLDS = "equip.ensemble_folds"  # on a CV parent whose model averages its fold models
ERROR = "equip.error"  # why a run ended FAILED or KILLED
PRUNED = "equip.pruned"
RESUMED = "equip.resumed"  # true: continued from its last checkpoint (resume=, resumed sweep)
PRUNED_REASON = "equip.pruned_reason"
PARENT = "mlflow.parentRunId"  # MLflow's own: the UI nests children under it
HOST = "equip.host"  # host, pid and heartbeat of the process that runs the run: a later
PID = "equip.pid"  # command marks the run KILLED when that process is gone
PID_STARTED = "equip.pid_started"
HEARTBEAT = "equip.heartbeat"  # unix time, updated every epoch

# ---------------------------------------------------------------- tags of equip's experiments
# MLflow's own tag for what an experiment is for, with the value its UI's kind selector writes
# for model training ("Machine learning"); without it MLflow 3 treats an experiment as GenAI.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"

# ---------------------------------------------------------------- tags of a sweep's parent run
SWEEP_KEY = "equip.sweep_key"
SWEEP_DIR = "equip.sweep_dir"
LAST_SWEEP_DIR = "equip.last_sweep_dir"
SWEEP_OVERRIDES = "equip.sweep_overrides"
SWEPT_KEYS = "equip.swept_keys"
SWEEPER = "equip.sweeper"
LAUNCHER = "equip.launcher"
MONITOR = "equip.monitor"
MONITOR_MODE = "equip.monitor_mode"
BEST_RUN_ID = "equip.best_run_id"
BEST_RUN_NAME = "equip.best_run_name"
BEST_VALUE = "equip.best."  # + swept key
CV_SUMMARY = "equip.cv_summary"  # 'k-fold CV (mean ± std): ...' of a sweep over data.fold

# ---------------------------------------------------------------- registration decision
REGISTRY_DECISION = "equip.registry.decision"
REGISTRY_REASON = "equip.registry.reason"
REGISTRY_VERSION = "equip.registry.version"

# ---------------------------------------------------------------- tags of a registered version
SCORE = "equip.score"  # registry.metric of the version, as the gate ranked it


def champion_tag(alias: str) -> str:
    """The version tag ('true') that marks the champion: registries need not have aliases."""
    return f"equip.{alias}"


# Final metrics of the selected model, the same names for CNN and baseline runs.
FINAL_METRICS = ("best_val_acc", "best_val_macro_f1", "best_val_loss")

# Which way is better for each metric a run can be selected by (trainer.monitor).
MONITOR_MODES = {"val_acc": "max", "val_macro_f1": "max", "val_loss": "min"}

# Config keys (and their sub-keys) that say where or how verbosely a job is recorded or
# launched, not what it trains: left out of a job's identity, its run name and a sweep's key.
NOT_IDENTITY = (
    "hydra",
    "tracking",
    "trainer.progress_bar",
    "multirun",
    "registry",
    "resume",
    "data.cache_dir",
    "data.num_workers",
    "data.ram_budget_mb",
)
# ...and the keys that only choose the split, left out of a config's CV key.
SPLIT_KEYS = ("data.fold", "data.folds", "data.val_fraction", "data.test_fraction", "final_fit")


def monitor_mode(monitor: str) -> str:
    return MONITOR_MODES.get(monitor, "max")


def is_identity_key(key: str) -> bool:
    """False for config keys in NOT_IDENTITY (`key` may carry Hydra's +/~ prefixes)."""
    key = key.lstrip("+~")
    return not any(key == k or key.startswith((f"{k}.", f"{k}/")) for k in NOT_IDENTITY)


def truncate(text: str, limit: int = MAX_TAG_VALUE) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
