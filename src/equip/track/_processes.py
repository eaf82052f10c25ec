"""Runs of crashed processes: each run is tagged with the process that runs it, and the next
command that opens the store marks KILLED the RUNNING runs whose process is gone."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from equip.track import queries, schema

log = logging.getLogger(__name__)


def process_tags() -> dict[str, str]:
    """Who runs a run: the next command that opens the store checks this process is alive."""
    return {
        schema.HOST: socket.gethostname(),
        schema.PID: str(os.getpid()),
        schema.PID_STARTED: _started(os.getpid()),
        schema.HEARTBEAT: str(int(time.time())),
    }


def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not started or _started(pid) in ("", started)


def reap_stale_runs(experiment_id: str, stale_after_s: float = 1800) -> list[str]:
    """Mark KILLED the RUNNING runs whose process is gone: on this host, its pid no longer
    runs; elsewhere, no heartbeat for `stale_after_s`. Returns their ids."""
    from mlflow import MlflowClient

    client = MlflowClient()
    host, now, reaped = socket.gethostname(), time.time(), []
    # Every run is read (status is checked here: the Azure ML workspace filters on no attribute).
    for run in queries.iter_runs(client, [experiment_id], keep=queries.has_status("RUNNING")):
        t = run.data.tags
        if schema.PID not in t:
            continue  # not ours (or from before equip recorded processes)
        if t.get(schema.HOST) == host:
            gone = not _alive(int(t[schema.PID]), t.get(schema.PID_STARTED, ""))
            why = f"its process {t[schema.PID]} on {host} is gone (killed or crashed)"
        else:
            age = now - float(t.get(schema.HEARTBEAT, now))
            gone = age > stale_after_s
            why = f"no heartbeat from {t.get(schema.HOST)} for {age:.0f} s"
        if gone:
            client.set_tag(
                run.info.run_id,
                schema.ERROR,
                f"{why}; marked KILLED by a later command (rerun it, or resume the sweep)",
            )
            client.set_terminated(run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
    if reaped:
        log.warning(
            "marked %d run(s) KILLED whose process is gone: %s", len(reaped), ", ".join(reaped)
        )
    return reaped
