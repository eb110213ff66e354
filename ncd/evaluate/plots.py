"""Report figures as PNG bytes: matched confusion matrix, 2-D embedding map, cluster
galleries and the K-selection curve.

Matplotlib is used through its object-oriented API on an Agg canvas (no pyplot, so
importing ncd never changes a user's backend). Galleries are composed with OpenCV so
every thumbnail keeps its exact pixels, mask outline included.
"""
from __future__ import annotations

import io as _io
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ncd.data.io import encode_png
from ncd.evaluate.metrics import confusion_matrix_matched, hungarian_mapping

UNKNOWN = -1  # cluster id of a sample rejected as "unknown"
UNKNOWN_LABEL = "unknown"
NO_LABEL = "(no label)"  # truth panel legend entry for samples without a gt type
DPI = 100
TSNE_MAX_POINTS = 3000  # above: plain PCA to 2-D (t-SNE is quadratic-ish and slow on CPU)
TSNE_MIN_POINTS = 5  # below: PCA, t-SNE needs a few neighbours
PCA_DIMS = 50  # PCA before t-SNE, as is customary
TSNE_PERPLEXITY = 30.0
TSNE_SERIAL_BELOW = 1000  # t-SNE runs on one thread below this many points: OpenMP start-up
#                           and oversubscription on a busy machine cost seconds for a few points
MAX_LEGEND = 24  # legend entries shown; the rest are summarised
OUTLINE_RGB = (255, 0, 255)  # gallery mask outline: magenta, rare in industrial images
GALLERY_BG = (255, 255, 255)
LETTERBOX_RGB = (64, 64, 64)
GALLERY_PAD = 6
FONT = cv2.FONT_HERSHEY_SIMPLEX
TITLE_SCALE, SUB_SCALE, CAPTION_SCALE = 0.6, 0.45, 0.38
MATCH_EDGE = "#e6550d"  # confusion cells of a matched (type, cluster) pair


def figure_png(fig: Figure) -> bytes:
    """PNG bytes of a figure (Agg, tight bounding box)."""
    FigureCanvasAgg(fig)
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def cluster_name(cluster: int) -> str:
    return UNKNOWN_LABEL if int(cluster) == UNKNOWN else f"c{int(cluster)}"


def palette(n: int) -> list[tuple[float, float, float, float]]:
    """n distinct categorical colours (tab10, tab20, then a sampled 'turbo')."""
    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["turbo"]
    return [cmap(x) for x in np.linspace(0.05, 0.95, n)]


# --------------------------------------------------------------------------- confusion


@dataclass(frozen=True)
class MatchedConfusion:
    """Contingency of true types (rows) against clusters (columns) after Hungarian matching.

    Columns follow ``ncd.evaluate.metrics.confusion_matrix_matched`` over the samples with a
    cluster (matched clusters in row order, then unmatched ones by id), then one
    ``UNKNOWN`` column when some samples were rejected; rejected samples never take part
    in the matching, so they count as errors.
    """

    matrix: np.ndarray  # (Kt, C) int64
    true_labels: list[Any]  # (Kt,) sorted
    clusters: list[int]  # (C,) column cluster ids
    matched: dict[int, Any]  # cluster id -> matched true type, None when unmatched or unknown

    def column_label(self, j: int) -> str:
        c = self.clusters[j]
        t = self.matched.get(c)
        return cluster_name(c) if t is None else f"{cluster_name(c)} -> {t}"

    @property
    def matched_total(self) -> int:
        """Samples in a matched (type, cluster) cell: accuracy x N."""
        rows = {t: i for i, t in enumerate(self.true_labels)}
        return int(sum(self.matrix[rows[t], j] for j, c in enumerate(self.clusters)
                       if (t := self.matched.get(c)) is not None))


