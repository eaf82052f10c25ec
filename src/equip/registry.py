"""Gated registration: a model enters the registry only if it beats the classical baseline,
on the hold-out split (registry.gate=holdout) or fold by fold in cross-validation (gate=cv).

The same MLflow requests go to a local database store, an MLflow server and an Azure ML
workspace: runs are found through `equip.track.queries`, and the champion is a version tag
(`equip.track.champion`), as the workspace's registry has no aliases.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from equip.sweep.context import split_key
from equip.track import champion, queries, schema

log = logging.getLogger(__name__)


def best_baseline(client, experiment_id: str, cfg: DictConfig, fingerprint: str):
    """The best FINISHED baseline run on the same data fingerprint and the same split (ranked
    here: the Azure ML workspace orders runs by no metric and filters on no status)."""
    where = queries.baseline_runs(fingerprint, split_key(cfg))
    runs = queries.search_runs(client, [experiment_id], where, queries.has_status("FINISHED"))
    metric = cfg.registry.metric
    return max(runs, key=lambda r: r.data.metrics.get(metric, float("-inf")), default=None)


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
    """A new version of the registered model, tagged with its run, score, data and gate.

    From the run's artifact URI, as MLflow 2 registered runs:/ URIs: MLflow 3's register_model
    first lists runs:/ID/model for its MLmodel, and azureml-mlflow lists the whole run there, so
    it would look for an MLflow 3 logged model instead, which a workspace does not have."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    reg = cfg.registry
    tags = {
        "equip.run_id": run_id,
        f"equip.{reg.metric}": f"{score:.6f}",
        schema.SCORE: f"{score:.6f}",  # what the champion is ranked by
        "equip.data_fingerprint": fingerprint,
        "equip.gate": str(reg.gate),
        **gate.get("tags", {}),
    }
    client = MlflowClient()
    try:
        client.create_registered_model(reg.name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    if RunsArtifactRepository.is_runs_uri(model_uri):
        model_uri = RunsArtifactRepository.get_underlying_uri(model_uri)
    return str(client.create_model_version(reg.name, model_uri, run_id=run_id, tags=tags).version)


def _crown(client, reg: DictConfig, version: str, score: float, decision: dict[str, Any]) -> None:
    """`version` becomes the champion (a version tag, equip.track.champion) when it beats the
    current one (registry.alias=null: no champion is marked)."""
    if reg.alias is None:
        decision["champion"] = False
        return
    holder = champion.current(client, reg.name, reg.alias)
    if holder is not None and not score > champion.score_of(holder):
        decision["champion"] = False
        decision["reason"] += (
            f"; the current {reg.alias} (version {holder.version}) scores "
            f"{champion.score_of(holder):.4f}, unchanged"
        )
        return
    decision["champion"] = champion.crown(client, reg.name, reg.alias, version)


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
