"""Terminal side of training: clear errors instead of stack traces, and where the run went."""

from __future__ import annotations

import logging

from omegaconf import DictConfig
from rich.console import Console

from equip.errors import EquipError

console = Console(stderr=True)


def run_training(cfg: DictConfig) -> dict:
    from equip.training import train

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    try:
        result = train(cfg)
    except EquipError as e:
        console.print(f"[bold red]equip: error:[/] {e}", highlight=False)
        raise SystemExit(2) from None
    m = result["metrics"]
    console.print(
        f"[bold green]done[/] {result['run_name']}: best val_acc {m['best_val_acc']:.3f} "
        f"(epoch {m['best_epoch']}), {m['epochs_trained']} epochs in {m['train_time_s']:.0f} s",
        highlight=False,
    )
    console.print(f"MLflow: {result['location']}", highlight=False, soft_wrap=True)
    return result