def matched_confusion(y_true: Sequence[Any], y_pred: Sequence[int]) -> MatchedConfusion:
    """``MatchedConfusion`` of (N,) true types and (N,) cluster ids (``UNKNOWN`` allowed)."""
    t = np.asarray(list(y_true))
    p = np.asarray(list(y_pred), dtype=np.int64).reshape(-1)
    if t.shape[0] != p.shape[0]:
        raise ValueError(f"labelings differ in length: {t.shape[0]} vs {p.shape[0]}")
    true_labels = [x.item() for x in np.unique(t)] if t.size else []
    known = p != UNKNOWN
    clusters: list[int] = []
    matched: dict[int, Any] = {}
    if known.any():
        _, _, clusters = confusion_matrix_matched(t[known], p[known])
        matched = hungarian_mapping(t[known], p[known])
    if (~known).any():
        clusters = clusters + [UNKNOWN]
        matched[UNKNOWN] = None
    row = {lab: i for i, lab in enumerate(true_labels)}
    col = {c: j for j, c in enumerate(clusters)}
    matrix = np.zeros((len(true_labels), len(clusters)), np.int64)
    if t.size:
        np.add.at(matrix, ([row[x] for x in t.tolist()], [col[int(c)] for c in p]), 1)
    return MatchedConfusion(matrix, true_labels, clusters, matched)


def plot_confusion(y_true: Sequence[Any], y_pred: Sequence[int], title: str) -> bytes:
    """PNG of the matched confusion matrix (see ``MatchedConfusion``).

    Rows: true types with their counts; columns: ``c<id> -> <type>`` for matched
    clusters, ``c<id>`` for unmatched ones, ``unknown`` for rejected samples. Cells show
    counts; colour is the share of the row, matched cells are outlined.
    """
    mc = matched_confusion(y_true, y_pred)
    kt, kc = mc.matrix.shape
    n = int(mc.matrix.sum())
    col_labels = [mc.column_label(j) for j in range(kc)]
    row_sums = mc.matrix.sum(axis=1, keepdims=True)
    share = mc.matrix / np.maximum(row_sums, 1)
    longest_row = max((len(str(x)) for x in mc.true_labels), default=4)
    fig = Figure(figsize=(max(5.0, 2.2 + 0.8 * kc + 0.07 * longest_row), max(3.8, 1.9 + 0.5 * kt)))
    ax = fig.add_subplot()
    if n == 0:
        ax.text(0.5, 0.5, "no samples with a ground-truth type", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title(title)
        return figure_png(fig)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    size = 10 if max(kt, kc) <= 8 else (8 if max(kt, kc) <= 14 else 6)
    for i in range(kt):
        for j in range(kc):
            v = int(mc.matrix[i, j])
            colour = "white" if share[i, j] > 0.55 else ("black" if v else "#b0b0b0")
            ax.text(j, i, str(v), ha="center", va="center", fontsize=size, color=colour)
    rows = {lab: i for i, lab in enumerate(mc.true_labels)}
    for j, c in enumerate(mc.clusters):
        lab = mc.matched.get(c)
        if lab is not None:
            ax.add_patch(Rectangle((j - 0.5, rows[lab] - 0.5), 1, 1, fill=False, edgecolor=MATCH_EDGE, lw=2))
    ax.set_xticks(range(kc), col_labels, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(kt), [f"{lab} ({int(row_sums[i, 0])})" for i, lab in enumerate(mc.true_labels)])
    ax.set_xlabel("predicted cluster -> matched true type")
    ax.set_ylabel("true type (count)")
    acc = mc.matched_total / n
    note = ", unknown counts as an error" if UNKNOWN in mc.clusters else ""
    ax.set_title(f"{title}\nN={n}, matched accuracy {acc:.3f}{note}", fontsize=11)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("share of the true type's samples")
    return figure_png(fig)


# --------------------------------------------------------------------------- embedding


def embed_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, 2) map of (N, D) features and the method's name.

    PCA to ``PCA_DIMS`` then t-SNE when ``TSNE_MIN_POINTS <= N <= TSNE_MAX_POINTS``,
    else PCA to 2-D; seeded. Constant features map to the origin.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    n, d = x.shape
    x = x - x.mean(axis=0, keepdims=True) if n else x
    if n == 0 or d == 0 or not np.any(np.abs(x) > 1e-12):
        return np.zeros((n, 2)), "constant"
    if TSNE_MIN_POINTS <= n <= TSNE_MAX_POINTS:
        k = min(PCA_DIMS, n, d)
        if d > k:
            x = PCA(n_components=k, random_state=seed).fit_transform(x)
        tsne = TSNE(n_components=2, perplexity=min(TSNE_PERPLEXITY, (n - 1) / 3.0),
                    init="pca" if x.shape[1] >= 2 else "random", random_state=seed)
        with threadpool_limits(1 if n < TSNE_SERIAL_BELOW else None):
            return tsne.fit_transform(x), "t-SNE"
    k = min(2, n, d)
    y = PCA(n_components=k, random_state=seed).fit_transform(x)
    return np.pad(y, ((0, 0), (0, 2 - k))), "PCA"


