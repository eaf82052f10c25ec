"""Checks across config groups: how a run is meant to be used (final fit, resume, registration,
the CV ensemble) and the weight averages. Each failure is one EquipError naming the key and
the fix; equip.config.checks runs them with the rest."""

from __future__ import annotations

from omegaconf import DictConfig

from equip.errors import EquipError


def check_run_mode(cfg: DictConfig) -> None:
    """final_fit= and resume= against the rest of the config."""
    baseline = cfg.model.name == "baseline"
    if cfg.final_fit:
        if baseline:
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
    if cfg.resume is not None and baseline:
        raise EquipError(
            "resume= continues a CNN run from its checkpoint; the baseline "
            "trains in one go. Drop resume=."
        )
    if cfg.resume is not None and not cfg.data.cache_dir:
        raise EquipError(
            "resume= needs data.cache_dir, where runs keep their last "
            "checkpoint. Set it back (default .cache/equip)."
        )


def check_registry(cfg: DictConfig) -> None:
    r = cfg.registry
    if r.model == "ensemble":
        check_ensemble(cfg)
    if not r.enabled:
        return
    if cfg.model.name == "baseline":
        raise EquipError(
            "registry.enabled=true registers a CNN that beats the baseline, "
            "the reference itself. Drop registry.enabled=true."
        )
    name = str(r.name)
    # MLflow refuses '/' and ':' in a name, only when it registers (after the training);
    # '@' would break models:/NAME@ALIAS.
    if not name.strip() or name != name.strip() or any(c in name for c in "/:@"):
        raise EquipError(
            f"registry.name={name!r} is not a model name MLflow accepts: use letters, digits, "
            "'-', '_' or '.', e.g. registry.name=equip-gear."
        )
    if r.model == "ensemble":
        return  # the sweep's parent logs the ensemble, whatever tracking.log_model says
    if r.gate == "cv" and cfg.data.folds is not None:
        raise EquipError(
            "registry.gate=cv registers a model trained outside the CV sweep: "
            "drop data.folds and use final_fit=true, or ship the fold models: "
            "registry.model=ensemble."
        )
    if cfg.final_fit and r.gate != "cv":
        raise EquipError(
            "final_fit=true has no validation score to compare: use "
            "registry.gate=cv with registry.enabled=true."
        )
    if not cfg.tracking.log_model:
        raise EquipError(
            "registry.enabled=true needs the model logged: drop tracking.log_model=false."
        )


def check_ensemble(cfg: DictConfig) -> None:
    """registry.model=ensemble: the k fold models of a CNN's CV sweep, averaged by its parent."""
    if cfg.model.name == "baseline":
        raise EquipError(
            "registry.model=ensemble averages CNN fold models; the baseline ships one "
            "model: drop registry.model=ensemble."
        )
    if cfg.final_fit:
        raise EquipError(
            "registry.model=ensemble ships the CV sweep's fold models, final_fit=true one model "
            "trained on every image: drop one of them."
        )
    if cfg.data.folds is None:
        raise EquipError(
            "registry.model=ensemble averages the fold models of a CV sweep: run it as "
            "`python train.py -m sweep=cv registry.model=ensemble ...`."
        )
    if cfg.registry.enabled and cfg.registry.gate != "cv":
        raise EquipError(
            "registry.model=ensemble is scored by its CV: set registry.gate=cv "
            "(it then must beat the baseline's CV on the same folds)."
        )


def check_weight_averaging(cfg: DictConfig) -> None:
    """trainer.swa_lrs / swa_epoch_start (Lightning's StochasticWeightAveraging)."""
    t = cfg.trainer
    if t.swa_lrs is None:
        return
    if not t.swa_lrs > 0:
        raise EquipError(f"trainer.swa_lrs={t.swa_lrs} must be > 0 (e.g. 0.0005), or null (off).")
    start = t.swa_epoch_start
    fraction = isinstance(start, float) and 0 < start <= 1
    epoch = isinstance(start, int) and not isinstance(start, bool) and 1 <= start <= t.max_epochs
    if not (fraction or epoch):
        raise EquipError(
            f"trainer.swa_epoch_start={start!r} must be a fraction of trainer.max_epochs in "
            f"(0, 1] (e.g. 0.8) or an epoch number in [1, {t.max_epochs}]."
        )
    if cfg.model.ema_decay:
        raise EquipError(
            "model.ema_decay and trainer.swa_lrs both average the weights: set one of them to null."
        )
    if t.keep != "last" and not cfg.final_fit:
        raise EquipError(
            "trainer.swa_lrs: the averaged weights are the last epoch's model; set "
            "trainer.keep=last (keep=best picks an epoch before the average)."
        )
