"""Terminal side of training: clear errors instead of stack traces, and where the run went."""

from __future__ import annotations

import logging
import math

from omegaconf import DictConfig
from rich.console import Console

from equip.errors import EquipError

console = Console(stderr=True, soft_wrap=True)  # long paths stay whole, greppable


def run_training(cfg: DictConfig) -> float:
    """Train one job; return its monitored metric, negated when lower is better, so that an
    Optuna sweeper with direction=maximize always optimises the right way."""
    from equip import sweeps
    from equip.training import train

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    in_sweep = sweeps.parent_run_id() is not None
    try:
        result = train(cfg)
    except Exception as e:
        if in_sweep and not getattr(e, "mlflow_run_id", None):
            sweeps.record_failed_job(cfg, e)  # failed before its run existed: still a child
        if not (in_sweep and cfg.sweep.continue_on_failure):
            if isinstance(e, EquipError):
                console.print(f"[bold red]equip: error:[/] {e}", highlight=False)
                raise SystemExit(2) from None
            raise
        console.print(f"[bold red]job failed[/] (the sweep goes on): {type(e).__name__}: {e}",
                      highlight=False)  # fmt: skip
        return math.nan
    m = result["metrics"]
    if result.get("skipped"):
        console.print(f"[yellow]skipped[/] {result['run_name']}: already FINISHED as run "
                      f"{result['run_id']}", highlight=False)  # fmt: skip
    else:
        where = (
            f" (epoch {m['best_epoch'] + 1:.0f} of {m['epochs_trained']:.0f})"
            if "best_epoch" in m
            else ""
        )
        console.print(
            f"[bold green]done[/] {result['run_name']}: val_acc {m['best_val_acc']:.3f}{where}, "
            f"macro-F1 {m['best_val_macro_f1']:.3f}, trained in {m['train_time_s']:.0f} s",
            highlight=False,
        )
        if "registry" in result:
            r = result["registry"]
            verdict = (
                f"registered as version {r['version']}" if r["registered"] else "not registered"
            )
            console.print(f"registry: {verdict}: {r['reason']}", highlight=False)
        console.print(f"MLflow: {result['location']}", highlight=False, soft_wrap=True)
    value = float(m.get(f"best_{cfg.trainer.monitor}", math.nan))
    return -value if cfg.trainer.monitor_mode == "min" else value  # sweepers maximise it
