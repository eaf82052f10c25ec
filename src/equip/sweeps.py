"""Sweeps: one MLflow parent run per Hydra multirun, a child run per job, a leaderboard at the end.

Hydra runs the sweep (basic or Optuna sweeper; in-process or joblib launcher). `SweepTracker`, a
Hydra callback, adds what Hydra and MLflow lack between them: the whole grid validated before
the first job, a parent run reused on resume, and the summary. Jobs find their parent through
EQUIP_PARENT_RUN_ID, which launcher processes inherit.

    python -m equip.sweeps report [PARENT_RUN_ID|latest]   # the leaderboard in the terminal

torch/lightning are never imported here: the report command starts in about a second.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import hashlib
import io
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from equip import tracking
from equip.errors import EquipError

log = logging.getLogger(__name__)
console = Console(stderr=True, soft_wrap=True)  # long paths stay whole, greppable
PARENT_ENV = "EQUIP_PARENT_RUN_ID"
SWEPT_ENV = "EQUIP_SWEPT_KEYS"  # jobs name their runs by the swept values only
METRICS = ("best_val_acc", "best_val_macro_f1", "best_val_loss")
SWEEP_FN = re.compile(r"^\s*(choice|range|interval|glob|tag)\(")  # Hydra's sweep functions


def register_sweep_configs(folder: Path) -> None:
    """Make every sweeps/NAME.yaml selectable as `sweep=NAME` (a global config, like Hydra's
    'experiment' pattern), without moving it into conf/."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for f in sorted(folder.glob("*.yaml")):
        store.store(group="sweep", name=f.stem, node=OmegaConf.load(f), package="_global_")


# ---------------------------------------------------------------- identities
def _key_overrides(overrides: Iterable[str]) -> list[str]:
    """Overrides that define what a sweep trains (not how it is launched or where it is logged)."""
    skip = ("hydra/launcher", "hydra.launcher", "hydra.sweep", "hydra.run", "tracking.",
            "trainer.progress_bar", "sweep.")  # fmt: skip
    return sorted(o for o in overrides if not o.lstrip("+~").startswith(skip))


