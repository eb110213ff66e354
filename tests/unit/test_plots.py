"""Report figures (ncd.evaluate.plots): matched confusion, embedding map, galleries, K curve."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

from ncd.evaluate import plots
from ncd.evaluate.metrics import confusion_matrix_matched, hungarian_mapping
from ncd.evaluate.plots import (
    OUTLINE_RGB,
    UNKNOWN,
    cluster_gallery,
    embed_2d,
    gallery_image,
    matched_confusion,
    outlined_thumbnail,
    plot_confusion,
    plot_embedding,
    plot_k_scores,
)


def decode(png: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a PNG"
    return img[..., ::-1]  # RGB


def is_outline(img: np.ndarray) -> np.ndarray:
    return np.all(img == np.asarray(OUTLINE_RGB, np.uint8), axis=-1)


# --------------------------------------------------------------------------- confusion

TRUTH = ["a"] * 5 + ["b"] * 4 + ["c"] * 3
PRED = [7, 7, 7, 7, 2] + [2, 2, 2, 9] + [9, 9, 7]


def test_matched_confusion_equals_metrics_without_unknown():
    mc = matched_confusion(TRUTH, PRED)
    matrix, labels, clusters = confusion_matrix_matched(TRUTH, PRED)
    np.testing.assert_array_equal(mc.matrix, matrix)
    assert mc.true_labels == labels and mc.clusters == clusters
    assert mc.matched == hungarian_mapping(TRUTH, PRED)
    assert mc.matched_total == np.trace(matrix) == 4 + 3 + 2
    assert [mc.column_label(j) for j in range(3)] == ["c7 -> a", "c2 -> b", "c9 -> c"]


def test_unknown_is_a_last_column_outside_the_matching():
    truth = TRUTH + ["a", "c", "d"]
    pred = PRED + [UNKNOWN, UNKNOWN, UNKNOWN]
    mc = matched_confusion(truth, pred)
    assert mc.clusters == [7, 2, 9, UNKNOWN]
    assert mc.true_labels == ["a", "b", "c", "d"]  # "d" only among the rejected samples
    np.testing.assert_array_equal(mc.matrix[:, -1], [1, 0, 1, 1])
    assert mc.matched[UNKNOWN] is None and mc.column_label(3) == "unknown"
    assert mc.matched_total == 9 and mc.matrix.sum() == len(truth)


def test_more_types_than_clusters_and_all_unknown():
    mc = matched_confusion(["a", "b", "c", "c"], [0, 0, 0, 1])
    assert mc.matrix.shape == (3, 2) and sorted(mc.clusters) == [0, 1]
    assert sum(t is not None for t in mc.matched.values()) == 2
    only = matched_confusion(["a", "b"], [UNKNOWN, UNKNOWN])
    assert only.clusters == [UNKNOWN] and only.matched_total == 0
    np.testing.assert_array_equal(only.matrix, [[1], [1]])


@pytest.mark.parametrize("truth,pred", [(TRUTH, PRED), (TRUTH + ["a"], PRED + [UNKNOWN]), ([], []),
                                        (["x"], [3])])
def test_plot_confusion_is_a_png(truth, pred):
    img = decode(plot_confusion(truth, pred, "title"))
    assert img.shape[0] >= 250 and img.shape[1] >= 300


# --------------------------------------------------------------------------- embedding


def blobs(n_per: int = 20, k: int = 3, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 8, (k, d))
    labels = np.repeat(np.arange(k), n_per)
    return centres[labels] + rng.normal(0, 1, (labels.size, d)), labels


def test_embed_2d_tsne_is_seeded_and_separates_blobs():
    x, labels = blobs()
    y, method = embed_2d(x, seed=0)
    assert method == "t-SNE" and y.shape == (60, 2) and np.all(np.isfinite(y))
    np.testing.assert_allclose(embed_2d(x, seed=0)[0], y)
    centroids = np.stack([y[labels == k].mean(0) for k in range(3)])
    spread = max(np.linalg.norm(y[labels == k] - centroids[k], axis=1).mean() for k in range(3))
    gap = min(np.linalg.norm(centroids[i] - centroids[j]) for i in range(3) for j in range(i + 1, 3))
    assert gap > 2 * spread


def test_embed_2d_uses_pca_above_the_tsne_limit(monkeypatch):
    monkeypatch.setattr(plots, "TSNE_MAX_POINTS", 10)
    x, _ = blobs()
    y, method = embed_2d(x)
    assert method == "PCA" and y.shape == (60, 2)


@pytest.mark.parametrize("shape", [(0, 8), (1, 8), (3, 8), (12, 1)])
def test_embed_2d_degenerate_sizes(shape):
    x = np.random.default_rng(0).normal(size=shape)
    y, _ = embed_2d(x)
    assert y.shape == (shape[0], 2) and np.all(np.isfinite(y))


def test_embed_2d_constant_features():
    y, method = embed_2d(np.ones((10, 4)))
    assert method == "constant" and not y.any()


def test_plot_embedding_panels_and_partial_truth():
    x, labels = blobs(n_per=8)
    clusters = labels.copy()
    clusters[:2] = UNKNOWN
    truth = [["scratch", "hole", "stain"][k] for k in labels]
    truth[3] = ""  # not labelled
    one = decode(plot_embedding(x, clusters, None, "one panel"))
    two = decode(plot_embedding(x, clusters, truth, "two panels"))
    assert one.shape[0] >= 300 and two.shape[1] > 1.6 * one.shape[1]
    with pytest.raises(ValueError):
        plot_embedding(x[:-1], clusters, None, "misaligned")


# --------------------------------------------------------------------------- galleries


def square_mask(side: int, lo: int, hi: int) -> np.ndarray:
    m = np.zeros((side, side), np.uint8)
    m[lo:hi, lo:hi] = 255
    return m


def test_outline_lies_on_the_mask_edge():
    side = 64
    crop = np.full((side, side, 3), 128, np.uint8)
    mask = square_mask(side, 20, 44)
    thumb = outlined_thumbnail(crop, mask, side)
    inside = mask > 0
    edge = inside & ~cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    np.testing.assert_array_equal(is_outline(thumb), edge)
    assert np.all(thumb[~edge] == 128)


def test_outline_follows_a_resized_mask_and_skips_empty_masks():
    crop = np.full((32, 32, 3), 90, np.uint8)
    thumb = outlined_thumbnail(crop, square_mask(16, 4, 12), 96)  # mask at half the crop's size
    ys, xs = np.nonzero(is_outline(thumb))
    assert ys.min() == xs.min() == 24 and ys.max() == xs.max() == 71  # 96/16 = 6 px per mask px
    assert not is_outline(outlined_thumbnail(crop, np.zeros((32, 32), np.uint8), 96)).any()
    assert not is_outline(outlined_thumbnail(crop, None, 96)).any()


def test_gallery_png_draws_every_outline_and_sorts_by_probability():
    side = 48
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    crops = [np.full((side, side, 3), c, np.uint8) for c in colours]
    masks = [square_mask(side, 10, 30)] * 3
    png = cluster_gallery(crops, masks, 4, "cluster 4", thumb=side, probabilities=[0.2, 0.9, 0.5],
                          captions=["a", "b", "c"])
    img = decode(png)
    one = int(is_outline(outlined_thumbnail(crops[0], masks[0], side)).sum())
    assert int(is_outline(img).sum()) == 3 * one
    # thumbnails left to right: probability 0.9 (green), 0.5 (blue), 0.2 (red)
    ys, xs = np.nonzero(np.all(img == colours[1], axis=-1))
    first_green, first_blue = xs.min(), np.nonzero(np.all(img == colours[2], axis=-1))[1].min()
    first_red = np.nonzero(np.all(img == colours[0], axis=-1))[1].min()
    assert first_green < first_blue < first_red


def test_gallery_limits_items_and_handles_no_items():
    crops = [np.zeros((20, 20, 3), np.uint8)] * 30
    masks = [square_mask(20, 5, 15)] * 30
    full = gallery_image(crops, masks, 0, "t", max_items=24, thumb=32, columns=6)
    few = gallery_image(crops, masks, 0, "t", max_items=6, thumb=32, columns=6)
    assert full.shape[0] > few.shape[0]
    assert is_outline(full).sum() == 4 * is_outline(few).sum()
    empty = decode(cluster_gallery([], [], UNKNOWN, "nothing here"))
    assert empty.shape[0] > 20 and empty.shape[1] > 50
    with pytest.raises(ValueError):
        gallery_image(crops, masks[:-1], 0, "t")
    with pytest.raises(ValueError):
        gallery_image(crops, masks, 0, "t", probabilities=[0.5])


# --------------------------------------------------------------------------- K curve


def test_plot_k_scores_is_a_png():
    scores = {"plate": {k: -abs(k - 5) for k in range(2, 9)}, "fabric": {k: k / 10 for k in range(2, 9)}}
    img = decode(plot_k_scores(scores, {"plate": 5, "fabric": None}, {"plate": 5, "fabric": 4}, "K"))
    assert img.shape[0] >= 250 and img.shape[1] >= 400


def test_importing_plots_leaves_pyplot_alone():
    code = "import sys, ncd.evaluate.plots, ncd.evaluate.report; print('matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
