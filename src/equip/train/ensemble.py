"""registry.model=ensemble: when a CV sweep ends, its parent run logs one model that averages
the k fold models' probabilities (equip.serve.ensemble_pyfunc), and, with registry.enabled=true,
registers it through the CV gate: the honest estimate and the shipped model are the same thing.

`CvEnsemble` is a Hydra callback (conf/train.yaml `hydra.callbacks`, after the sweep tracker, so
it runs while the parent is still open); `ship_cv_ensemble` does the work and can be called on
any finished CV sweep's parent.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from equip.errors import EquipError
from equip.sweep import context
from equip.sweep.crossval import CvResult, sweep_cv
from equip.sweep.leaderboard import CV_KEY
from equip.terminal import say
from equip.track import schema
from equip.track.redaction import strip_secrets

log = logging.getLogger(__name__)
SLIM_KEYS = ("state_dict", "hyper_parameters", "hparams_name", "pytorch-lightning_version")


class CvEnsemble(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent_id = context.sweep_parent()
        if config.registry.model != "ensemble" or parent_id in (None, context.DRY_RUN_PARENT):
            return
        try:
            result = ship_cv_ensemble(parent_id, config)
        except EquipError as e:
            say(f"ensemble: not logged: {e}")
            return
        except Exception as e:  # the sweep's runs are all there: say why, do not lose them
            reason = strip_secrets((str(e).strip().splitlines() or [""])[0])
            log.warning("ensemble: not logged: %s: %s", type(e).__name__, reason)
            return
        line = f"ensemble of {result['folds']} fold models logged: {result['model_uri']}"
        if "registry" in result:
            line += f"; registry: {result['registry']['reason']}"
        say(line)


def ship_cv_ensemble(parent_id: str, cfg: DictConfig) -> dict[str, Any]:
    """Log the ensemble of the CV sweep `parent_id` as that run's model; register it when
    cfg.registry.enabled (gate=cv). Raises EquipError when a fold is missing."""
    from mlflow import MlflowClient

    from equip.registry import register_if_better
    from equip.serve.ensemble_pyfunc import log_ensemble_pyfunc

    client = MlflowClient()
    parent = client.get_run(parent_id)
    swept = parent.data.tags.get(schema.SWEPT_KEYS, "")
    if swept != CV_KEY:  # one config's folds, not several configs' (sweep=cv)
        raise EquipError(
            f"registry.model=ensemble averages one config's fold models: sweep data.fold "
            f"alone (sweep=cv), not {swept or 'nothing'}"
        )
    experiment_id = parent.info.experiment_id
    metric = str(cfg.registry.metric)
    cv = sweep_cv(client, experiment_id, parent_id, metric)
    if cv is None:
        raise EquipError(
            f"the CV sweep {parent_id} has folds that did not finish; run the same command "
            "again to finish them"
        )
    first = client.get_run(cv.run_ids[0])
    fingerprint = first.data.tags.get(schema.DATA_FINGERPRINT, "")
    cv_key = first.data.tags.get(schema.CV_KEY, "")
    with tempfile.TemporaryDirectory(prefix="equip-ensemble-") as tmp:
        checkpoints = [_fold_checkpoint(client, cv, k, Path(tmp)) for k in range(cv.folds)]
        classes = first.data.params["dataset.classes"].split(",")
        size = int(first.data.params["data.image_size"])
        runs = [cv.run_ids[k] for k in range(cv.folds)]
        uri = log_ensemble_pyfunc(parent_id, checkpoints, classes, size, fold_run_ids=runs)
    client.set_tag(parent_id, schema.ENSEMBLE_FOLDS, str(cv.folds))
    result: dict[str, Any] = {"model_uri": uri, "folds": cv.folds, "cv_mean": cv.mean}
    if cfg.registry.enabled:
        result["registry"] = register_if_better(parent_id, uri, cfg, fingerprint, cv.mean, cv_key)
    return result


def _fold_checkpoint(client, cv: CvResult, fold: int, folder: Path) -> str:
    """The fold run's selected checkpoint, downloaded and cut to what inference loads (no
    optimizer or callback state: a third of the size)."""
    import torch
    from mlflow.artifacts import download_artifacts

    import equip.model.cnn  # noqa: F401  (lets torch.load read the config's choices)

    run_id = cv.run_ids[fold]
    run = client.get_run(run_id)
    names = [Path(a.path).name for a in client.list_artifacts(run_id, "checkpoints")]
    wanted = "final.ckpt" if run.data.params.get("trainer.keep") == "last" else "best.ckpt"
    name = wanted if wanted in names else next((n for n in names if n.endswith(".ckpt")), None)
    if name is None:
        raise EquipError(f"fold {fold} (run {run_id}) logged no checkpoint")
    path = download_artifacts(
        run_id=run_id, artifact_path=f"checkpoints/{name}", dst_path=str(folder / str(fold))
    )
    full = torch.load(path, map_location="cpu", weights_only=True)
    slim = folder / f"fold_{fold}.ckpt"
    torch.save({k: full[k] for k in SLIM_KEYS if k in full}, slim)
    return str(slim)
