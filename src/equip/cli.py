"""Terminal side of train.py: old spellings upgraded, one line per outcome, exit codes that mean
something (0 done, 2 bad input, 130 stopped by you), no stack traces for what users can fix."""

from __future__ import annotations

import logging
import math

from omegaconf import DictConfig
from rich.console import Console

from equip.errors import EquipError

console = Console(stderr=True, soft_wrap=True)  # long paths stay whole, greppable

# Spellings of the previous release, kept working for one more release.
RENAMED = {"register": "registry.enabled", "sweep.resume": "multirun.resume",
           "sweep.continue_on_failure": "multirun.continue_on_failure",
           "sweep.median_stop": "multirun.median_stop"}  # fmt: skip
DROPPED = ("trainer.monitor_mode",)  # now follows trainer.monitor


def upgrade_argv(argv: list[str]) -> list[str]:
    """Rewrite deprecated overrides in place of Hydra seeing them, with a one-line note each."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        bare = key.lstrip("+~")
        new = next((n + bare[len(o) :] for o, n in RENAMED.items()
                    if bare == o or bare.startswith(o + ".")), None)  # fmt: skip
        if eq and new:
            console.print(f"equip: note: {bare}= is now {new}= (the old spelling goes in the "
                          "next release)", highlight=False)  # fmt: skip
            arg = f"{new}={value}"
        elif eq and bare in DROPPED:
            console.print(f"equip: note: {bare} is dropped: it follows trainer.monitor now",
                          highlight=False)  # fmt: skip
            continue
        out.append(arg)
    return out


def run_training(cfg: DictConfig) -> float:
    """Train one job; return its monitored metric, negated when lower is better, so that an
    Optuna sweeper with direction=maximize always optimises the right way."""
    from equip import schema
    from equip.job import JobContext
    from equip.training import train

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    job = JobContext.from_hydra(cfg)
    try:
        result = train(cfg, job)
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into SystemExit(1)
        console.print("[bold yellow]stopped by you[/]: the run is marked KILLED; run the same "
                      "command again to resume", highlight=False)  # fmt: skip
        raise SystemExit(130) from None
    except Exception as e:
        if not (job.in_sweep and job.continue_on_failure):
            if isinstance(e, EquipError):
                console.print(f"[bold red]equip: error:[/] {e}", highlight=False)
                raise SystemExit(2) from None
            raise
        console.print(f"[bold red]job failed[/] (the sweep goes on): {type(e).__name__}: {e}",
                      highlight=False)  # fmt: skip
        return math.nan
    if result.get("rank_zero") is False:  # another rank of a ddp job: rank 0 reports
        return math.nan
    m = result["metrics"]
    if result.get("skipped"):
        console.print(f"[yellow]skipped[/] {result['run_name']}: already FINISHED as run "
                      f"{result['run_id']}", highlight=False)  # fmt: skip
    else:
        print_done(result)
    value = float(m.get(f"best_{cfg.trainer.monitor}", math.nan))
    return -value if schema.monitor_mode(cfg.trainer.monitor) == "min" else value


def print_done(result: dict) -> None:
    m = result["metrics"]
    where = (f" (epoch {m['best_epoch'] + 1:.0f} of {m['epochs_trained']:.0f})"
             if "best_epoch" in m else "")  # fmt: skip
    console.print(
        f"[bold green]done[/] {result['run_name']}: val_acc {m['best_val_acc']:.3f}{where}, "
        f"macro-F1 {m['best_val_macro_f1']:.3f}, trained in {m['train_time_s']:.0f} s",
        highlight=False,
    )
    if "registry" in result:
        r = result["registry"]
        verdict = f"registered as version {r['version']}" if r["registered"] else "not registered"
        console.print(f"registry: {verdict}: {r['reason']}", highlight=False)
    console.print(f"MLflow: {result['location']}", highlight=False, soft_wrap=True)
