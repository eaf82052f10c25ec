"""How the leaderboard looks: its cells, and the files on the parent run beyond CSV and
Markdown (an HTML table, a parallel-coordinates plot of swept values against the metric)."""

from __future__ import annotations

from typing import Any

from equip.track import schema


def cell(v: Any) -> str:
    """A value as a leaderboard cell: sampled floats shortened, whole numbers without .0."""
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


def html_table(cols: list[str], rows: list[dict[str, Any]]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(cell(r[c]))}</td>" for c in cols) + "</tr>" for r in rows
    )
    return (
        f"<html><body><table border=1 cellpadding=4><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></body></html>\n"
    )


def monitored(parent) -> str:
    """The metric a sweep's jobs are ranked by, as its runs log it (best_val_acc...)."""
    return "best_" + parent.data.tags.get(schema.MONITOR, "val_acc")


def parallel_plot(rows: list[dict[str, Any]], keys: list[str], parent):
    """Swept values against the monitored metric, one line per finished job that has it (at
    least one).

    Hand-written: pandas' parallel_coordinates colours by class and cannot mix categorical
    (e.g. filters=[32, 64]) and numeric axes, which is exactly what a sweep has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monitor = monitored(parent)
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
