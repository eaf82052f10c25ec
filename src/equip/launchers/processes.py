"""`hydra/launcher=joblib`: a sweep's jobs in worker processes on this machine, with the sweep
keeping control of them.

    python train.py -m sweep=smoke hydra/launcher=joblib hydra.launcher.n_jobs=2

Hydra's joblib launcher hands the whole batch to one joblib.Parallel, that is one loky executor
for every job. loky tears such an executor down whole when one of its workers dies: every
running job is killed with it and the sweep aborts with TerminatedWorkerError, leaving their
runs RUNNING. On Ctrl-C, joblib kills the workers before their jobs can end their runs. Here
each of the n_jobs slots is its own one-worker loky executor (the executor joblib uses, with
cloudpickle for Hydra's task function), and the sweep schedules the jobs over them:

- a worker that dies (kill -9, the OOM killer, a crash) fails only its own job: its run ends
  FAILED with the reason in equip.error, the slot gets a new worker, the other jobs go on, and
  the sweep exits 4 at its end (some jobs failed);
- the workers are in their own process group, so a Ctrl-C reaches the sweep's main process
  only; it passes it on to each busy worker once, each job ends its run KILLED, and the sweep
  says one line and exits 130. A job still running after STOP_WAIT_S is killed and its run
  marked KILLED. Nothing is left running.

Only `n_jobs` of Hydra's joblib settings applies (joblib's -1: one job per core).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import re
import signal
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from joblib.externals.loky import BrokenProcessPool, ProcessPoolExecutor

from equip.launchers.runs import (
    STOP_WAIT_S,
    completed,
    end_children,
    end_stopped_jobs,
    failed,
    record_lost_job,
)
from equip.runtime import stop_at_a_safe_point
from equip.sweep.context import FAILED_JOB_SCORE, PARENT_ENV, WORKER_ENV
from equip.terminal import say
from equip.train.cli import quiet_hydra_notices, say_stopped

log = logging.getLogger(__name__)


@dataclass
class Slot:
    """One worker process, in an executor of its own."""

    executor: ProcessPoolExecutor
    pid: int


def _worker_setup() -> None:
    """In each worker, first: out of the terminal's process group (the main process passes a
    Ctrl-C on, once), and marked as a worker (its jobs leave the one line to the main)."""
    os.setpgrp()
    os.environ[WORKER_ENV] = "1"
    stop_at_a_safe_point()  # the Ctrl-C passed on ends training after its current batch
    quiet_hydra_notices()  # each job composes its config here
    # The training stack, loaded before the slot's first call (its pid): loky measures a
    # worker's reference memory after that call and restarts a worker that has grown 300 MB
    # past it. Loaded by the first job instead, torch and Lightning made every worker look
    # leaky, so each job paid a new worker and ~9 s of imports (4 jobs: 4 workers, not 2).
    import equip.train.run  # noqa: F401


_slots: list[Slot] = []  # kept from batch to batch (Optuna's): the workers stay warm


def worker_slots(n: int) -> list[Slot]:
    """`n` slots: the previous batch's, if it had as many, else new ones."""
    if len(_slots) != n:
        for slot in _slots:
            slot.executor.shutdown(wait=True)
        _slots[:] = new_slots(n)
    return _slots


def new_slots(n: int) -> list[Slot]:
    executors = [ProcessPoolExecutor(max_workers=1, initializer=_worker_setup) for _ in range(n)]
    pids = [e.submit(os.getpid) for e in executors]  # the workers start side by side
    return [Slot(e, p.result()) for e, p in zip(executors, pids, strict=True)]


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], first: int) -> list[JobReturn]:
    """Run one batch of the sweep's jobs; every job's JobReturn, in order."""
    import joblib

    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    n = max(1, min(len(job_overrides), joblib.effective_n_jobs(launcher.joblib.get("n_jobs"))))
    log.info("joblib launcher: %d job(s) in %d worker process(es)", len(job_overrides), n)
    queue = deque(enumerate(job_overrides, first))
    go_on = bool(config.get("multirun", {}).get("continue_on_failure", True))
    slots = worker_slots(n)
    busy: dict[cf.Future, tuple[int, Sequence[str], Slot]] = {}
    results: dict[int, JobReturn] = {}
    try:
        while queue or busy:
            _fill(launcher, slots, busy, queue)
            done, _ = cf.wait(busy, return_when=cf.FIRST_COMPLETED)
            for future in done:
                idx, overrides, slot = busy.pop(future)
                try:
                    results[idx] = future.result()
                except BrokenProcessPool as e:  # its worker died (TerminatedWorkerError)
                    results[idx] = _worker_died(idx, overrides, slot, e, go_on)
                    slots[slots.index(slot)] = new_slots(1)[0]
    except BaseException as stopped:  # Ctrl-C, or a job that ended the sweep (SystemExit)
        _stop(busy, slots)
        if isinstance(stopped, KeyboardInterrupt):
            say_stopped("every job of the sweep is marked KILLED")
            raise SystemExit(130) from None
        raise
    return [results[i] for i in sorted(results)]


def _fill(launcher: Any, slots: list[Slot], busy: dict, queue: deque) -> None:
    """Give every idle worker the next job."""
    from hydra.core.singleton import Singleton

    # Hydra's own job runner of its joblib launcher: the job's config, HydraConfig, run_job.
    from hydra_plugins.hydra_joblib_launcher._core import execute_job

    taken = {id(slot) for _, _, slot in busy.values()}
    for slot in slots:
        if not queue:
            return
        if id(slot) in taken:
            continue
        idx, overrides = queue.popleft()
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        future = slot.executor.submit(
            execute_job,
            idx,
            overrides,
            launcher.hydra_context,
            launcher.config,
            launcher.task_function,
            Singleton.get_state(),
        )
        busy[future] = (idx, overrides, slot)


def _worker_died(
    idx: int, overrides: Sequence[str], slot: Slot, error: BaseException, go_on: bool
) -> JobReturn:
    """The job of a worker that died fails alone: its run FAILED with the reason."""
    codes = re.search(r"exit codes of the workers are \{(.*?)\}", str(error))
    how = f"killed or crashed: {codes.group(1) if codes else type(error).__name__}"
    reason = f"its worker process {slot.pid} died ({how}); rerun on resume"
    parent = os.environ.get(PARENT_ENV)
    if not end_children(parent, "FAILED", reason, worker_pid=slot.pid):
        record_lost_job(parent, overrides, reason)  # it died before its run started
    say((f"job #{idx} failed", "bold red"), f": its worker process {slot.pid} died ({how})")
    return completed(overrides, FAILED_JOB_SCORE) if go_on else failed(overrides, error)


def _stop(busy: dict, slots: list[Slot]) -> None:
    """Pass the stop on to each busy worker once, give the jobs STOP_WAIT_S to end their runs,
    then end the workers; a run still RUNNING is marked KILLED."""
    for future, (_, _, slot) in busy.items():
        if not future.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGINT)
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: stop waiting
        cf.wait(busy, timeout=STOP_WAIT_S)
    for slot in slots:
        slot.executor.shutdown(wait=False, kill_workers=True)
    slots.clear()
    end_stopped_jobs()
