"""A sweep's leaderboard: its children ranked, logged on the parent run, shown in the terminal.

    python -m equip.leaderboard [PARENT_RUN_ID|latest]

torch/lightning are never imported here: the report command starts in about a second.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from equip.errors import EquipError
from equip.track import record as tracking
from equip.track import schema, store
from equip.track.redaction import strip_secrets

METRICS = schema.FINAL_METRICS
CV_KEY = "data.fold"  # a sweep over only this key is a cross-validation


def leaderboard(parent_id: str) -> tuple[Any, list[dict[str, Any]], list[str]]:
    """(parent run, rows best first, swept keys) from the store."""
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], schema.children_of(parent_id), max_results=5000
    )
    keys = [k for k in parent.data.tags.get(schema.SWEPT_KEYS, "").split(",") if k]
    rows = [board_row(r, keys) for r in children]
    monitor = parent.data.tags.get(schema.MONITOR, "val_acc")
    return parent, rank(rows, monitor), keys


def board_row(run, keys: list[str]) -> dict[str, Any]:
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    return {
        "run_name": run.info.run_name,
        "run_id": run.info.run_id,
        "status": run.info.status,
        **{k: p.get(k, "") for k in keys},
        **{k: m.get(k) for k in METRICS},
        "acc_95ci": _interval(m),
        "val_images": m.get("val_images"),
        "best_epoch": m.get("best_epoch"),
        "epochs": m.get("epochs_trained"),
        "train_time_s": m.get("train_time_s"),
        "params": p.get("arch.params"),
        "pruned": t.get(schema.PRUNED) == "true",
        "error": t.get(schema.ERROR, ""),
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "config_hash": t.get(schema.CONFIG_HASH, run.info.run_id),
    }


def rank(rows: list[dict[str, Any]], monitor: str) -> list[dict[str, Any]]:
    """Best first by `best_<monitor>`: FINISHED runs with a score, then the rest. A config run
    twice (a failed try, then a finished resume) shows once: its best attempt."""
    score_key = f"best_{monitor}"
    sign = -1 if schema.monitor_mode(monitor) == "max" else 1

    def order(row: dict[str, Any]) -> tuple:
        score = row.get(score_key)
        ok = row["status"] == "FINISHED" and score is not None and not math.isnan(score)
        return (not ok, sign * score if ok else 0.0)

    best_per_config: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=order):
        best_per_config.setdefault(row["config_hash"], row)
    ranked = sorted(best_per_config.values(), key=order)
    for i, row in enumerate(ranked, 1):
        row["rank"] = i
    return ranked


def _fmt(v: Any) -> str:
    if isinstance(v, str) and len(v) > 8:  # params are strings: shorten sampled floats
        try:
            v = float(v)
        except ValueError:
            return v
    if isinstance(v, float):
        if v.is_integer():
            return str(int(v))
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return "" if v is None else str(v)


def _interval(m: dict[str, float]) -> str:
    """'0.912-0.968': the 95% Wilson interval of val accuracy, from the number of val images."""
    low, high = m.get("best_val_acc_ci_low"), m.get("best_val_acc_ci_high")
    return "" if low is None or high is None else f"{low:.3f}-{high:.3f}"


def board_columns(keys: list[str]) -> list[str]:
    return [
        "rank",
        "run_name",
        *keys,
        METRICS[0],
        "acc_95ci",
        *METRICS[1:],
        "epochs",
        "train_time_s",
        "params",
        "status",
    ]


def cv_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and standard deviation (ddof=1) across the finished folds of a cross-validation,
    and a 95% Wilson interval of the pooled accuracy (each image is validated exactly once)."""
    import numpy as np

    from equip.track.reports import wilson_interval

    done = [r for r in rows if r["status"] == "FINISHED" and r.get(METRICS[0]) is not None]
    out: dict[str, float] = {"cv_folds": float(len(done))}
    if not done:
        return out
    for k in (*METRICS, "train_time_s"):
        values = np.array([r[k] for r in done if r.get(k) is not None], dtype=float)
        if len(values):
            out[f"cv_mean_{k}"] = float(values.mean())
            out[f"cv_std_{k}"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    if all(r.get("val_images") for r in done):
        n = sum(int(r["val_images"]) for r in done)
        correct = round(sum(r[METRICS[0]] * r["val_images"] for r in done))
        out["cv_val_images"] = float(n)
        out["cv_pooled_acc"] = correct / n
        out["cv_pooled_acc_ci_low"], out["cv_pooled_acc_ci_high"] = wilson_interval(correct, n)
    return out


def cv_line(cv: dict[str, float]) -> str:
    """'5-fold CV: val_acc 0.953 ± 0.012, ...' for the terminal."""
    parts = [
        f"{k.removeprefix('cv_mean_best_')} {cv[k]:.4f} ± {cv[k.replace('mean', 'std')]:.4f}"
        for k in cv
        if k.startswith("cv_mean_best_")
    ]
    line = f"{cv['cv_folds']:.0f}-fold CV (mean ± std): " + ", ".join(parts)
    if "cv_pooled_acc" in cv:
        line += (
            f"; pooled val_acc {cv['cv_pooled_acc']:.4f} [95% CI "
            f"{cv['cv_pooled_acc_ci_low']:.3f}-{cv['cv_pooled_acc_ci_high']:.3f}, "
            f"n={cv['cv_val_images']:.0f}]"
        )
    if "cv_mean_train_time_s" in cv:
        line += f"; {cv['cv_mean_train_time_s']:.0f} s per fold"
    return line


def _header(column: str) -> str:
    """Short terminal headers: 'model.filters' -> 'filters', 'best_val_acc' -> 'val_acc'."""
    return column.split(".")[-1].removeprefix("best_").replace("train_time_s", "time_s")


def summarize(parent_id: str, since: float = 0.0) -> dict[str, Any]:
    """Log the leaderboard (CSV, Markdown, HTML), best-child tags and counts on the parent."""
    from mlflow import MlflowClient

    client = MlflowClient()
    parent, rows, keys = leaderboard(parent_id)
    cols = board_columns(keys)
    counts = {
        "jobs_finished": sum(r["status"] == "FINISHED" for r in rows),
        "jobs_failed": sum(r["status"] in ("FAILED", "KILLED") for r in rows),
        "jobs_pruned": sum(r["pruned"] for r in rows),
        # finished before this invocation began (a job continued now with resume= is not)
        "jobs_skipped": sum(
            since > 0 and r["status"] == "FINISHED" and (r["end_time"] or 0) < since * 1000
            for r in rows
        ),
    }
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*cols, "run_id", "pruned", "error"])
    for r in rows:
        w.writerow([_fmt(r[c]) for c in cols] + [r["run_id"], r["pruned"], r["error"]])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    client.log_text(parent_id, buf.getvalue(), "sweep/leaderboard.csv")
    client.log_text(parent_id, "\n".join(md) + "\n", "sweep/leaderboard.md")
    client.log_text(parent_id, _html(cols, rows), "sweep/leaderboard.html")
    tracking.log_metrics(parent_id, counts, step=0)
    best = rows[0] if rows and rows[0]["status"] == "FINISHED" else None
    cv = cv_summary(rows) if keys == [CV_KEY] else None
    if cv is not None:  # the estimate is the folds' mean, not the luckiest fold
        tracking.log_metrics(parent_id, cv, step=0)
        client.set_tag(parent_id, schema.CV_SUMMARY, cv_line(cv))
        best = None
    if best:
        client.set_tag(parent_id, schema.BEST_RUN_ID, best["run_id"])
        client.set_tag(parent_id, schema.BEST_RUN_NAME, best["run_name"])
        for k in keys:
            client.set_tag(parent_id, schema.BEST_VALUE + k, schema.truncate(str(best[k])))
        tracking.log_metrics(
            parent_id, {k: best[k] for k in METRICS if best[k] is not None}, step=0
        )
        if keys and len(rows) > 1:
            fig = _parallel_plot(rows, keys, parent)
            client.log_figure(parent_id, fig, "sweep/parallel.png")
            import matplotlib.pyplot as plt

            plt.close(fig)
    return {"parent": parent, "rows": rows, "keys": keys, "counts": counts, "cv": cv}


