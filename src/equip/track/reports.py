"""End-of-run evaluation: final metrics, per-class table, confusion matrix, learning curves."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)


def per_class_table(classes: list[str], y_true: torch.Tensor, y_pred: torch.Tensor) -> dict:
    """Column-wise table {'class': [...], 'precision': [...], ...} for mlflow.log_table."""
    n = len(classes)
    cols: dict[str, list[Any]] = {"class": list(classes)}
    for name, metric in (
        ("precision", MulticlassPrecision(n, average=None)),
        ("recall", MulticlassRecall(n, average=None)),
        ("f1", MulticlassF1Score(n, average=None)),
    ):
        cols[name] = [round(v, 4) for v in metric(y_pred, y_true).tolist()]
    cols["support"] = torch.bincount(y_true, minlength=n).tolist()
    return cols


def table_csv(table: dict) -> str:
    keys = list(table)
    rows = [",".join(keys)] + [
        ",".join(str(table[k][i]) for k in keys) for i in range(len(table[keys[0]]))
    ]
    return "\n".join(rows) + "\n"


def matrix_csv(classes: list[str], matrix: torch.Tensor) -> str:
    """Confusion matrix as CSV: a row per true class, a column per predicted class."""
    rows = [",".join(["true\\pred", *classes])]
    rows += [",".join([c, *map(str, r)]) for c, r in zip(classes, matrix.tolist(), strict=True)]
    return "\n".join(rows) + "\n"


def confusion_figure(classes: list[str], y_true: torch.Tensor, y_pred: torch.Tensor):
    import matplotlib

    matplotlib.use("Agg")
    cm = MulticlassConfusionMatrix(len(classes))
    cm.update(y_pred, y_true)
    fig, ax = cm.plot(labels=classes)
    fig.set_size_inches(1.0 + 0.6 * len(classes), 1.0 + 0.55 * len(classes))
    ax.set_title("validation confusion matrix (rows: true, columns: predicted)")
    ax.tick_params(axis="x", labelrotation=60)
    return fig, cm.compute()


def learning_curves_figure(history: list[dict[str, float]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    epochs = [h["epoch"] for h in history]
    for stage in ("train", "val"):
        for ax, metric in ((loss_ax, "loss"), (acc_ax, "acc")):
            key = f"{stage}_{metric}"
            pts = [(e, h[key]) for e, h in zip(epochs, history, strict=True) if key in h]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=stage)
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def close(fig) -> None:
    """pyplot keeps every figure alive until closed: a long sweep would pile them up."""
    import matplotlib.pyplot as plt

    plt.close(fig)


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on n images (sound near 0 and 1)."""
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(int(correct), int(n)).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def log_evaluation(
    run_id: str,
    classes: list[str],
    y_true: torch.Tensor,
    probs: torch.Tensor,
    final: dict[str, float],
    step: int,
) -> dict[str, float]:
    """What came out, the same for CNN and baseline: final metrics (best_val_*), the per-class
    table and the confusion matrix of the selected model on the whole validation set."""
    import mlflow

    from equip.track import record as tracking

    y_pred = probs.argmax(1)
    table = per_class_table(classes, y_true, y_pred)
    correct = int((y_true == y_pred).sum())
    low, high = wilson_interval(correct, len(y_true))
    final = {
        "best_val_acc": correct / max(len(y_true), 1),
        "best_val_acc_ci_low": low,
        "best_val_acc_ci_high": high,
        "val_images": float(len(y_true)),
        "best_val_macro_f1": float(np.mean(table["f1"])),
        "best_val_loss": float(torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), y_true)),
        **final,
    }
    tracking.log_metrics(run_id, final, step=step)
    log_table(table, "eval/per_class_metrics.json")
    mlflow.log_text(table_csv(table), "eval/per_class_metrics.csv")
    fig, matrix = confusion_figure(classes, y_true, y_pred)
    mlflow.log_figure(fig, "eval/confusion_matrix.png")
    close(fig)
    mlflow.log_text(matrix_csv(classes, matrix), "eval/confusion_matrix.csv")
    return final


def log_table(table: dict, path: str) -> None:
    """What mlflow.log_table writes (the JSON file and the tag that shows it in the MLflow UI),
    without its first step: listing the folder through runs:/, which makes MLflow 3 search the
    run's logged models, an API an Azure ML workspace does not have (it answers 404)."""
    import json

    import mlflow
    import pandas as pd

    mlflow.log_text(pd.DataFrame(table).to_json(orient="split", index=False), path)
    mlflow.set_tag("mlflow.loggedArtifacts", json.dumps([{"path": path, "type": "table"}]))
