"""The sweep callback: one MLflow parent run per Hydra multirun, validated before any job.

Hydra runs the sweep (basic or Optuna sweeper; in-process, joblib, Ray or Azure ML launcher).
`SweepTracker`, a Hydra callback, adds what Hydra and MLflow lack between them: the whole grid
validated before the first job, a parent run created (or reused on resume) and exported to the
jobs (equip.sweep.context), and the leaderboard at the end (equip.sweep.leaderboard).

    python -m equip.leaderboard [PARENT_RUN_ID|latest]   # a sweep's leaderboard, again
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import logging
import re
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from equip.errors import EquipError
from equip.sweep import context
from equip.terminal import fail, say
from equip.track import queries, schema, store
from equip.track import record as tracking
from equip.track.redaction import redact_overrides, strip_secrets

log = logging.getLogger(__name__)
SWEEP_FN = re.compile(r"^\s*(choice|range|interval|glob|tag)\(")  # Hydra's sweep functions


# ---------------------------------------------------------------- what a sweep is
def sweep_arguments(config: DictConfig) -> list[str]:
    """The sweeper's params (from a sweeps/ file) and the command line's overrides."""
    params = config.hydra.sweeper.get("params") or {}
    return [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)


def swept_keys(config: DictConfig) -> list[str]:
    keys = [str(k) for k in config.hydra.sweeper.get("params") or {}]
    for o in config.hydra.overrides.task:
        key, _, value = o.partition("=")
        if ("," in value and not value.startswith("[")) or "],[" in value or SWEEP_FN.match(value):
            keys.append(key.lstrip("+~"))
    return list(dict.fromkeys(keys))


def sweep_key(config: DictConfig) -> str:
    """Identity of a sweep: the same command again (bar tracking/launch settings) resumes it."""
    args = sorted(a for a in sweep_arguments(config) if schema.is_identity_key(a.split("=")[0]))
    text = "\n".join([config.tracking.experiment, *args])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sweep_name(config: DictConfig, keys: list[str]) -> str:
    """'sweep smoke', or the swept values: 'sweep filters=[32,64],[32,64,128]'."""
    task = list(config.hydra.overrides.task)
    chosen = [o.split("=", 1)[1] for o in task if o.startswith("sweep=")]
    swept = [o.split("=", 1) for o in context.swept_overrides(task, keys)]
    parts = [f"{k.split('.')[-1]}={v}" for k, v in swept]
    return " ".join(["sweep", *chosen[:1], *parts])[: schema.MAX_RUN_NAME]


def sweep_points(config: DictConfig) -> list[list[str]]:
    """Every job's overrides, in the order of Hydra's basic sweeper (a cartesian product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for o in OverridesParser.create().parse_overrides(sweep_arguments(config)):
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([f"{key}={o.get_value_element_as_str()}"])
    return [list(point) for point in itertools.product(*choices)]


def invalid_points(config: DictConfig) -> list[tuple[list[str], str]]:
    """(overrides, reason) for every grid point that would fail its checks."""
    from hydra import compose

    from equip.config.checks import check_config
    from equip.config.explain import config_error
    from equip.config.resources import check_data_root

    # Jobs on this machine read data.root here: it must be here (a cluster's may be there only).
    local = str(config.hydra.launcher._target_).endswith(("BasicLauncher", "JoblibLauncher"))
    bad = []
    for point in sweep_points(config):
        try:
            cfg = compose(config.hydra.job.config_name, overrides=point)
            check_config(cfg)
            if local and cfg.data.kind == "folder":
                check_data_root(Path(cfg.data.root).expanduser())
        except Exception as e:  # composition errors (bad key, bad value type) count too
            bad.append((point, str(config_error(e) or e).splitlines()[0]))
    return bad


def refuse_invalid_points(config: DictConfig) -> None:
    """Exit 2 before any job when a grid point would fail its checks, listing every one."""
    bad = invalid_points(config)
    if bad:
        fail(
            f"{len(bad)} sweep point(s) are invalid; nothing was trained. Fix or remove them:",
            2,
            details=[f"  {' '.join(point)}\n    -> {why}" for point, why in bad],
        )


def resume_parent(client: Any, exp_id: str, parent: Any) -> str:
    """Take over the parent run of the same sweep run before; its cut-off jobs end KILLED."""
    parent_id = parent.info.run_id
    client.update_run(parent_id, status="RUNNING")
    for k, v in store.process_tags().items():  # this process runs it now
        client.set_tag(parent_id, k, v)
    if schema.ERROR in parent.data.tags:  # why the last invocation stopped: history now
        client.delete_tag(parent_id, schema.ERROR)
    # Jobs still RUNNING were cut off with the sweep (a killed process cannot say so).
    running = queries.has_status("RUNNING")
    for run in queries.search_runs(client, [exp_id], queries.children_of(parent_id), running):
        client.set_tag(run.info.run_id, schema.ERROR, "interrupted; rerun on resume")
        client.set_terminated(run.info.run_id, "KILLED")
    say(
        f"resuming sweep {parent.info.run_name!r} ({parent_id}): "
        "jobs that already finished are skipped"
    )
    return parent_id


def new_parent(client: Any, exp_id: str, config: DictConfig, key: str, sweep_dir: str) -> str:
    """Create the sweep's parent run, tagged with what identifies and describes the sweep."""
    keys = swept_keys(config)
    overrides = redact_overrides(
        o for o in config.hydra.overrides.task if schema.is_identity_key(o.split("=")[0])
    )
    run = client.create_run(
        exp_id,
        run_name=sweep_name(config, keys),
        tags={
            schema.SWEEP_KEY: key,
            schema.SWEEP_DIR: sweep_dir,
            schema.SWEEP_OVERRIDES: schema.truncate(" ".join(overrides)),
            schema.SWEPT_KEYS: ",".join(keys),
            schema.SWEEPER: str(config.hydra.sweeper._target_),
            schema.LAUNCHER: str(config.hydra.launcher._target_),
            schema.MONITOR: str(config.trainer.monitor),
            schema.MONITOR_MODE: schema.monitor_mode(config.trainer.monitor),
            **store.process_tags(),
            **tracking.git_tags(Path(__file__).parent),
        },
    )
    return run.info.run_id


# ---------------------------------------------------------------- the callback
class SweepTracker(Callback):
    """Parent run, validation, resume and summary for every `-m` run of train.py."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.started = 0.0
        self.summary_step = 0  # this invocation's step for the parent's summary metrics
        self.lock: store.OwnedLock | None = None  # this sweep's lock in the store, while it runs

    def __getstate__(self) -> dict[str, Any]:
        # The joblib and Ray launchers pickle the callbacks into every job; the sweep's lock
        # (an open file and a thread lock) stays with the process that holds it.
        return {**self.__dict__, "lock": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Hydra only warns when a callback raises, then sweeps on with no parent run: any
        failure here ends the sweep instead (a SystemExit passes through Hydra)."""
        try:
            self._start(config)
        except EquipError as e:
            self._end_if_aborted()
            fail(str(e), 2)
        except Exception as e:
            self._end_if_aborted()
            reason = (str(e).strip().splitlines() or [""])[0]
            fail(f"the sweep could not start: {type(e).__name__}: {reason}", 1)

    def _start(self, config: DictConfig) -> None:
        if str(config.hydra.sweeper._target_).endswith("BasicSweeper"):
            refuse_invalid_points(config)
        if config.hydra.launcher.get("dry_run"):  # a launcher that only writes job files:
            context.export_sweep(context.DRY_RUN_PARENT, swept_keys(config))  # no store, no run
            return
        uri = store.connect(config.tracking)
        key = sweep_key(config)
        self._hold_sweep(uri, key, sweep_name(config, swept_keys(config)))
        from mlflow import MlflowClient

        exp_id = store.experiment_id(config.tracking)
        client = MlflowClient()
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        self.started = time.time()
        previous = queries.first_run(client, [exp_id], queries.sweep_parent(key))
        if config.multirun.resume and previous is not None:
            self.parent_id = resume_parent(client, exp_id, previous)
            # One summary per invocation, each at its own step: a resumed sweep's new counts
            # do not pile up at the step of the old ones.
            self.summary_step = len(client.get_metric_history(self.parent_id, "jobs_finished"))
        else:
            self.parent_id = new_parent(client, exp_id, config, key, sweep_dir)
        client.set_tag(self.parent_id, schema.LAST_SWEEP_DIR, sweep_dir)
        context.export_sweep(self.parent_id, swept_keys(config))
        # Hydra skips on_multirun_end when a sweep aborts (Ctrl-C, a job raising with
        # continue_on_failure=false): end the parent anyway, with what its children have.
        atexit.register(self._end_if_aborted)

    def _hold_sweep(self, uri: str, key: str, name: str) -> None:
        """One run of a sweep at a time per store: a second one would resume the same parent
        and train every job again beside the first."""
        lock = store.sweep_lock(uri, key)
        holder = lock.try_acquire()
        if holder is not None:
            raise EquipError(
                f"{name} is already running in this store ({holder}); wait for it or use "
                "multirun.resume=true after it ends."
            )
        self.lock = lock

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _end_if_aborted(self) -> None:
        if self.parent_id is None:
            self._release()
            return
        import mlflow
        from mlflow import MlflowClient

        from equip.sweep.leaderboard import summarize

        parent_id, self.parent_id = self.parent_id, None
        try:
            if store.store_is_down(mlflow.get_tracking_uri()):
                return  # the next run of the same command resumes it (and marks it meanwhile)
            summarize(parent_id, since=self.started, step=self.summary_step)
            client = MlflowClient()
            client.set_tag(parent_id, schema.ERROR, "the sweep stopped before its last job")
            client.set_terminated(parent_id, "KILLED")
        except Exception as e:
            log.warning("could not end the aborted sweep's parent run: %s", strip_secrets(str(e)))
        finally:
            self._release()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_id is None:
            return
        from mlflow import MlflowClient

        from equip.sweep.leaderboard import print_board, summarize

        parent_id, self.parent_id = self.parent_id, None  # the atexit hook has nothing to do
        try:
            board = summarize(parent_id, since=self.started, step=self.summary_step)
        finally:
            MlflowClient().set_terminated(parent_id, "FINISHED")
            self._release()
        print_board(board)
        uri = store.resolve_uri(config.tracking)
        exp = MlflowClient().get_run(parent_id).info.experiment_id
        say(f"sweep parent: {tracking.run_location(uri, exp, parent_id)}")
        context.clear_sweep()
        # This command's jobs: a failure a resumed sweep has since rerun is history, not news.
        failed = sum(
            r["status"] in ("FAILED", "KILLED") and (r["start_time"] or 0) >= self.started * 1000
            for r in board["rows"]
        )
        jobs = len(board["rows"])
        if failed:  # train.py exits with it once Hydra is done (exit_if_jobs_failed)
            _outcome["failed"] = (
                f"{failed} of {jobs} jobs of {board['parent'].info.run_name!r} failed (FAILED "
                "or KILLED on the leaderboard; each run's equip.error says why). Run the same "
                "command again to rerun them."
            )


FAILED_JOBS_EXIT = 4  # the sweep ran to its end, but some (or all) of its jobs failed
_outcome: dict[str, str] = {}  # what the sweep that ended in this process leaves to say


def exit_if_jobs_failed() -> None:
    """After Hydra's multirun returns (every callback has run): one line and exit 4 when jobs
    of the sweep failed. A sweep whose jobs failed did not do what was asked of it."""
    message = _outcome.pop("failed", None)
    if message is not None:
        fail(message, FAILED_JOBS_EXIT)
