"""Gated registration: a model enters the registry only if it beats the classical baseline,
on the hold-out split (registry.gate=holdout) or fold by fold in cross-validation (gate=cv).

The same MLflow registry calls work against a local database store and an Azure ML workspace;
where a registry has no aliases (Azure ML), the champion is marked with a version tag instead.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from equip.track import schema
from equip.track.record import config_params

log = logging.getLogger(__name__)


def best_baseline(client, experiment_id: str, cfg: DictConfig, fingerprint: str):
    """The best FINISHED baseline run on the same data fingerprint and the same split."""
    split = (*schema.GROUPING_KEYS, "data.val_fraction", "data.test_fraction", "data.folds")
    same_split = schema.same_params(config_params(cfg), [*split, "data.fold"])
    runs = client.search_runs(
        [experiment_id],
        f"params.`model.name` = 'baseline' and tags.`{schema.DATA_FINGERPRINT}` = '{fingerprint}' "
        f"and {same_split} and attributes.status = 'FINISHED'",
        order_by=[f"metrics.`{cfg.registry.metric}` DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def register_if_better(
    run_id: str,
    model_uri: str,
    cfg: DictConfig,
    fingerprint: str,
    score: float,
    cv_key: str | None = None,
) -> dict[str, Any]:
    """Register the run's model when it beats the baseline; record the decision on the run.

    registry.gate=holdout compares `score` with the best baseline run on the same split;
    registry.gate=cv compares the config's CV sweep with the baseline's CV on the same folds,
    fold by fold, and `score` becomes the CV mean."""
    from mlflow import MlflowClient

    client = MlflowClient()
    reg = cfg.registry
    experiment_id = client.get_run(run_id).info.experiment_id
    if reg.gate == "cv":
        gate = _cv_gate(client, experiment_id, cfg, fingerprint, cv_key or "")
        if gate.get("score") is not None:
            score = gate["score"]
    else:
        gate = _holdout_gate(client, experiment_id, cfg, fingerprint, score)
    decision: dict[str, Any] = {"registered": False, "score": score, "reason": gate["reason"]}
    if gate["passed"]:
        version = _register(run_id, model_uri, cfg, fingerprint, score, gate)
        decision.update(registered=True, version=version)
        _crown(client, reg, version, score, decision)
    return _record(client, run_id, decision)


def _register(
    run_id: str,
    model_uri: str,
    cfg: DictConfig,
    fingerprint: str,
    score: float,
    gate: dict[str, Any],
) -> str:
    """A new version of the registered model, tagged with its run, score, data and gate."""
    import mlflow

    reg = cfg.registry
    tags = {
        "equip.run_id": run_id,
        f"equip.{reg.metric}": f"{score:.6f}",
        "equip.data_fingerprint": fingerprint,
        "equip.gate": str(reg.gate),
        **gate.get("tags", {}),
    }
    return str(mlflow.register_model(model_uri, reg.name, tags=tags).version)


def _crown(client, reg: DictConfig, version: str, score: float, decision: dict[str, Any]) -> None:
    """Move the champion alias to `version` when it beats the current champion."""
    from mlflow.exceptions import MlflowException

    champion = _champion_score(client, reg)
    if champion is None or score > champion:
        try:
            client.set_registered_model_alias(reg.name, reg.alias, version)
        except MlflowException:  # registries without aliases (Azure ML): move a version tag
            for old in _tagged_champions(client, reg):
                client.delete_model_version_tag(reg.name, old.version, reg.alias)
            client.set_model_version_tag(reg.name, version, reg.alias, "true")
        decision["champion"] = True
    else:
        decision["champion"] = False
        decision["reason"] += f"; the current {reg.alias} scores {champion:.4f}, alias unchanged"


def _holdout_gate(
    client, experiment_id: str, cfg: DictConfig, fingerprint: str, score: float
) -> dict[str, Any]:
    reg = cfg.registry
    baseline = best_baseline(client, experiment_id, cfg, fingerprint)
    if baseline is None:
        reason = (
            f"no baseline run on data fingerprint {fingerprint} with this split; run "
            "`python train.py model=baseline` with the same data settings first, or set "
            "registry.require_baseline=false"
        )
        if reg.require_baseline:
            return {"passed": False, "reason": reason}
        return {"passed": True, "reason": "registered without a baseline"}
    base_score = baseline.data.metrics.get(reg.metric, float("-inf"))
    if not score > base_score:
        return {
            "passed": False,
            "reason": f"{reg.metric} {score:.4f} does not beat the "
            f"baseline's {base_score:.4f} (run {baseline.info.run_id})",
        }
    return {
        "passed": True,
        "reason": "beats the baseline",
        "tags": {
            "equip.baseline_run_id": baseline.info.run_id,
            f"equip.baseline_{reg.metric}": f"{base_score:.6f}",
            "equip.margin": f"{score - base_score:.6f}",
        },
    }


def _cv_gate(
    client, experiment_id: str, cfg: DictConfig, fingerprint: str, cv_key: str
) -> dict[str, Any]:
    """Pass when the config's CV beats the baseline's on the same folds by >= 2 standard errors
    of the mean paired difference (the folds share their val images, so pair them)."""
    from equip.sweep.crossval import baseline_cv, config_cv, paired_difference

    reg = cfg.registry
    model = config_cv(client, experiment_id, cv_key, reg.metric)
    if model is None:
        return {
            "passed": False,
            "reason": "registry.gate=cv: no complete CV sweep of this "
            "config on this data; run `python train.py -m sweep=cv` with the same "
            "overrides first",
        }
    base = baseline_cv(client, experiment_id, fingerprint, model, reg.metric)
    if base is None:
        reason = (
            f"registry.gate=cv: no baseline CV on data {fingerprint} with the same "
            f"{model.folds} folds; run `python train.py -m sweep=cv model=baseline` with "
            "the same data settings first"
        )
        if reg.require_baseline:
            return {"passed": False, "reason": reason, "score": model.mean}
        return {"passed": True, "reason": "registered without a baseline", "score": model.mean}
    d = paired_difference(model, base)
    text = (
        f"CV {reg.metric} {model.mean:.4f} vs baseline {base.mean:.4f}: mean paired "
        f"difference {d['mean_diff']:+.4f}, standard error {d['se']:.4f} over "
        f"{d['folds']:.0f} folds"
    )
    passed = d["mean_diff"] > 0 and d["mean_diff"] >= 2 * d["se"]
    return {
        "passed": passed,
        "score": model.mean,
        "reason": f"{text}: {'beats' if passed else 'does not beat'} the baseline by "
        "2 standard errors",
        "tags": {
            "equip.cv_parent_run_id": model.parent_id,
            "equip.baseline_cv_parent_run_id": base.parent_id,
            f"equip.baseline_{reg.metric}": f"{base.mean:.6f}",
            "equip.margin": f"{d['mean_diff']:.6f}",
            "equip.margin_se": f"{d['se']:.6f}",
        },
    }


def _tagged_champions(client, reg: DictConfig) -> list:
    versions = client.search_model_versions(f"name='{reg.name}'")
    return [v for v in versions if v.tags.get(reg.alias) == "true"]


def _champion_score(client, reg: DictConfig) -> float | None:
    """Score of the current alias holder (or, without aliases, of the tagged version)."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(reg.name, reg.alias)
    except MlflowException:
        tagged = _tagged_champions(client, reg)
        if not tagged:
            return None
        mv = tagged[0]
    value = mv.tags.get(f"equip.{reg.metric}")
    return float(value) if value is not None else None


def _record(client, run_id: str, decision: dict[str, Any]) -> dict[str, Any]:
    client.set_tag(
        run_id,
        schema.REGISTRY_DECISION,
        "registered" if decision["registered"] else "not registered",
    )
    client.set_tag(run_id, schema.REGISTRY_REASON, schema.truncate(decision["reason"]))
    if decision.get("version"):
        client.set_tag(run_id, schema.REGISTRY_VERSION, decision["version"])
    log.info("registry: %s", decision["reason"])
    return decision
