"""Cross-validation results read back from MLflow: a config's CV sweep, its folds' scores, the
baseline's CV on the same folds, and the paired fold-by-fold comparison of the two.

A CV sweep (sweep=cv, or data.fold=0,...,k-1 with data.folds=k) is one parent run with one
child per fold; every run carries the config's CV key (`context.cv_key`), so the final fit of
a config (final_fit=true) finds the estimate made for it, and the epochs to train
(`final_fit_plan`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig

from equip.track import queries, schema

if TYPE_CHECKING:
    from equip.data.images import ImageSet


@dataclass(frozen=True)
class CvResult:
    parent_id: str
    scores: dict[int, float]  # fold -> metric of the fold's selected model
    best_epochs: dict[int, float]  # fold -> its selected epoch (0-based), CNN runs only
    folds: int
    folds_key: str  # the folds it is over (equip.sweep.context.folds_key)
    run_ids: dict[int, str] = field(default_factory=dict)  # fold -> its run

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores)


def _fold_runs(client, experiment_id: str, where: str) -> dict[str, list]:
    """FINISHED fold runs matching `where`, grouped by their sweep's parent run id (the status
    and the fold are checked here: the Azure ML workspace filters on neither)."""

    def finished_fold(run) -> bool:
        return run.info.status == "FINISHED" and run.data.params.get("data.folds", "null") != "null"

    by_parent: dict[str, list] = {}
    for r in queries.iter_runs(client, [experiment_id], where, finished_fold):
        parent = r.data.tags.get(schema.PARENT)
        if parent:
            by_parent.setdefault(parent, []).append(r)
    return by_parent


def _result(parent_id: str, runs: list, metric: str) -> CvResult | None:
    """The CV a sweep's fold runs make up, if they cover every fold once."""
    p = runs[0].data.params
    folds = int(p["data.folds"])
    scores = {int(r.data.params["data.fold"]): r.data.metrics.get(metric) for r in runs}
    if sorted(scores) != list(range(folds)) or any(v is None for v in scores.values()):
        return None
    epochs = {
        int(r.data.params["data.fold"]): r.data.metrics["best_epoch"]
        for r in runs
        if "best_epoch" in r.data.metrics
    }
    run_ids = {int(r.data.params["data.fold"]): r.info.run_id for r in runs}
    folds_key = runs[0].data.tags.get(schema.FOLDS_KEY, "")
    return CvResult(parent_id, scores, epochs, folds, folds_key, run_ids)


def sweep_cv(client, experiment_id: str, parent_id: str, metric: str) -> CvResult | None:
    """The CV that the sweep with this parent run made up, if every fold finished."""
    runs = _fold_runs(client, experiment_id, queries.children_of(parent_id)).get(parent_id)
    return _result(parent_id, runs, metric) if runs else None


def config_cv(client, experiment_id: str, cv_key: str, metric: str) -> CvResult | None:
    """The newest complete CV sweep of the config with this CV key."""
    found = []
    for parent, runs in _fold_runs(client, experiment_id, queries.config_runs(cv_key)).items():
        result = _result(parent, runs, metric)
        if result is not None:
            found.append((max(r.info.start_time for r in runs), result))
    return max(found, key=lambda f: f[0])[1] if found else None


def baseline_cv(
    client, experiment_id: str, fingerprint: str, like: CvResult, metric: str
) -> CvResult | None:
    """The strongest complete baseline CV on the same data and the same folds as `like`."""
    where = queries.baseline_folds(fingerprint, like.folds_key)
    results = [
        _result(parent, runs, metric)
        for parent, runs in _fold_runs(client, experiment_id, where).items()
    ]
    results = [r for r in results if r is not None]
    return max(results, key=lambda r: r.mean) if results else None


def paired_difference(model: CvResult, baseline: CvResult) -> dict[str, float]:
    """Mean fold-by-fold difference (model - baseline), its standard error, the fold count."""
    diffs = [model.scores[k] - baseline.scores[k] for k in sorted(model.scores)]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    return {"mean_diff": mean, "se": sd / math.sqrt(n), "folds": float(n)}


def final_fit_epochs(cv: CvResult | None, cfg: DictConfig) -> int:
    """Epochs for a final fit: the folds' mean selected epoch, else trainer.max_epochs."""
    if cv is None or not cv.best_epochs:
        return int(cfg.trainer.max_epochs)
    return max(1, round(sum(cv.best_epochs.values()) / len(cv.best_epochs)) + 1)


@dataclass(frozen=True)
class FinalFitPlan:
    """What a final fit (final_fit=true) trains: every image, for the epochs its CV sweep's
    folds selected; its score is that sweep's estimate (none without a complete sweep)."""

    cv: CvResult | None
    epochs: int
    metric: str

    def tags(self) -> dict[str, str]:
        parent = {schema.CV_PARENT: self.cv.parent_id} if self.cv is not None else {}
        return {**parent, schema.FINAL_FIT: "true"}

    def metrics(self) -> dict[str, float]:
        if self.cv is None:
            return {}
        return {f"cv_mean_{self.metric}": self.cv.mean, "cv_folds": float(self.cv.folds)}


def final_fit_plan(cfg: DictConfig, experiment_id: str, key: str) -> FinalFitPlan:
    """The plan of the final fit of the config with CV key `key`."""
    import logging

    from mlflow import MlflowClient

    metric = str(cfg.registry.metric)
    cv = config_cv(MlflowClient(), experiment_id, key, metric)
    if cv is None:
        logging.getLogger(__name__).warning(
            "final fit: no complete CV sweep of this config on this data (run `python train.py "
            "-m sweep=cv` with the same overrides): training trainer.max_epochs=%s epochs, no "
            "score",
            cfg.trainer.max_epochs,
        )
    return FinalFitPlan(cv, final_fit_epochs(cv, cfg), metric)


def training_split(cfg: DictConfig, images: ImageSet) -> np.ndarray:
    """Which images train: all of them in a final fit; else the hold-out split or its fold."""
    if cfg.final_fit:
        return np.full(len(images.labels), "train")
    from equip.data.split import split_for

    return split_for(images, cfg.data)
