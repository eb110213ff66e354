"""The discovery report: one Markdown file with metrics, K, cluster tables, matched
confusion matrices, an embedding map and per-cluster galleries, written with its
PNGs to a local or ``s3://`` folder through ``ncd.data.io``.

Prediction tables consumed (extra columns are ignored):

- image predictions: ``image_id`` (str), ``category`` (str), ``cluster`` (int, ``-1`` =
  unknown, null read as unknown), ``probability`` (float); optional ``gt_type`` (str, empty
  = not labelled), ``top3`` (list<int>, best first; its first entry names the cluster a
  rejected sample would have taken), ``top3_prob`` (list<float>).
- region predictions: ``region_id`` (str), ``category``, ``cluster``, ``probability``;
  optional ``image_id``, ``gt_type``, ``top3``, ``top3_prob``, ``area``.
- regions: the region table (``ncd.preprocess.regions.REGION_SCHEMA``); ``region_id``,
  ``crop_png`` and ``mask_png`` are read for the galleries, matched by ``region_id`` (from
  the table's source for a light table without crops, ``ncd.data.region_refs``).
"""
from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from ncd.config import S3Config
from ncd.data import io
from ncd.data.io import DataError
from ncd.evaluate.predictions import METRIC_NAMES, evaluate_predictions
from ncd.evaluate.plots import (
    UNKNOWN,
    MatchedConfusion,
    cluster_gallery,
    cluster_name,
    matched_confusion,
    plot_confusion,
    plot_embedding,
    plot_k_scores,
)
from ncd.data.region_refs import full_rows, is_light
from ncd.preprocess.regions import decode_region

log = logging.getLogger(__name__)

REPORT_NAME = "report.md"
PLOTS_DIR = "plots"
IMAGE_REQUIRED = ("image_id", "category", "cluster", "probability")
REGION_REQUIRED = ("region_id", "category", "cluster", "probability")
OPTIONAL_COLUMNS = ("gt_type", "top3", "top3_prob", "image_id", "area")
LEVELS = ("image", "region")
MAX_COMPOSITION = 4  # true types listed per cluster in the cluster table
NA = "—"
FEW_MARK = "\\*"  # a Markdown asterisk: the category has fewer samples than K


@dataclass(frozen=True)
class LevelData:
    """One prediction level (images or regions) of one category, as arrays (N,)."""

    ids: list[str]
    cluster: np.ndarray  # int64, UNKNOWN for rejected
    probability: np.ndarray  # float64
    truth: list[str] | None  # "" = not labelled; None when no row is labelled
    top1: np.ndarray | None  # int64 best cluster before rejection, None without ``top3``

    def __len__(self) -> int:
        return len(self.ids)

    def labelled(self) -> tuple[list[str], np.ndarray]:
        """(truth, cluster) of the labelled rows."""
        if self.truth is None:
            return [], np.zeros(0, np.int64)
        keep = [i for i, t in enumerate(self.truth) if t]
        return [self.truth[i] for i in keep], self.cluster[keep]


def _check_columns(table: pa.Table, required: Sequence[str], what: str) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(f"{what} table lacks column(s) {', '.join(missing)}; columns: {', '.join(table.column_names)}")


def level_data(table: pa.Table, id_column: str, rows: np.ndarray | None = None) -> LevelData:
    """``LevelData`` of a prediction table (optionally of the given row indices only)."""
    if rows is not None:
        table = table.take(pa.array(rows, pa.int64()))
    cluster = np.asarray([UNKNOWN if c is None else int(c) for c in table.column("cluster").to_pylist()], np.int64)
    prob = np.asarray([np.nan if p is None else float(p) for p in table.column("probability").to_pylist()])
    truth = None
    if "gt_type" in table.column_names:
        truth = [t or "" for t in table.column("gt_type").to_pylist()]
        if not any(truth):
            truth = None
    top1 = None
    if "top3" in table.column_names:
        top1 = np.asarray([int(t[0]) if t else UNKNOWN for t in table.column("top3").to_pylist()], np.int64)
    return LevelData([str(x) for x in table.column(id_column).to_pylist()], cluster, prob, truth, top1)


