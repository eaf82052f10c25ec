"""What launchers share about their jobs: the child runs a launcher ends itself, because the
process that ran them cannot say so any more (a Ray node or a joblib worker lost with its job)
or the user stopped the sweep (Ctrl-C) before a job could end its own run; and the JobReturn
of a job for Hydra's sweeper."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

from equip.sweep.context import PARENT_ENV, SWEPT_ENV, swept_overrides
from equip.track import queries, schema

log = logging.getLogger(__name__)
STOP_WAIT_S = 60  # after a Ctrl-C, for the jobs to end their own runs KILLED


def completed(overrides: Sequence[str], value: Any) -> JobReturn:
    return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=value)


def failed(overrides: Sequence[str], error: BaseException) -> JobReturn:
    """A failed job: Hydra's sweeper raises `error` when it reads it, and the sweep stops."""
    return JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error)


def end_children(
    parent_id: str | None, status: str, reason: str, worker_pid: int | None = None
) -> list[str]:
    """End the parent's RUNNING children with `status` and `reason` (tag equip.error): all of
    them, or only those of the worker process `worker_pid` on this host, which another job's
    look at the store may have marked KILLED already ('its process … is gone'): the launcher
    knows better why. Returns the ids of the runs it ended."""
    if not parent_id:
        return []
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_run(parent_id).info.experiment_id
    keep = queries.has_status("RUNNING") if worker_pid is None else None
    ended = []
    for run in queries.search_runs(client, [exp], queries.children_of(parent_id), keep):
        tags = run.data.tags
        if worker_pid is not None and not _ran_in(tags, run.info.status, worker_pid):
            continue
        client.set_tag(run.info.run_id, schema.ERROR, schema.truncate(reason))
        client.set_terminated(run.info.run_id, status)
        ended.append(run.info.run_id)
    return ended


def _ran_in(tags: dict[str, str], status: str, pid: int) -> bool:
    """Whether a run was run by process `pid` of this host and is RUNNING or was only marked
    KILLED because that process is gone."""
    if tags.get(schema.PID) != str(pid) or tags.get(schema.HOST) != socket.gethostname():
        return False
    return status == "RUNNING" or (
        status == "KILLED" and tags.get(schema.ERROR, "").startswith(f"its process {pid} ")
    )


def record_lost_job(
    parent_id: str | None,
    overrides: Sequence[str],
    reason: str,
    tags: dict[str, str] | None = None,
) -> None:
    """A FAILED child for a job lost before its run started, so the sweep counts it."""
    if not parent_id:
        return
    from mlflow import MlflowClient

    client = MlflowClient()
    keys = [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k]
    run = client.create_run(
        client.get_run(parent_id).info.experiment_id,
        run_name=" ".join(swept_overrides(overrides, keys)) or "lost job",
        tags={**(tags or {}), schema.PARENT: parent_id, schema.ERROR: schema.truncate(reason)},
    )
    client.set_terminated(run.info.run_id, "FAILED")


def end_stopped_jobs() -> None:
    """After a Ctrl-C, once the jobs had STOP_WAIT_S to end their own runs: a child of the
    sweep still RUNNING (its process was killed first) is marked KILLED."""
    try:
        end_children(
            os.environ.get(PARENT_ENV),
            "KILLED",
            "stopped by the user (Ctrl-C) before the job could end its run",
        )
    except Exception as e:  # the store itself may be why the sweep stopped
        log.warning("could not end the runs of the stopped jobs: %s", type(e).__name__)
