"""Terminal side of train.py: one line per outcome, exit codes that mean
something (0 done, 2 bad input, 4 a sweep with failed jobs, 130 stopped by you), no stack traces
for what users can fix."""

from __future__ import annotations

import logging
import math
import os
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from equip.errors import EquipError, TrainingFailed
from equip.terminal import fail, fail_if_refused, say
from equip.track.redaction import strip_secrets


def quiet_hydra_notices() -> None:
    """conf/hydra/launcher/joblib.yaml replaces Hydra's joblib launcher config of the same name
    on purpose (its _target_ is equip's class). Hydra still validates it against that schema
    (the same keys) and warns, at every compose, that this matching by name is deprecated:
    nothing for a user to do."""
    warnings.filterwarnings(
        "ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema"
    )


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Around Hydra's main: a bad key or value on the command line is one line and exit 2, not
    Hydra's multi-line report. HYDRA_FULL_ERROR (Hydra's own switch) makes it re-raise to us."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from equip.config.explain import config_errors

    os.environ["HYDRA_FULL_ERROR"] = "1"
    quiet_hydra_notices()
    try:
        with config_errors():  # a wrong type, choice or key: the schema's error in one line
            yield
        from equip.sweep.callback import exit_if_jobs_failed

        exit_if_jobs_failed()  # a sweep that ran to its end with failed jobs: exit 4
    except EquipError as e:
        fail(str(e), e.exit_code)
    except (HydraException, OmegaConfBaseException) as e:
        fail_if_refused(e)  # a sweep callback's request the store refused (Hydra wraps it)
        text = str(e).split("Config search path")[0]  # Hydra's search path is noise here
        text = " ".join(line.strip() for line in text.splitlines() if line.strip())
        cause = e.__cause__
        if isinstance(cause, OmegaConfBaseException) and str(cause).strip():
            text += f" ({str(cause).strip().splitlines()[0]})"
        fail(f"{text} See python train.py --help for the config groups and keys.", 2)
    except Exception as e:  # a sweep callback's request the store refused: one line too
        fail_if_refused(e)
        raise


def run_training(cfg: DictConfig) -> float:
    """Train one job; return its monitored metric, negated when lower is better, so that an
    Optuna sweeper with direction=maximize always optimises the right way."""
    from equip.config.checks import check_config
    from equip.sweep.context import FAILED_JOB_SCORE, JobContext
    from equip.track.store import check_store

    job = JobContext.from_hydra(cfg)
    try:
        check_config(cfg)  # before torch is imported: a bad value costs a second, not ten
        check_store(cfg.tracking)
        from equip.train.run import train

        # After the import: importing Lightning sets its logger to INFO (GPU/TPU notices, tips).
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
        result = train(cfg, job)
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into SystemExit(1)
        if not job.in_worker:  # a launcher's worker: the sweep's main process says it once
            say_stopped("the run is marked KILLED")
        raise SystemExit(130) from None
    except Exception as e:
        fail_if_refused(e, save_traceback)  # the store said no: every job would meet it too
        if _store_gone(e):
            if job.in_sweep:
                fail(
                    f"{describe(e)}. The sweep stops here; finished jobs are safe in the store. "
                    "Run the same command again once the store is back to resume.",
                    3,
                )
            if isinstance(e, EquipError):  # before any work: a setting to fix
                fail(str(e), 2)
            fail(
                f"the tracking store went away during the run ({describe(e)}). Run the same "
                "command again once it is back.",
                3,
            )
        if job.in_sweep and job.continue_on_failure:
            say(("job failed", "bold red"), f" (the sweep goes on): {describe(e)}")
            return FAILED_JOB_SCORE
        if isinstance(e, TrainingFailed):  # the run exists (FAILED): not bad input
            fail(str(e), 1)
        if isinstance(e, EquipError):
            fail(str(e), 2)
        fail(f"{describe(e)} (traceback in {save_traceback(e)})", 1)
    if result.get("rank_zero") is False:  # another rank of a ddp job: rank 0 reports
        return math.nan
    return report(cfg, result)


def say_stopped(what: str) -> None:
    """The one line of a command the user stopped (Ctrl-C): exit 130 follows."""
    say(("stopped by you", "bold yellow"), f": {what}; run the same command again to resume")


def _store_gone(e: Exception) -> bool:
    from equip.errors import StoreUnavailable

    if isinstance(e, StoreUnavailable):
        return True
    if isinstance(e, EquipError):
        return False
    import mlflow

    from equip.track.store import store_is_down

    return store_is_down(mlflow.get_tracking_uri())


def describe(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return strip_secrets(f"{type(e).__name__}: {first}")


def save_traceback(e: BaseException) -> str:
    """Where the full traceback of an unexpected error went: the job's Hydra output folder."""
    from hydra.core.hydra_config import HydraConfig

    folder = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path()
    path = folder / "error.txt"
    path.write_text(strip_secrets("".join(traceback.format_exception(e))))
    return str(path)


def report(cfg: DictConfig, result: dict) -> float:
    from equip.track import schema

    m = result["metrics"]
    if result.get("skipped"):
        say(
            ("skipped", "yellow"),
            f" {result['run_name']}: already FINISHED as run {result['run_id']}",
        )
    else:
        print_done(result)
    value = float(m.get(f"best_{cfg.trainer.monitor}", math.nan))
    return -value if schema.monitor_mode(cfg.trainer.monitor) == "min" else value


def print_done(result: dict) -> None:
    m = result["metrics"]
    if "best_val_acc" not in m:  # a final fit: no val images, the CV sweep's estimate instead
        cv = (
            f"CV estimate val_acc {m['cv_mean_best_val_acc']:.3f} over {m['cv_folds']:.0f} folds"
            if "cv_mean_best_val_acc" in m
            else "no CV estimate"
        )
        say(
            ("done", "bold green"),
            f" {result['run_name']}: final fit on every image, "
            f"{m['epochs_trained']:.0f} epochs, trained in {m['train_time_s']:.0f} s; {cv}",
        )
    else:
        where = (
            f" (epoch {m['best_epoch'] + 1:.0f} of {m['epochs_trained']:.0f})"
            if "best_epoch" in m
            else ""
        )
        ci = (
            f" [95% CI {m['best_val_acc_ci_low']:.3f}-{m['best_val_acc_ci_high']:.3f}, "
            f"n={m['val_images']:.0f}]"
            if "val_images" in m
            else ""
        )
        say(
            ("done", "bold green"),
            f" {result['run_name']}: val_acc {m['best_val_acc']:.3f}{ci}{where}, macro-F1 "
            f"{m['best_val_macro_f1']:.3f}, trained in {m['train_time_s']:.0f} s",
        )
    if "registry" in result:
        r = result["registry"]
        verdict = f"registered as version {r['version']}" if r["registered"] else "not registered"
        say(f"registry: {verdict}: {r['reason']}")
    say(f"MLflow: {result['location']}")