# --------------------------------------------------------------------------- Markdown pieces


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _fmt(value: Any) -> str:
    return NA if value is None or (isinstance(value, float) and np.isnan(value)) else f"{float(value):.3f}"


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """Markdown table: one row per category with its sample counts (``*``: fewer samples
    than K), the mean over categories and the sample-weighted mean; NMI/ARI/F1 per level
    present."""
    levels = [lv for lv in LEVELS if metrics.get(lv)]
    if not levels:
        return ""
    cats: list[Any] = []
    for lv in levels:
        cats += [c for c in metrics[lv]["per_category"] if c not in cats]
    counted = [lv for lv in levels if "samples" in metrics[lv]]
    head = (["category"] + [f"{lv}s" for lv in counted]
            + [f"{lv} {m.upper() if m != 'f1' else 'F1'}" for lv in levels for m in METRIC_NAMES])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    few = {c for lv in levels for c in metrics[lv].get("few_samples", ())}
    for c in cats:
        counts = [str(metrics[lv]["samples"].get(c, NA)) for lv in counted]
        vals = [_fmt(metrics[lv]["per_category"].get(c, {}).get(m)) for lv in levels for m in METRIC_NAMES]
        lines.append(f"| {_md(c)}{FEW_MARK if c in few else ''} | " + " | ".join(counts + vals) + " |")
    for name, key in (("mean", "mean"), ("weighted mean", "weighted_mean")):
        if all(key in metrics[lv] for lv in levels):
            vals = [f"**{_fmt(metrics[lv][key].get(m))}**" for lv in levels for m in METRIC_NAMES]
            lines.append(f"| **{name}** | " + " | ".join([""] * len(counted) + vals) + " |")
    if few:
        lines += ["", f"{FEW_MARK} fewer samples than K: this category's scores say little "
                  "(one sample always scores NMI 1)."]
    return "\n".join(lines) + "\n"


def cluster_summary(data: LevelData) -> list[dict[str, Any]]:
    """One row per cluster (ids ascending, unknown last).

    Keys: ``cluster``, ``size``, ``mean_probability``, ``rejected`` (samples whose best
    cluster was this one but were rejected as unknown; None without ``top3``) and, with
    labels, ``matched`` (Hungarian-matched true type or None), ``in_matched`` (the
    matched confusion cell), ``purity`` (in_matched / labelled size) and ``composition``
    ({true type: count} of its labelled samples, largest first).
    """
    ids = sorted(set(data.cluster.tolist()), key=lambda k: (k == UNKNOWN, k))
    mc: MatchedConfusion | None = None
    truth, pred = data.labelled()
    if truth:
        mc = matched_confusion(truth, pred)
    out = []
    for k in ids:
        sel = data.cluster == k
        probs = data.probability[sel]
        row: dict[str, Any] = {
            "cluster": k,
            "size": int(sel.sum()),
            "mean_probability": float(np.nanmean(probs)) if np.isfinite(probs).any() else None,
            "rejected": None,
        }
        if data.top1 is not None and k != UNKNOWN:
            row["rejected"] = int(np.sum((data.cluster == UNKNOWN) & (data.top1 == k)))
        if mc is not None:
            row.update(matched=None, in_matched=None, purity=None, composition={})
            if k in mc.clusters:
                j = mc.clusters.index(k)
                col = mc.matrix[:, j]
                comp = {mc.true_labels[i]: int(col[i]) for i in np.argsort(-col, kind="stable") if col[i]}
                row["composition"] = comp
                t = mc.matched.get(k)
                if t is not None:
                    row["matched"] = t
                    row["in_matched"] = int(col[mc.true_labels.index(t)])
                    row["purity"] = row["in_matched"] / max(int(col.sum()), 1)
        out.append(row)
    return out