def _scatter_panel(ax: Any, xy: np.ndarray, labels: list[str], order: list[str], colours: dict[str, Any],
                   title: str, legend_title: str) -> None:
    n = xy.shape[0]
    size = float(np.clip(4000.0 / max(n, 1), 6.0, 50.0))
    lab = np.asarray(labels, dtype=object)
    for name in order:
        sel = lab == name
        if not sel.any():
            continue
        grey = name in (UNKNOWN_LABEL, NO_LABEL)
        style = dict(marker="x", linewidths=1.0) if grey else dict(marker="o", linewidths=0.3, edgecolors="white")
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=colours[name], alpha=0.85,
                   label=f"{name} ({int(sel.sum())})", **style)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    handles, names = ax.get_legend_handles_labels()
    if len(handles) > MAX_LEGEND:
        handles = handles[:MAX_LEGEND]
        names = names[:MAX_LEGEND - 1] + [f"... {len(order) - MAX_LEGEND + 1} more"]
    ax.legend(handles, names, title=legend_title, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              title_fontsize=9, markerscale=max(1.0, 30.0 / size) ** 0.5, frameon=False,
              ncol=1 if len(handles) <= 16 else 2)


def _colours(truth_order: list[str], cluster_ids: list[int], matched: Mapping[int, Any]
             ) -> tuple[dict[str, Any], dict[int, Any]]:
    """Colours per true type and per cluster; a matched cluster takes its type's colour,
    unmatched clusters the next ones, unknown and unlabelled samples greys."""
    extra = [k for k in cluster_ids if k != UNKNOWN and matched.get(k) not in truth_order]
    colours = palette(len(truth_order) + len(extra))
    by_type: dict[str, Any] = dict(zip(truth_order, colours))
    by_type[NO_LABEL] = (0.7, 0.7, 0.7, 1.0)
    by_cluster: dict[int, Any] = dict(zip(extra, colours[len(truth_order):]))
    for k in cluster_ids:
        if k == UNKNOWN:
            by_cluster[k] = (0.45, 0.45, 0.45, 1.0)
        elif k not in by_cluster:
            by_cluster[k] = by_type[matched[k]]
    return by_type, by_cluster


def plot_embedding(features: np.ndarray, clusters: Sequence[int], truth: Sequence[str] | None, title: str,
                   seed: int = 0) -> bytes:
    """PNG of a 2-D map of (N, D) features (``embed_2d``), coloured by (N,) cluster id
    and, when ``truth`` (N,) is given, beside it by true type (empty = no label).

    With truth, clusters are Hungarian-matched to types over the labelled samples: legend
    entries read ``c<id> -> <type>`` and a matched cluster has its type's colour.
    """
    c = np.asarray(list(clusters), dtype=np.int64).reshape(-1)
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] != c.shape[0]:
        raise ValueError(f"features {x.shape} and clusters ({c.shape[0]},) are not aligned")
    if truth is not None and len(truth) != c.shape[0]:
        raise ValueError(f"truth has {len(truth)} entries for {c.shape[0]} points")
    xy, method = embed_2d(x, seed)
    matched: dict[int, Any] = {}
    truth_labels: list[str] = []
    truth_order: list[str] = []
    if truth is not None:
        truth_labels = [str(t) if t else NO_LABEL for t in truth]
        truth_order = sorted(set(truth_labels) - {NO_LABEL})
        has = np.asarray([t != NO_LABEL for t in truth_labels], dtype=bool)
        if has.any():
            matched = matched_confusion([t for t in truth_labels if t != NO_LABEL], c[has]).matched
    ids = sorted(set(c.tolist()), key=lambda k: (k == UNKNOWN, k))
    by_type, by_cluster = _colours(truth_order, ids, matched)

    def name(k: int) -> str:
        t = matched.get(k)
        return cluster_name(k) if t is None else f"{cluster_name(k)} -> {t}"

    names = {k: name(k) for k in ids}
    panels = 1 if truth is None else 2
    fig = Figure(figsize=(6.6 * panels, 5.4))
    _scatter_panel(fig.add_subplot(1, panels, 1), xy, [names[k] for k in c.tolist()], [names[k] for k in ids],
                   {names[k]: by_cluster[k] for k in ids}, "coloured by predicted cluster", "cluster (count)")
    if truth is not None:
        order = truth_order + ([NO_LABEL] if NO_LABEL in truth_labels else [])
        _scatter_panel(fig.add_subplot(1, panels, 2), xy, truth_labels, order, by_type,
                       "coloured by true type", "true type (count)")
    fig.suptitle(f"{title}\n{method} of {c.shape[0]} region features", fontsize=12)
    fig.tight_layout()
    return figure_png(fig)