def sweep_key(config: DictConfig) -> str:
    text = "\n".join([config.tracking.experiment, *_key_overrides(config.hydra.overrides.task)])
    params = config.hydra.sweeper.get("params") or {}
    text += "\n" + "\n".join(f"{k}={v}" for k, v in sorted(params.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_hash(cfg: DictConfig, data_fingerprint: str) -> str:
    """Identity of a job: its training config and its data (changed photos are a new job).
    A resumed sweep skips jobs whose hash already FINISHED."""
    params = tracking.config_params(cfg)
    keep = sorted((k, v) for k, v in params.items() if not k.startswith(("tracking.", "sweep.",
                  "trainer.progress_bar")))  # fmt: skip
    return hashlib.sha256(repr([data_fingerprint, keep]).encode()).hexdigest()[:16]


def parent_run_id() -> str | None:
    """The sweep's parent run when this process runs a multirun job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return os.environ.get(PARENT_ENV)


def swept_overrides(overrides: Iterable[str], keys: Iterable[str]) -> list[str]:
    """The overrides that set one of the swept `keys`."""
    wanted = set(keys)
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in wanted]


def job_name_overrides(overrides: list[str]) -> list[str]:
    """In a sweep, only the swept values tell its jobs apart: name runs by those."""
    return swept_overrides(overrides, filter(None, os.environ.get(SWEPT_ENV, "").split(",")))


def finished_twin(experiment_id: str, parent_id: str, cfg_hash: str):
    """A FINISHED child of this parent with the same config, if any (for resume)."""
    from mlflow import MlflowClient

    runs = MlflowClient().search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}' and tags.`equip.config_hash` = '{cfg_hash}' "
        "and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0] if runs else None


# ---------------------------------------------------------------- validation
def sweep_points(config: DictConfig) -> list[list[str]]:
    """Every job's overrides, expanded the way Hydra's BasicSweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(args)
    return BasicSweeper.split_arguments(overrides, None)[0]


def invalid_points(config: DictConfig) -> list[tuple[list[str], str]]:
    """(overrides, reason) for every grid point that would fail its checks."""
    from hydra import compose

    from equip.training import check_config

    bad = []
    name = config.hydra.job.config_name
    for point in sweep_points(config):
        try:
            cfg = compose(name, overrides=point)
            check_config(cfg)
        except Exception as e:  # composition errors (bad key, bad value type) count too
            bad.append((point, str(e).splitlines()[0]))
    return bad


# ---------------------------------------------------------------- the callback
class SweepTracker(Callback):
    """Parent run, validation, resume and summary for every `-m` run of train.py."""

    def __init__(self) -> None:
        self.parent_id: str | None = None
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from mlflow import MlflowClient

        sweeper = str(config.hydra.sweeper._target_)
        if sweeper.endswith("BasicSweeper"):
            bad = invalid_points(config)
            if bad:
                console.print(f"[bold red]equip: error:[/] {len(bad)} sweep point(s) are invalid;"
                              " nothing was trained. Fix or remove them:")  # fmt: skip
                for point, why in bad:
                    console.print(f"  {' '.join(point)}\n    -> {why}", highlight=False)
                raise SystemExit(2)
        if config.hydra.launcher.get("dry_run"):  # a launcher that only writes job files
            os.environ[SWEPT_ENV] = ",".join(swept_keys(config))  # no store, no parent run
            return
        try:
            tracking.connect(config.tracking)
        except EquipError as e:
            console.print(f"[bold red]equip: error:[/] {e}", highlight=False)
            raise SystemExit(2) from None
        exp_id = tracking.experiment_id(config.tracking.experiment, config.tracking.artifact_root)
        client = MlflowClient()
        key = sweep_key(config)
        keys = swept_keys(config)
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        self.started = time.time()
        previous = client.search_runs(
            [exp_id], f"tags.`equip.sweep_key` = '{key}'", order_by=["attributes.start_time DESC"]
        )
        resume = config.sweep.resume and previous
        if resume:
            self.parent_id = previous[0].info.run_id
            client.update_run(self.parent_id, status="RUNNING")
            # Jobs still RUNNING were cut off with the sweep (a killed process cannot say so).
            for run in client.search_runs(
                [exp_id],
                f"tags.mlflow.parentRunId = '{self.parent_id}' and attributes.status = 'RUNNING'",
            ):
                client.set_tag(run.info.run_id, "equip.error", "interrupted; rerun on resume")
                client.set_terminated(run.info.run_id, "KILLED")
            console.print(f"resuming sweep {previous[0].info.run_name!r} ({self.parent_id}): "
                          "jobs that already finished are skipped", highlight=False)  # fmt: skip
        else:
            overrides = tracking.redact_overrides(_key_overrides(config.hydra.overrides.task))
            run = client.create_run(
                exp_id,
                run_name=sweep_name(config, keys),
                tags={
                    "equip.sweep_key": key,
                    "equip.sweep_dir": sweep_dir,
                    "equip.sweep_overrides": " ".join(overrides)[:5000],
                    "equip.swept_keys": ",".join(keys),
                    "equip.sweeper": sweeper,
                    "equip.launcher": str(config.hydra.launcher._target_),
                    "equip.monitor": str(config.trainer.monitor),
                    "equip.monitor_mode": str(config.trainer.monitor_mode),
                    **tracking.git_tags(Path(__file__).parent),
                },
            )
            self.parent_id = run.info.run_id
        client.set_tag(self.parent_id, "equip.last_sweep_dir", sweep_dir)
        os.environ[PARENT_ENV] = self.parent_id
        os.environ[SWEPT_ENV] = ",".join(keys)
        # Hydra skips on_multirun_end when a sweep aborts (Ctrl-C, a job raising with
        # continue_on_failure=false): end the parent anyway, with what its children have.
        atexit.register(self._end_if_aborted)

    def _end_if_aborted(self) -> None:
        if self.parent_id is None:
            return
        from mlflow import MlflowClient

        try:
            summarize(self.parent_id, since=self.started)
        except Exception as e:
            log.warning("could not summarise the aborted sweep: %s", e)
        client = MlflowClient()
        client.set_tag(self.parent_id, "equip.error", "the sweep stopped before its last job")
        client.set_terminated(self.parent_id, "KILLED")
        self.parent_id = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_id is None:
            return
        from mlflow import MlflowClient

        parent_id, self.parent_id = self.parent_id, None  # the atexit hook has nothing to do
        try:
            board = summarize(parent_id, since=self.started)
        finally:
            MlflowClient().set_terminated(parent_id, "FINISHED")
        print_board(board)
        uri = tracking.resolve_uri(config.tracking)
        exp = MlflowClient().get_run(parent_id).info.experiment_id
        console.print(f"sweep parent: {tracking.run_location(uri, exp, parent_id)}",
                      highlight=False, soft_wrap=True)  # fmt: skip
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(SWEPT_ENV, None)


def swept_keys(config: DictConfig) -> list[str]:
    params = config.hydra.sweeper.get("params") or {}
    keys = [str(k) for k in params]
    for o in config.hydra.overrides.task:
        key, _, value = o.partition("=")
        if ("," in value and not value.startswith("[")) or "],[" in value or SWEEP_FN.match(value):
            keys.append(key.lstrip("+~"))
    return list(dict.fromkeys(keys))


def sweep_name(config: DictConfig, keys: list[str]) -> str:
    """'sweep smoke', or the swept values: 'sweep filters=[32,64],[32,64,128]'."""
    task = list(config.hydra.overrides.task)
    chosen = [o.split("=", 1)[1] for o in task if o.startswith("sweep=")]
    swept = [o.split("=", 1) for o in swept_overrides(task, keys)]
    parts = [f"{k.split('.')[-1]}={v}" for k, v in swept]
    return " ".join(["sweep", *chosen[:1], *parts])[:250]


# ---------------------------------------------------------------- summary
def leaderboard(parent_id: str) -> tuple[Any, list[dict[str, Any]], list[str]]:
    """(parent run, rows best first, swept keys) from the store."""
    from mlflow import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000
    )
    keys = [k for k in parent.data.tags.get("equip.swept_keys", "").split(",") if k]
    monitor = parent.data.tags.get("equip.monitor", "val_acc")
    mode = parent.data.tags.get("equip.monitor_mode", "max")
    # A config run twice (a failed try, then a finished resume) shows once: its best attempt.
    rows = []
    for r in children:
        m, p, t = r.data.metrics, r.data.params, r.data.tags
        rows.append({
            "run_name": r.info.run_name, "run_id": r.info.run_id, "status": r.info.status,
            **{k: p.get(k, "") for k in keys},
            **{k: m.get(k) for k in METRICS},
            "epochs": m.get("epochs_trained"), "train_time_s": m.get("train_time_s"),
            "params": p.get("arch.params"), "pruned": t.get("equip.pruned") == "true",
            "error": t.get("equip.error", ""), "start_time": r.info.start_time,
            "config_hash": t.get("equip.config_hash", r.info.run_id),
        })  # fmt: skip
    score_key = f"best_{monitor}"
    sign = -1 if mode == "max" else 1

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
    return parent, ranked, keys


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


def board_columns(keys: list[str]) -> list[str]:
    return ["rank", "run_name", *keys, *METRICS, "epochs", "train_time_s", "params", "status"]


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
        "jobs_skipped": sum(since > 0 and r["start_time"] < since * 1000 for r in rows),
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
    if best:
        client.set_tag(parent_id, "equip.best_run_id", best["run_id"])
        client.set_tag(parent_id, "equip.best_run_name", best["run_name"])
        for k in keys:
            client.set_tag(parent_id, f"equip.best.{k}", str(best[k])[:5000])
        tracking.log_metrics(
            parent_id, {k: best[k] for k in METRICS if best[k] is not None}, step=0
        )
        if keys and len(rows) > 1:
            fig = _parallel_plot(rows, keys, parent)
            client.log_figure(parent_id, fig, "sweep/parallel.png")
            import matplotlib.pyplot as plt

            plt.close(fig)
    return {"parent": parent, "rows": rows, "keys": keys, "counts": counts}


def _html(cols: list[str], rows: list[dict[str, Any]]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(_fmt(r[c]))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return (f"<html><body><table border=1 cellpadding=4><thead><tr>{head}</tr></thead>"
            f"<tbody>{body}</tbody></table></body></html>\n")  # fmt: skip


def _parallel_plot(rows: list[dict[str, Any]], keys: list[str], parent):
    """Swept values against the monitored metric, one line per finished job.

    Hand-written: pandas' parallel_coordinates colours by class and cannot mix categorical
    (e.g. filters=[32, 64]) and numeric axes, which is exactly what a sweep has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monitor = "best_" + parent.data.tags.get("equip.monitor", "val_acc")
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m equip.sweeps", description="Sweep leaderboards.")
    sub = ap.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="print a sweep's leaderboard")
    rep.add_argument("parent", nargs="?", default="latest", help="parent run id, or 'latest'")
    rep.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, "
                     "else sqlite:///mlflow.db in this folder")  # fmt: skip
    rep.add_argument("--experiment", default="equip")
    args = ap.parse_args(argv)
    from mlflow import MlflowClient

    uri = args.tracking_uri or tracking.resolve_uri(
        OmegaConf.create({"uri": "sqlite:///mlflow.db"})
    )
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise SystemExit(f"equip: error: no MLflow store at {uri}; run a sweep first or pass "
                         "--tracking-uri.")  # fmt: skip
    client = MlflowClient(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    parent = args.parent
    if parent == "latest":
        exp = client.get_experiment_by_name(args.experiment)
        runs = client.search_runs(
            [exp.experiment_id] if exp else [], "tags.`equip.sweep_key` != ''",
            order_by=["attributes.start_time DESC"], max_results=1,
        ) if exp else []  # fmt: skip
        if not runs:
            raise SystemExit(f"equip: error: no sweep in experiment {args.experiment!r} at {uri}.")
        parent = runs[0].info.run_id
    print_board({**dict(zip(("parent", "rows", "keys"), leaderboard(parent), strict=True))})


if __name__ == "__main__":
    main()


def record_failed_job(cfg: DictConfig, error: BaseException) -> None:
    """A job that failed before its run existed (bad data, say) still shows as a FAILED child."""
    from mlflow import MlflowClient

    from equip.training import hydra_overrides

    try:
        tracking.connect(cfg.tracking)
        exp_id = tracking.experiment_id(cfg.tracking.experiment, cfg.tracking.artifact_root)
        client = MlflowClient()
        run = client.create_run(
            exp_id,
            run_name=tracking.run_name(cfg, hydra_overrides()),
            tags={"mlflow.parentRunId": parent_run_id() or "",
                  "equip.config_hash": config_hash(cfg, "unknown"),
                  "equip.error": f"{type(error).__name__}: {error}"[:5000]},
        )  # fmt: skip
        client.log_text(run.info.run_id, f"{type(error).__name__}: {error}\n", "error.txt")
        client.set_terminated(run.info.run_id, "FAILED")
    except Exception as e:  # the store may be the very thing that failed
        log.warning("could not record the failed job in MLflow: %s", e)
