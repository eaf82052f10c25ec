"""A sweep's leaderboard: its children ranked, logged on the parent run (CSV, Markdown, and the
HTML table and plot of `_board_files`), shown in the terminal by `python -m equip.leaderboard`.

torch/lightning are never imported here: the report command starts in about a second.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from rich.table import Table

from equip.sweep._board_files import cell, html_table, monitored, parallel_plot
from equip.terminal import report
from equip.track import queries, schema
from equip.track import record as tracking

METRICS = schema.FINAL_METRICS
CV_KEY = "data.fold"  # a sweep over only this key is a cross-validation


def leaderboard(parent_id: str) -> tuple[Any, list[dict[str, Any]], list[str]]:
    """(parent run, rows best first, swept keys) from the store."""
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_id)
    children = queries.search_runs(
        client, [parent.info.experiment_id], queries.children_of(parent_id)
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
        "folds": p.get("data.folds"),  # k of a cross-validation: which folds a CV sweep needs
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
    """Mean and standard deviation (ddof=1) across the folds of a cross-validation, and a 95%
    Wilson interval of the pooled accuracy (each image is validated exactly once). With a fold
    missing (failed, or never run) only the counts: a mean over the folds that happen to have
    finished is no estimate of the config."""
    import numpy as np

    from equip.track.reports import wilson_interval

    done = _finished_folds(rows)
    out: dict[str, float] = {
        "cv_folds": float(len(done)),
        "cv_folds_expected": float(_expected_folds(rows)),
    }
    if not done or missing_folds(rows):
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


def _finished_folds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "FINISHED" and r.get(METRICS[0]) is not None]


def _expected_folds(rows: list[dict[str, Any]]) -> int:
    """k of the cross-validation (data.folds of its runs; a job that failed before its run
    logged anything has none), else the number of jobs."""
    ks = [int(r["folds"]) for r in rows if str(r.get("folds") or "").isdigit()]
    return max(ks) if ks else len(rows)


def missing_folds(rows: list[dict[str, Any]]) -> list[int]:
    """The folds of the cross-validation with no finished run, in order."""
    finished = {int(r[CV_KEY]) for r in _finished_folds(rows) if str(r[CV_KEY]).isdigit()}
    return [k for k in range(_expected_folds(rows)) if k not in finished]


def cv_line(cv: dict[str, float], missing: list[int] | None = None) -> str:
    """'5-fold CV: val_acc 0.953 ± 0.012, ...' for the terminal; with folds missing, which."""
    if missing:
        return (
            f"CV incomplete: {cv['cv_folds']:.0f} of {cv['cv_folds_expected']:.0f} folds "
            f"finished, fold {', '.join(map(str, missing))} missing (failed or not run): no "
            "mean is logged; run the same command again to finish it"
        )
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


def summarize(parent_id: str, since: float = 0.0, step: int = 0) -> dict[str, Any]:
    """Log the leaderboard (CSV, Markdown, HTML), best-child tags and counts on the parent;
    its metrics at `step` (each invocation of a resumed sweep logs its own)."""
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
    _log_board_files(client, parent_id, cols, rows)
    tracking.log_metrics(parent_id, counts, step=step)
    best = rows[0] if rows and rows[0]["status"] == "FINISHED" else None
    if best is not None and best.get(monitored(parent)) is None:  # final fits: none validated
        best = None
    cv = cv_summary(rows) if keys == [CV_KEY] else None
    if cv is not None:  # the estimate is the folds' mean, not the luckiest fold
        tracking.log_metrics(parent_id, cv, step=step)
        client.set_tag(parent_id, schema.CV_SUMMARY, cv_line(cv, missing_folds(rows)))
        best = None
    if best:
        _log_best(client, parent, rows, keys, best, step)
    return {"parent": parent, "rows": rows, "keys": keys, "counts": counts, "cv": cv}


def _log_board_files(client, parent_id: str, cols: list[str], rows: list[dict[str, Any]]):
    """The leaderboard as CSV (with run ids and errors), Markdown and HTML, on the parent."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*cols, "run_id", "pruned", "error"])
    for r in rows:
        w.writerow([cell(r[c]) for c in cols] + [r["run_id"], r["pruned"], r["error"]])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    client.log_text(parent_id, buf.getvalue(), "sweep/leaderboard.csv")
    client.log_text(parent_id, "\n".join(md) + "\n", "sweep/leaderboard.md")
    client.log_text(parent_id, html_table(cols, rows), "sweep/leaderboard.html")


def _log_best(client, parent, rows: list[dict[str, Any]], keys: list[str], best, step: int):
    """The best job's tags and metrics on the parent, and the swept values' parallel plot."""
    parent_id = parent.info.run_id
    client.set_tag(parent_id, schema.BEST_RUN_ID, best["run_id"])
    client.set_tag(parent_id, schema.BEST_RUN_NAME, best["run_name"])
    for k in keys:
        client.set_tag(parent_id, schema.BEST_VALUE + k, schema.truncate(str(best[k])))
    tracking.log_metrics(parent_id, {k: best[k] for k in METRICS if best[k] is not None}, step=step)
    if keys and len(rows) > 1:
        fig = parallel_plot(rows, keys, parent)
        client.log_figure(parent_id, fig, "sweep/parallel.png")
        import matplotlib.pyplot as plt

        plt.close(fig)


def print_board(board: dict[str, Any]) -> None:
    parent, rows, keys = board["parent"], board["rows"], board["keys"]
    cols = board_columns(keys)
    table = Table(title=f"{parent.info.run_name}  ({parent.info.run_id})")
    for c in cols:
        table.add_column(_header(c), justify="left" if c in ("run_name", "status") else "right")
    for r in rows:
        status = r["status"] + (" (pruned)" if r["pruned"] else "")
        table.add_row(*[cell(r[c]) if c != "status" else status for c in cols])
    report.print(table)
    counts = board.get("counts")
    if counts:
        report.print(", ".join(f"{k.removeprefix('jobs_')}: {v}" for k, v in counts.items()))
    if keys == [CV_KEY] and rows:
        report.print(cv_line(board.get("cv") or cv_summary(rows), missing_folds(rows)))