def cluster_table(rows: Sequence[Mapping[str, Any]], unit: str) -> str:
    """Markdown table of ``cluster_summary`` rows; ``unit`` names what is counted."""
    labelled = any("matched" in r for r in rows)
    head = ["cluster", unit]
    if labelled:
        head += ["matched true type", "of the matched type", "purity", "true types in the cluster"]
    head += ["mean probability", "rejected as unknown"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [cluster_name(r["cluster"]), str(r["size"])]
        if labelled:
            comp = list(r.get("composition", {}).items())
            text = ", ".join(f"{_md(t)} {n}" for t, n in comp[:MAX_COMPOSITION])
            if len(comp) > MAX_COMPOSITION:
                text += f", +{len(comp) - MAX_COMPOSITION} more"
            cells += [_md(r["matched"]) if r.get("matched") is not None else NA,
                      str(r["in_matched"]) if r.get("in_matched") is not None else NA,
                      f"{r['purity']:.0%}" if r.get("purity") is not None else NA, text or NA]
        rej = r["rejected"]
        share = f"{rej} ({rej / (rej + r['size']):.0%})" if rej else ("0" if rej == 0 else NA)
        cells += [_fmt(r["mean_probability"]), share]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _k_entries(k_info: Mapping[str, Any], categories: Sequence[str]) -> dict[str, Mapping[str, Any]]:
    if "per_category" in k_info:
        return {str(c): v for c, v in k_info["per_category"].items()}
    return {categories[0] if len(categories) == 1 else "all categories": k_info}


def k_section(k_info: Mapping[str, Any] | None, found: Mapping[str, int], true_k: Mapping[str, int | None]
              ) -> tuple[str, dict[str, Mapping[int, float]], dict[str, int | None], dict[str, int | None], str]:
    """Markdown of the K table (+ scores per K) and the series for ``plot_k_scores``.

    ``k_info``: ``{"k", "source", "k_estimated", "k_true", "criterion", "scores": {K: score}}``,
    all optional, or ``{"per_category": {category: that}}``; ``source`` "oracle" marks a K
    taken from the ground truth. ``found``: clusters used per
    category; ``true_k``: distinct labelled types per category (None without labels).
    """
    entries = _k_entries(k_info, list(found)) if k_info else {}
    names = list(found) + [c for c in entries if c not in found]
    head = ["category", "clusters used", "chosen K", "estimated K", "true K", "criterion"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    chosen: dict[str, int | None] = {}
    truths: dict[str, int | None] = {}
    scores: dict[str, Mapping[int, float]] = {}
    criterion = "score"

    def cell(v: Any) -> str:
        return NA if v is None else _md(v)

    for c in names:
        e = entries.get(c, {})
        t = e.get("k_true", true_k.get(c))
        chosen[c], truths[c] = e.get("k"), t
        if e.get("scores"):
            scores[c] = {int(k): float(v) for k, v in e["scores"].items()}
            criterion = str(e.get("criterion", criterion))
        k = e.get("k")
        shown = f"{cell(k)} (oracle: gt type count)" if e.get("source") == "oracle" else cell(k)
        lines.append(f"| {_md(c)} | {cell(found.get(c))} | {shown} | {cell(e.get('k_estimated'))} | "
                     f"{cell(t)} | {cell(e.get('criterion'))} |")
    md = "\n".join(lines) + "\n"
    if scores:
        ks = sorted({k for s in scores.values() for k in s})
        series = list(scores)
        sl = ["| K | " + " | ".join(_md(s) for s in series) + " |", "|" + " --- |" * (len(series) + 1)]
        for k in ks:
            sl.append(f"| {k} | " + " | ".join(_fmt(scores[s].get(k)) for s in series) + " |")
        md += f"\n{criterion} per K:\n\n" + "\n".join(sl) + "\n"
    return md, scores, chosen, truths, criterion


HOW_TO_READ = """\
**How to read this.** Every defect region found in the anomaly maps was assigned to a
cluster, a discovered defect type named `c<id>`; an image takes the label of its regions,
and `unknown` marks samples whose best probability fell below the rejection threshold
("rejected as unknown" counts them under the cluster they would otherwise have joined).
Cluster ids are arbitrary. When ground-truth types are known, each cluster is matched
one-to-one to a true type by the Hungarian algorithm (`c2 -> scratch`), and NMI, ARI and
F1 (accuracy after that matching) are computed per category, then averaged with equal
weight; 1.0 is perfect. In a confusion matrix a good result keeps its counts in the
outlined matched cells: a row spread over several columns is a type split into several
clusters, a column spread over several rows is a cluster that mixes types. In the
embedding map each point is a region placed by t-SNE (PCA for large sets) of its
features; compact, separated groups in the cluster panel mean confident clusters, and
the same groups in the true-type panel mean the clusters follow the real types. The
galleries show each cluster's most confident regions with the detected area outlined in
magenta; a coherent cluster shows one kind of defect.
"""


# --------------------------------------------------------------------------- the report


def _ordered_categories(*tables: pa.Table) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for t in tables:
        for c in t.column("category").to_pylist():
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out


def _rows_of(table: pa.Table, category: str) -> np.ndarray:
    return np.flatnonzero(np.asarray([c == category for c in table.column("category").to_pylist()], bool))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _image(alt: str, rel: str) -> str:
    """A Markdown image; the link is URL-quoted, so a percent-encoded folder name
    (``io.safe_name``) links to the file of that literal name."""
    return f"![{_md(alt)}]({urllib.parse.quote(rel)})"


def _galleries(cat: str, data: LevelData, summary: list[dict[str, Any]], regions: pa.Table,
               index: Mapping[str, int], plot_dir: str, max_items: int, thumb: int,
               files: dict[str, bytes], s3: S3Config | None = None) -> list[str]:
    md = []
    for row in summary:
        k = row["cluster"]
        members = np.flatnonzero(data.cluster == k)
        probs = np.nan_to_num(data.probability[members], nan=-1.0)
        top = members[np.argsort(-probs, kind="stable")[:max_items]]
        picked = full_rows(regions.take(pa.array([index[data.ids[i]] for i in top], pa.int64())), s3)
        decoded = [decode_region(r) for r in picked.select(["region_id", "crop_png", "mask_png"]).to_pylist()]
        captions = [data.truth[i] or NA for i in top] if data.truth is not None else None
        matched = row.get("matched")
        name = cluster_name(k) + (f" -> {matched}" if matched is not None else "")
        title = f"{cat}: {name} ({_count(row['size'], 'region')})"
        rel = f"{plot_dir}/gallery_{'unknown' if k == UNKNOWN else f'cluster{k}'}.png"
        files[rel] = cluster_gallery([d[0] for d in decoded], [d[1] for d in decoded], k, title,
                                     max_items=max_items, thumb=thumb,
                                     probabilities=[float(data.probability[i]) for i in top],
                                     captions=captions, total=row["size"])
        md += [f"#### {_md(name)}", "", _image(f"gallery {name}", rel), ""]
    return md


def write_report(out_uri: str, *, image_predictions: pa.Table, region_predictions: pa.Table, regions: pa.Table,
                 features: np.ndarray | None = None, metrics: Mapping[str, Any] | None = None,
                 k_info: Mapping[str, Any] | None = None, title: str = "ncd discovery report",
                 s3: S3Config | None = None, gallery_items: int = 24, thumb: int = 128, seed: int = 0,
                 notes: Sequence[str] = ()) -> str:
    """Write ``report.md`` and its PNGs under ``out_uri``; returns the report's URI.

    Tables as in the module docstring; ``features`` (N_regions, D) aligned with the rows
    of ``region_predictions`` (None: no embedding map). ``metrics``: ``{"image": r,
    "region": r}`` with ``r`` an ``ncd.evaluate.metrics.per_category_metrics`` result (either may
    be absent); None computes them from ``gt_type`` when labels exist. ``k_info``: see
    ``k_section``. Files, per category under ``plots/<category>/`` when there are
    several categories, else under ``plots/``: ``confusion_image.png`` and
    ``confusion_region.png`` (labelled data only), ``embedding.png`` (with features),
    ``gallery_cluster<k>.png`` / ``gallery_unknown.png`` per region cluster; plus
    ``plots/k_scores.png`` when ``k_info`` gives scores per K. ``notes``: findings about
    the input (``ncd.preprocess.input_checks.input_notes``), listed under "Input checks".
    """
    _check_columns(image_predictions, IMAGE_REQUIRED, "image predictions")
    _check_columns(region_predictions, REGION_REQUIRED, "region predictions")
    _check_columns(regions, ("region_id",) if is_light(regions) else ("region_id", "crop_png", "mask_png"), "regions")
    if features is not None:
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[0] != region_predictions.num_rows:
            raise ValueError(f"features {features.shape} are not aligned with the "
                             f"{region_predictions.num_rows} region predictions")
    index = {rid: i for i, rid in enumerate(regions.column("region_id").to_pylist())}
    missing = [r for r in region_predictions.column("region_id").to_pylist() if r not in index]
    if missing:
        raise DataError(f"region {missing[0]!r} of the region predictions is not in the region table "
                        f"({len(missing)} missing)")

    categories = _ordered_categories(region_predictions, image_predictions)
    per_cat = {c: (level_data(image_predictions, "image_id", _rows_of(image_predictions, c)),
                   level_data(region_predictions, "region_id", _rows_of(region_predictions, c)))
               for c in categories}
    if metrics is None:
        metrics = {}
        for lv, table in (("image", image_predictions), ("region", region_predictions)):
            try:
                metrics[lv] = evaluate_predictions(table)
            except DataError:
                pass  # no ground truth at this level
    labelled = any(d.truth is not None for pair in per_cat.values() for d in pair)

    files: dict[str, bytes] = {}
    n_unknown = int(sum(np.sum(img.cluster == UNKNOWN) for img, _ in per_cat.values()))
    md = [f"# {_md(title)}", "",
          f"{_count(image_predictions.num_rows, 'image')} and {_count(region_predictions.num_rows, 'defect region')}"
          f" in {len(categories)} categor{'y' if len(categories) == 1 else 'ies'}; "
          f"images labelled unknown: {n_unknown}; ground-truth types "
          f"{'known' if labelled else 'not given, so no metrics or confusion matrices'}.", "",
          HOW_TO_READ]
    if notes:
        md += ["## Input checks", "", *[f"- {_md(n)}" for n in notes], ""]

    table = metrics_table(metrics) if metrics else ""
    if table:
        md += ["## Metrics", "", "Per category (each matched on its own), their unweighted mean and their mean "
               "weighted by samples.", "", table]

    found = {c: len(set(np.concatenate([img.cluster, reg.cluster]).tolist()) - {UNKNOWN})
             for c, (img, reg) in per_cat.items()}
    true_k = {}
    for c, (img, reg) in per_cat.items():
        types = set(img.labelled()[0]) | set(reg.labelled()[0])
        true_k[c] = len(types) if types else None
    k_md, scores, chosen, truths, criterion = k_section(k_info, found, true_k)
    md += ["## Number of classes (K)", "", k_md]
    if scores:
        files[f"{PLOTS_DIR}/k_scores.png"] = plot_k_scores(scores, chosen, truths, f"K selection: {criterion}",
                                                           ylabel=criterion)
        md += [_image("K selection scores", f"{PLOTS_DIR}/k_scores.png"), ""]

    multi = len(categories) > 1
    for cat, (img, reg) in per_cat.items():
        plot_dir = f"{PLOTS_DIR}/{io.safe_name(cat)}" if multi else PLOTS_DIR
        h = "###" if multi else "##"
        if multi:
            md += [f"## {_md(cat)}", ""]
        conf = []
        for lv, data in (("image", img), ("region", reg)):
            truth, pred = data.labelled()
            if truth:
                rel = f"{plot_dir}/confusion_{lv}.png"
                files[rel] = plot_confusion(truth, pred, f"{cat}: {lv}s, true type vs cluster")
                conf.append(_image(f"confusion matrix, {lv}s", rel))
        if conf:
            md += [f"{h} Confusion matrices", "", *conf, ""]
        if features is not None and len(reg):
            rows = _rows_of(region_predictions, cat)
            rel = f"{plot_dir}/embedding.png"
            files[rel] = plot_embedding(features[rows], reg.cluster, reg.truth, f"{cat}: region embedding", seed=seed)
            md += [f"{h} Embedding map", "", _image("embedding map", rel), ""]
        md += [f"{h} Clusters", ""]
        for lv, data, unit in (("image", img, "images"), ("region", reg, "regions")):
            if len(data):
                md += [f"{lv.capitalize()} level:", "", cluster_table(cluster_summary(data), unit)]
        reg_summary = cluster_summary(reg)
        if reg_summary:
            md += [f"{h} Cluster galleries", "",
                   f"The {gallery_items} most confident regions of each cluster; captions give the true "
                   f"type when known and the probability.", ""]
            md += _galleries(cat, reg, reg_summary, regions, index, plot_dir, gallery_items, thumb, files, s3)

    for rel, data in files.items():
        io.write_bytes(io.join(out_uri, rel), data, s3)
    report_uri = io.join(out_uri, REPORT_NAME)
    io.write_bytes(report_uri, "\n".join(md).encode("utf-8"), s3)
    log.info("report: %s (%d plots)", report_uri, len(files))
    return report_uri