# --------------------------------------------------------------------------- galleries


def _letterbox(image: np.ndarray, side: int, interpolation: int, fill: tuple[int, ...] | int) -> np.ndarray:
    """Resize to fit a side x side square (aspect kept), centred on ``fill``."""
    h, w = image.shape[:2]
    scale = side / max(h, w, 1)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(image, (nw, nh), interpolation=interpolation)
    out = np.empty((side, side) + image.shape[2:], image.dtype)
    out[...] = fill
    y0, x0 = (side - nh) // 2, (side - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw] = small
    return out


def outlined_thumbnail(crop: np.ndarray, mask: np.ndarray | None, side: int,
                       colour: tuple[int, int, int] = OUTLINE_RGB) -> np.ndarray:
    """(side, side, 3) RGB thumbnail of a crop with its mask's outer contours drawn."""
    rgb = np.asarray(crop, dtype=np.uint8)
    if rgb.ndim == 2:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_GRAY2RGB)
    upscale = side > max(rgb.shape[:2])
    thumb = np.ascontiguousarray(_letterbox(rgb, side, cv2.INTER_CUBIC if upscale else cv2.INTER_AREA,
                                            LETTERBOX_RGB))
    if mask is None:
        return thumb
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    if m.shape[:2] != rgb.shape[:2]:
        m = cv2.resize(m.astype(np.uint8), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
    m = _letterbox((m > 0).astype(np.uint8), side, cv2.INTER_NEAREST, 0)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if contours:
        cv2.drawContours(thumb, contours, -1, colour, thickness=1 if side < 128 else 2)
    return thumb


def _text_width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, FONT, scale, 1)[0][0]


def _fit_text(text: str, width: int, scale: float) -> str:
    if _text_width(text, scale) <= width:
        return text
    while text and _text_width(text + "..", scale) > width:
        text = text[:-1]
    return text + ".."


def _put(canvas: np.ndarray, text: str, x: int, y: int, scale: float, colour=(20, 20, 20), bold: bool = False) -> None:
    cv2.putText(canvas, text, (x, y), FONT, scale, colour, 2 if bold else 1, cv2.LINE_AA)


