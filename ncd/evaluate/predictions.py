"""Evaluation of a predictions table: metrics per category, their unweighted and their
sample-weighted mean, and how many rows were scored."""
from __future__ import annotations

from typing import Any, Mapping

import pyarrow as pa

from ncd.data.io import DataError
from ncd.evaluate.metrics import per_category_metrics

METRIC_NAMES = ("nmi", "ari", "f1")


def evaluate_predictions(table: pa.Table, truth_column: str = "gt_type", pred_column: str = "cluster",
                         category_column: str = "category",
                         k: int | Mapping[str, int] | None = None) -> dict[str, Any]:
    """``ncd.evaluate.metrics.per_category_metrics`` of a predictions table (``k``: see there).

    Rows with an empty truth are not scored (no ground truth known for them):
    ``num_samples`` counts the scored rows, ``num_dropped`` the others.
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
    result = per_category_metrics([cats[i] for i in keep], [truth[i] for i in keep], [pred[i] for i in keep], k)
    result["num_samples"], result["num_dropped"] = len(keep), table.num_rows - len(keep)
    return result


def scored_text(result: Mapping[str, Any]) -> str:
    """How many rows a result scored and dropped, in words."""
    dropped = result.get("num_dropped", 0)
    return (f"scored {result['num_samples']} rows" + (f"; {dropped} without ground truth not scored" if dropped else "")
            + (f"; fewer samples than K in: {', '.join(map(str, result['few_samples']))}"
               if result.get("few_samples") else ""))


def metrics_markdown(result: dict[str, Any], title: str = "Metrics") -> str:
    """A Markdown table: one row per category with its samples (``*``: fewer than K), the
    mean over categories and the sample-weighted mean; then what was scored."""
    lines = [f"### {title}", "", "| category | samples | NMI | ARI | F1 |", "| --- | --- | --- | --- | --- |"]
    few = set(result.get("few_samples", ()))
    for cat, m in result["per_category"].items():
        n = f"{result['samples'][cat]}{'*' if cat in few else ''}" if "samples" in result else ""
        lines.append(f"| {cat} | {n} | " + " | ".join(f"{m[k]:.3f}" for k in METRIC_NAMES) + " |")
    for name, key in (("mean", "mean"), ("weighted mean", "weighted_mean")):
        if key in result:
            lines.append(f"| **{name}** | | " + " | ".join(f"**{result[key][k]:.3f}**" for k in METRIC_NAMES) + " |")
    if few:
        lines += ["", "\\* fewer samples than K: the scores of such a category say little."]
    if "num_samples" in result:
        text = scored_text(result)
        lines += ["", text[0].upper() + text[1:] + "."]
    return "\n".join(lines) + "\n"
