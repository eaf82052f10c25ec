"""`python -m equip.leaderboard [PARENT_RUN_ID|latest]`: a sweep's leaderboard, read from the
store; the board itself is equip.sweep.leaderboard."""

from __future__ import annotations

import argparse
from typing import Any

from equip.errors import EquipError
from equip.sweep.leaderboard import leaderboard, print_board
from equip.terminal import fail, fail_if_refused
from equip.track import queries, schema, store
from equip.track.redaction import strip_secrets


def main(argv: list[str] | None = None) -> int:
    """python -m equip.leaderboard: 0 when the board is shown, 2 with one line otherwise."""
    ap = argparse.ArgumentParser(
        prog="python -m equip.leaderboard", description="Print a sweep's leaderboard."
    )
    ap.add_argument("parent", nargs="?", default="latest", help="parent run id, or 'latest'")
    ap.add_argument(
        "--tracking-uri",
        default=None,
        help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in this folder",
    )
    ap.add_argument("--experiment", default="equip")
    args = ap.parse_args(argv)
    try:
        print_board(dict(zip(("parent", "rows", "keys"), _load(args), strict=True)))
    except EquipError as e:
        fail(str(e), 2)
    except Exception as e:
        fail_if_refused(e)
        raise
    return 0


def _load(args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]], list[str]]:
    uri = store.open_given(args.tracking_uri, "--tracking-uri", "run a sweep first")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    parent = args.parent
    if parent == "latest":
        exp = client.get_experiment_by_name(args.experiment)
        # The newest run with a sweep key (the workspace has no != on tags to ask for it).
        is_parent = queries.has_tag(schema.SWEEP_KEY)
        newest = queries.first_run(client, [exp.experiment_id], keep=is_parent) if exp else None
        if newest is None:
            raise EquipError(f"no sweep in experiment {args.experiment!r} at {uri}.")
        parent = newest.info.run_id
    try:
        run = client.get_run(parent)
    except MlflowException:
        raise EquipError(
            f"no run {parent!r} at {strip_secrets(uri)}; give a sweep's parent run id or 'latest'."
        ) from None
    if schema.SWEEP_KEY not in run.data.tags:
        raise EquipError(
            f"run {parent} ({run.info.run_name}) is a single run, not a sweep's "
            "parent; give a parent run id (the MLflow UI nests its jobs under it) "
            "or 'latest'."
        )
    store.reap_stale_runs(run.info.experiment_id)  # a crashed job shows as KILLED, not RUNNING
    return leaderboard(parent)


if __name__ == "__main__":
    raise SystemExit(main())
