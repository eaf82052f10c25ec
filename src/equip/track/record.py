"""What goes into an MLflow run: params from the config, the run's name, git state, batched
metrics, and where a person finds the run. Where runs go is equip.track.store.

mlflow itself is imported inside functions so that `equip.track.record` stays cheap for commands
that only read configs.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from equip.track import schema
from equip.track.redaction import redact_overrides, redact_tree, strip_secrets

log = logging.getLogger(__name__)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict/list config -> {'a.b.c': leaf}; lists of scalars stay one value."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            if k == "_target_":
                continue
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list) and any(isinstance(v, Mapping | list) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def config_params(cfg: DictConfig) -> dict[str, str]:
    """Every leaf of the composed config as a flat dotted param, within MLflow's limits."""
    tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    params = {}
    for k, v in flatten(redact_tree(tree)).items():
        params[k] = schema.truncate("null" if v is None else str(v), schema.MAX_PARAM_VALUE)
    return params


def redacted_yaml(cfg: DictConfig) -> str:
    tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return OmegaConf.to_yaml(redact_tree(tree))


def _short(value: str) -> str:
    """'[32,64]' -> '32-64'; '0.0012520653814999472' -> '0.00125' (sampled values are long)."""
    try:
        number = float(value)
    except ValueError:
        return value.strip("[]").replace(",", "-").replace(" ", "")
    return value if number.is_integer() else f"{number:.3g}"


def run_name(cfg: DictConfig, overrides: Iterable[str] = ()) -> str:
    """Name a run by what distinguishes it: filters and lr always, then each command-line
    override, e.g. 'filters=32-64 lr=0.001 batch_norm=true'."""
    if cfg.model.name == "baseline":
        parts = {"baseline": str(cfg.model.estimator)}
    else:
        parts = {"filters": _short(str(list(cfg.model.filters))), "lr": f"{cfg.model.lr:.3g}"}
    for o in redact_overrides(overrides):
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if (
            not value
            or not schema.is_identity_key(key)
            or key in ("model", "model.filters", "model.estimator")
        ):
            continue
        if key == "data.root":
            value = Path(value).name
        parts[key.split(".")[-1]] = _short(value)
    return " ".join(f"{k}={v}" for k, v in parts.items())


def git_tags(cwd: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the code that ran; empty outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


UI_TRAINING_VIEW = "workflowType=machine_learning"


def run_location(uri: str, experiment: str, run_id: str) -> str:
    """Where a person finds the run: a UI link for servers, the `mlflow ui` command otherwise.
    The link opens MLflow 3.15's model-training view: its UI picks GenAI or model training by
    this parameter (else the last choice in the browser, GenAI at first), not by the
    experiment's mlflow.experimentKind tag."""
    uri = strip_secrets(uri)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}?{UI_TRAINING_VIEW}"
    return f"run {run_id} in {uri}  (browse: mlflow ui --backend-store-uri {uri})"


def log_metrics(
    run_id: str, metrics: Mapping[str, float], step: int, tags: Mapping[str, str] | None = None
) -> None:
    """All metrics (and tags) of one step in a single request: one call per metric costs ~3 ms
    on sqlite."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    run_tags = [RunTag(k, v) for k, v in (tags or {}).items()]
    if batch or run_tags:
        MlflowClient().log_batch(run_id, metrics=batch, tags=run_tags, synchronous=True)