def _html(cols: list[str], rows: list[dict[str, Any]]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_fmt(r[c]))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return (
        f"<html><body><table border=1 cellpadding=4><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></body></html>\n"
    )


def _parallel_plot(rows: list[dict[str, Any]], keys: list[str], parent):
    """Swept values against the monitored metric, one line per finished job.

    Hand-written: pandas' parallel_coordinates colours by class and cannot mix categorical
    (e.g. filters=[32, 64]) and numeric axes, which is exactly what a sweep has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monitor = "best_" + parent.data.tags.get(schema.MONITOR, "val_acc")
    done = [r for r in rows if r["status"] == "FINISHED" and r.get(monitor) is not None]
    axes = [*keys, monitor]
    fig, ax = plt.subplots(figsize=(2.2 * len(axes) + 2, 4.5), layout="constrained")
    positions = {}
    for k in keys:
        values = sorted({r[k] for r in done}, key=_sort_key)
        positions[k] = {v: i / max(len(values) - 1, 1) for i, v in enumerate(values)}
    scores = [r[monitor] for r in done]
    lo, hi = min(scores), max(scores)
    cmap = plt.get_cmap("viridis")
    for r in done:
        norm = (r[monitor] - lo) / (hi - lo) if hi > lo else 0.5
        ys = [positions[k][r[k]] for k in keys] + [norm]
        ax.plot(range(len(axes)), ys, color=cmap(norm), lw=2, alpha=0.8, marker="o")
    for i, k in enumerate(keys):
        for v, y in positions[k].items():
            ax.annotate(v, (i, y), textcoords="offset points", xytext=(4, 0), fontsize=8)
    ax.annotate(f"{hi:.3f}", (len(keys), 1), xytext=(4, 0), textcoords="offset points")
    ax.annotate(f"{lo:.3f}", (len(keys), 0), xytext=(4, 0), textcoords="offset points")
    ax.set_xticks(range(len(axes)), axes, rotation=15)
    ax.set_yticks([])
    ax.set_title(f"{parent.info.run_name}: swept values vs {monitor}")
    return fig


def _sort_key(v: str) -> tuple:
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def print_board(board: dict[str, Any]) -> None:
    parent, rows, keys = board["parent"], board["rows"], board["keys"]
    cols = board_columns(keys)
    table = Table(title=f"{parent.info.run_name}  ({parent.info.run_id})")
    for c in cols:
        table.add_column(_header(c), justify="left" if c in ("run_name", "status") else "right")
    for r in rows:
        status = r["status"] + (" (pruned)" if r["pruned"] else "")
        table.add_row(*[_fmt(r[c]) if c != "status" else status for c in cols])
    out = Console() if sys.stdout.isatty() else Console(width=200)  # pipes/CI: don't wrap at 80
    out.print(table)
    counts = board.get("counts")
    if counts:
        out.print(", ".join(f"{k.removeprefix('jobs_')}: {v}" for k, v in counts.items()))
    if board.get("cv") is None and keys == [CV_KEY]:
        board["cv"] = cv_summary(rows)
    if (board.get("cv") or {}).get("cv_folds"):
        out.print(cv_line(board["cv"]), highlight=False)


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
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]equip: error:[/] {e}", highlight=False
        )
        return 2
    return 0


def _load(args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]], list[str]]:
    uri = args.tracking_uri or store.default_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise EquipError(f"no MLflow store at {uri}; run a sweep first or pass --tracking-uri.")
    if uri.startswith(("http://", "https://")) and not store.reachable(uri):
        raise EquipError(
            f"the MLflow server {strip_secrets(uri)} is unreachable; start it or "
            "pass another --tracking-uri."
        )
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    parent = args.parent
    if parent == "latest":
        exp = client.get_experiment_by_name(args.experiment)
        runs = (
            client.search_runs(
                [exp.experiment_id],
                schema.sweep_parents(),
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if exp
            else []
        )
        if not runs:
            raise EquipError(f"no sweep in experiment {args.experiment!r} at {uri}.")
        parent = runs[0].info.run_id
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
    sys.exit(main())
