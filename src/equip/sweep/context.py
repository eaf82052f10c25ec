"""A job's place in a sweep, worked out once by the entry point and handed to `train()`.

The sweep callback (`callback`) creates the parent run and exports its id and the swept keys
to the environment, because that is what launcher processes (joblib workers, Ray tasks, remote
Azure ML jobs) inherit. This module is the only reader of that environment.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from omegaconf import DictConfig

from equip.runtime import cpu_count
from equip.track import queries, schema
from equip.track.record import config_params

PARENT_ENV = "EQUIP_PARENT_RUN_ID"
SWEPT_ENV = "EQUIP_SWEPT_KEYS"
SWEEP_PID_ENV = "EQUIP_SWEEP_PID"
# Set in the worker processes of a launcher (joblib, Ray): the sweep's main process speaks for
# the sweep when it is stopped (one line), not every job at once.
WORKER_ENV = "EQUIP_SWEEP_WORKER"
# What a failed job returns to the sweeper: the worst score (sweepers maximise what jobs return;
# Optuna stops the whole study on NaN, and -inf keeps it going).
FAILED_JOB_SCORE = float("-inf")  # the process that runs the sweep (workers exit with it)
DRY_RUN_PARENT = "DRY-RUN-NO-PARENT-RUN"  # a launcher's dry run: jobs are written, never run


@dataclass(frozen=True)
class MedianStop:
    after_epochs: int = 2
    min_finished: int = 2


@dataclass(frozen=True)
class JobContext:
    """Everything `train()` needs to know beyond the config: how the run is named and, in a
    sweep, its parent, whether a finished twin may be reused and the pruning rule."""

    overrides: Sequence[str] = ()  # the job's command-line overrides
    parent_run_id: str | None = None  # set: this job is a child run of a sweep
    swept_keys: Sequence[str] = ()
    resume: bool = False  # reuse a FINISHED child with the same config instead of training
    continue_on_failure: bool = False
    median_stop: MedianStop | None = None
    parallel_jobs: int = 1  # jobs running side by side on this machine (cores are shared out)
    sweep_pid: int | None = None  # the sweep's main process, when it runs on this machine
    in_worker: bool = False  # a launcher's worker process, not the sweep's main process
    extra_tags: dict[str, str] = field(default_factory=dict)

    @property
    def in_sweep(self) -> bool:
        return self.parent_run_id is not None

    def name_overrides(self) -> list[str]:
        """In a sweep only the swept values tell jobs apart: runs are named by those."""
        if not self.in_sweep:
            return list(self.overrides)
        return swept_overrides(self.overrides, self.swept_keys)

    @classmethod
    def from_hydra(cls, cfg: DictConfig) -> JobContext:
        """The context of the job Hydra is running now (a plain run outside any sweep)."""
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return cls()
        hc = HydraConfig.get()
        n_jobs = hc.launcher.get("n_jobs")
        parallel = 1 if n_jobs is None else cpu_count() if n_jobs < 0 else int(n_jobs)
        return cls.from_environment(cfg, list(hc.overrides.task), parallel)

    @classmethod
    def from_environment(
        cls, cfg: DictConfig, overrides: Sequence[str], parallel_jobs: int = 1
    ) -> JobContext:
        parent = os.environ.get(PARENT_ENV) or None
        if parent is None:
            return cls(overrides=list(overrides), parallel_jobs=parallel_jobs)
        m = cfg.multirun
        stop = m.median_stop
        return cls(
            overrides=list(overrides),
            parent_run_id=parent,
            swept_keys=[k for k in os.environ.get(SWEPT_ENV, "").split(",") if k],
            resume=bool(m.resume),
            continue_on_failure=bool(m.continue_on_failure),
            median_stop=MedianStop(stop.after_epochs, stop.min_finished) if stop.enabled else None,
            parallel_jobs=parallel_jobs,
            sweep_pid=int(os.environ[SWEEP_PID_ENV]) if os.environ.get(SWEEP_PID_ENV) else None,
            in_worker=os.environ.get(WORKER_ENV) == "1",
        )


def export_sweep(parent_run_id: str, swept_keys: Iterable[str]) -> None:
    """Called by the sweep callback: every job launched from now on is a child of this run."""
    os.environ[PARENT_ENV] = parent_run_id
    os.environ[SWEPT_ENV] = ",".join(swept_keys)
    os.environ[SWEEP_PID_ENV] = str(os.getpid())


def sweep_parent() -> str | None:
    """The parent run of the sweep this process runs now, if any."""
    return os.environ.get(PARENT_ENV) or None


def clear_sweep() -> None:
    for name in (PARENT_ENV, SWEPT_ENV, SWEEP_PID_ENV):
        os.environ.pop(name, None)


def swept_overrides(overrides: Iterable[str], keys: Iterable[str]) -> list[str]:
    """The overrides that set one of the swept `keys`."""
    wanted = set(keys)
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in wanted]


def config_hash(cfg: DictConfig, data_fingerprint: str) -> str:
    """Identity of a job: its training config and its data (changed photos are a new job).
    A resumed sweep skips jobs whose hash already FINISHED."""
    keep = sorted((k, v) for k, v in config_params(cfg).items() if schema.is_identity_key(k))
    return hashlib.sha256(repr([data_fingerprint, keep]).encode()).hexdigest()[:16]


def cv_key(cfg: DictConfig, data_fingerprint: str) -> str:
    """Identity of a config on its data, whatever the split: the folds of a CV sweep and the
    final fit of the same config share it (equip.sweep.crossval finds one from the other)."""
    keep = sorted(
        (k, v)
        for k, v in config_params(cfg).items()
        if schema.is_identity_key(k) and k not in schema.SPLIT_KEYS
    )
    return hashlib.sha256(repr([data_fingerprint, keep]).encode()).hexdigest()[:16]


def split_key(cfg: DictConfig) -> str:
    """Identity of a run's split (seed, fractions, groups, fold): the hold-out gate compares a
    run with baselines on the same one. A tag of its own, as the Azure ML workspace searches
    no dotted param names (equip.track.queries)."""
    d = cfg.data
    split = [*_grouping(d), d.val_fraction, d.test_fraction, d.folds, d.fold]
    return _hash([*split, cfg.final_fit])


def folds_key(cfg: DictConfig) -> str:
    """Identity of the folds a CV is over (seed, groups, count), whichever fold a run is: the
    CV gate pairs a config's folds with the baseline's on the same ones."""
    return _hash([*_grouping(cfg.data), cfg.data.folds])


def _grouping(d: DictConfig) -> list:
    """What decides which photos share a group (a set: the order of data.group_by is not)."""
    ties = sorted(str(t) for t in d.group_by)
    return [d.split_seed, d.group_pattern, ties, d.near_duplicate_distance]


def _hash(values: list) -> str:
    return hashlib.sha256(repr([str(v) for v in values]).encode()).hexdigest()[:16]


def finished_twin(experiment_id: str, parent_id: str, cfg_hash: str):
    """A FINISHED child of this parent with the same config, if any (for resume)."""
    from mlflow import MlflowClient

    where = queries.children_of(parent_id, {schema.CONFIG_HASH: cfg_hash})
    return queries.first_run(MlflowClient(), [experiment_id], where, queries.has_status("FINISHED"))
