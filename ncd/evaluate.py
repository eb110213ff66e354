"""Evaluation of a predictions table: metrics per category and their unweighted mean."""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from ncd.io import DataError
from ncd.metrics import per_category_metrics

METRIC_NAMES = ("nmi", "ari", "f1")


def evaluate_predictions(table: pa.Table, truth_column: str = "gt_type", pred_column: str = "cluster",
                         category_column: str = "category") -> dict[str, Any]:
    """NMI, ARI and Hungarian-matched F1 per category and their unweighted mean.

    Rows with an empty truth are skipped (no ground truth known for them).
    """
    for col in (truth_column, pred_column, category_column):
        if col not in table.column_names:
            raise DataError(f"predictions table lacks column {col!r}; columns: {', '.join(table.column_names)}")
    cats = table.column(category_column).to_pylist()
    truth = table.column(truth_column).to_pylist()
    pred = table.column(pred_column).to_pylist()
    keep = [i for i, t in enumerate(truth) if t not in (None, "")]
    if not keep:
        raise DataError(f"predictions table has no ground truth in column {truth_column!r}")
    result = per_category_metrics([cats[i] for i in keep], [truth[i] for i in keep], [pred[i] for i in keep])
    result["num_samples"] = len(keep)
    return result


def metrics_markdown(result: dict[str, Any], title: str = "Metrics") -> str:
    """A Markdown table: one row per category and the mean."""
    lines = [f"### {title}", "", "| category | NMI | ARI | F1 |", "| --- | --- | --- | --- |"]
    for cat, m in result["per_category"].items():
        lines.append(f"| {cat} | " + " | ".join(f"{m[k]:.3f}" for k in METRIC_NAMES) + " |")
    mean = result["mean"]
    lines.append("| **mean** | " + " | ".join(f"**{mean[k]:.3f}**" for k in METRIC_NAMES) + " |")
    return "\n".join(lines) + "\n"
