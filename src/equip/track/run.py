"""The life of one MLflow run, as a context manager: started new or reopened to resume, tagged
with the process that runs it, ended FINISHED, or on a failure ended FAILED (KILLED when the
user stopped it) with the reason, the traceback and the best checkpoint so far.

    with TrackedRun(record_unstarted=...) as run:
        ...                      # a failure here, before the run exists, goes to record_unstarted
        run.start(experiment_id, name, tags, parent_run_id)   # or run.reopen(run_id, tags)
        ...                      # a failure here ends the run FAILED or KILLED

Recording a failure never raises (the store itself may be what failed); the failure itself
always propagates.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from equip.track import schema, store
from equip.track.redaction import strip_secrets

log = logging.getLogger(__name__)


def was_stopped_by_user(error: BaseException) -> bool:
    # Lightning turns Ctrl-C during fit() into SystemExit: both mean the user stopped it.
    return isinstance(error, KeyboardInterrupt | SystemExit)


def describe(error: BaseException) -> str:
    """The failure as one line fit for a tag: secrets cut out."""
    if was_stopped_by_user(error):
        return "stopped by the user (Ctrl-C or a termination signal)"
    return strip_secrets(f"{type(error).__name__}: {error}")


class TrackedRun:
    """One job's MLflow run. `record_unstarted(error)` records a failure that came before the
    run existed; `failure_checkpoint()` names the file a failed run keeps (None: nothing)."""

    def __init__(
        self,
        record_unstarted: Callable[[BaseException], None] | None = None,
        failure_checkpoint: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.record_unstarted = record_unstarted
        self.failure_checkpoint = failure_checkpoint
        self._id: str | None = None
        self.name = ""
        self.resumed = False

    @property
    def id(self) -> str:
        """The run's id, once started or reopened."""
        if self._id is None:
            raise RuntimeError("the MLflow run has not started yet")
        return self._id

    def start(
        self,
        experiment_id: str,
        name: str,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
    ) -> str:
        """A new run, tagged with `tags` and the process that runs it."""
        import mlflow

        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=name,
            tags={**tags, **store.process_tags()},
            parent_run_id=parent_run_id,
        )
        self._id, self.name = run.info.run_id, name
        return self._id

    def reopen(self, run_id: str, tags: Mapping[str, str]) -> str:
        """A run cut off earlier, continued: marked resumed, its old error tag dropped."""
        import mlflow

        run = mlflow.start_run(run_id=run_id)
        mlflow.set_tags({**tags, schema.RESUMED: "true", **store.process_tags()})
        if schema.ERROR in run.data.tags:  # the error that cut it off is history now
            mlflow.delete_tag(schema.ERROR)
        self._id, self.name, self.resumed = run_id, run.info.run_name, True
        return self._id

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if error is None:
            if self._id is not None:
                import mlflow

                mlflow.end_run("FINISHED")
            return
        self._record(error)

    def _record(self, error: BaseException) -> None:
        import mlflow

        if store.store_is_down(mlflow.get_tracking_uri()):
            log.warning(
                "the tracking store is unreachable: the failure of this job is not recorded"
            )
            return
        try:
            if self._id is not None:
                self._end_failed(error, self._id)
            elif self.record_unstarted is not None:
                self.record_unstarted(error)
        except Exception as log_error:
            log.warning("could not record the failure in MLflow: %s", strip_secrets(str(log_error)))

    def _end_failed(self, error: BaseException, run_id: str) -> None:
        import mlflow
        from mlflow import MlflowClient

        status = "KILLED" if was_stopped_by_user(error) else "FAILED"
        client = MlflowClient()
        try:
            client.set_tag(run_id, schema.ERROR, schema.truncate(describe(error)))
            text = strip_secrets("".join(traceback.format_exception(error)))
            client.log_text(run_id, text, "error.txt")
            checkpoint = self.failure_checkpoint()
            if checkpoint and Path(checkpoint).exists():
                client.log_artifact(run_id, checkpoint, "checkpoints")
        finally:
            if mlflow.active_run() is not None and mlflow.active_run().info.run_id == run_id:
                mlflow.end_run(status)
            else:
                client.set_terminated(run_id, status)