def gallery_image(crops: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], cluster_id: int, title: str,
                  max_items: int = 24, thumb: int = 96, probabilities: Sequence[float] | None = None,
                  captions: Sequence[str] | None = None, total: int | None = None, columns: int = 6) -> np.ndarray:
    """The gallery of ``cluster_gallery`` as an RGB (H, W, 3) uint8 array."""
    n = len(crops)
    if len(masks) != n:
        raise ValueError(f"{n} crops but {len(masks)} masks")
    for name, seq in (("probabilities", probabilities), ("captions", captions)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} crops")
    if thumb < 16 or max_items < 1 or columns < 1:
        raise ValueError(f"need thumb >= 16, max_items >= 1 and columns >= 1 (got {thumb}, {max_items}, {columns})")
    order = list(range(n))
    if probabilities is not None:
        order = [int(i) for i in np.argsort(-np.asarray(probabilities, dtype=np.float64), kind="stable")]
    order = order[:max_items]
    shown = len(order)
    lines = (1 if captions is not None else 0) + (1 if probabilities is not None else 0)
    line_h = max(12, round(thumb * 0.15))
    cell_w, cell_h = thumb + GALLERY_PAD, thumb + GALLERY_PAD + lines * line_h
    cols = max(1, min(columns, shown))
    rows = max(1, math.ceil(shown / cols))
    total = n if total is None else int(total)
    who = UNKNOWN_LABEL if cluster_id == UNKNOWN else f"cluster {cluster_id}"
    sub = f"{who}: {shown} of {total} shown" + (", highest probability first" if probabilities is not None else "")
    sub += "; outline = detected region" if shown else ""
    header_h = 56
    width = max(cols * cell_w + GALLERY_PAD, _text_width(title, TITLE_SCALE) + 2 * GALLERY_PAD,
                _text_width(sub, SUB_SCALE) + 2 * GALLERY_PAD)
    canvas = np.empty((header_h + rows * cell_h + GALLERY_PAD, width, 3), np.uint8)
    canvas[...] = GALLERY_BG
    _put(canvas, title, GALLERY_PAD, 22, TITLE_SCALE, bold=True)
    _put(canvas, sub, GALLERY_PAD, 44, SUB_SCALE, colour=(90, 90, 90))
    if not shown:
        return canvas
    for slot, i in enumerate(order):
        r, c = divmod(slot, cols)
        x0 = GALLERY_PAD + c * cell_w
        y0 = header_h + r * cell_h
        canvas[y0:y0 + thumb, x0:x0 + thumb] = outlined_thumbnail(crops[i], masks[i], thumb)
        y = y0 + thumb + line_h - 2
        if captions is not None:
            _put(canvas, _fit_text(str(captions[i]), thumb, CAPTION_SCALE), x0, y, CAPTION_SCALE)
            y += line_h
        if probabilities is not None:
            _put(canvas, f"p={float(probabilities[i]):.2f}", x0, y, CAPTION_SCALE, colour=(70, 70, 70))
    return canvas


def cluster_gallery(crops: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], cluster_id: int, title: str,
                    max_items: int = 24, thumb: int = 96, probabilities: Sequence[float] | None = None,
                    captions: Sequence[str] | None = None, total: int | None = None, columns: int = 6) -> bytes:
    """PNG grid of one cluster's crops (RGB (h, w, 3) uint8) with their masks ((h, w)
    0/255) outlined in ``OUTLINE_RGB``.

    At most ``max_items`` thumbnails of ``thumb`` px, highest probability first when
    ``probabilities`` (one per crop) are given, else in the given order; ``captions``
    (e.g. the gt type) and probabilities are printed under each thumbnail. ``total``:
    the cluster's size when the caller passes only a subset of it.
    """
    return encode_png(gallery_image(crops, masks, cluster_id, title, max_items, thumb, probabilities, captions,
                                    total, columns))


# --------------------------------------------------------------------------- K selection


def plot_k_scores(scores: Mapping[str, Mapping[int, float]], chosen: Mapping[str, int | None],
                  true_k: Mapping[str, int | None], title: str, ylabel: str = "score") -> bytes:
    """PNG of score against K, one line per series (e.g. category); the chosen K is a
    filled marker, the true K (when known) a dashed vertical line in the same colour."""
    fig = Figure(figsize=(6.8, 4.2))
    ax = fig.add_subplot()
    colours = palette(max(1, len(scores)))
    for (name, series), colour in zip(scores.items(), colours):
        ks = sorted(int(k) for k in series)
        vals = [float(series[k]) for k in ks]
        ax.plot(ks, vals, "-o", color=colour, ms=4, label=str(name))
        k = chosen.get(name)
        if k is not None and int(k) in ks:
            ax.plot([int(k)], [vals[ks.index(int(k))]], "*", color=colour, ms=16, mec="black",
                    label=f"{name}: chosen K={int(k)}")
        t = true_k.get(name)
        if t is not None:
            ax.axvline(int(t), color=colour, ls="--", lw=1.2, label=f"{name}: true K={int(t)}")
    ax.set_xlabel("K (number of novel classes)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return figure_png(fig)
