"""The discovery report (ncd.evaluate.report) over real crops from the synthetic dataset."""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ncd.config import CropConfig, DataConfig, MebinConfig, S3Config
from ncd.data.catalog import build_manifest
from ncd.data.io import DataError
from ncd.evaluate import report
from ncd.evaluate.metrics import confusion_matrix_matched, hungarian_mapping
from ncd.evaluate.plots import OUTLINE_RGB, UNKNOWN
from ncd.evaluate.predictions import evaluate_predictions
from ncd.evaluate.report import cluster_summary, level_data, write_report
from ncd.preprocess.regions import preprocess_manifest


@pytest.fixture(scope="module")
def regions_all(demo_root) -> pa.Table:
    cfg = DataConfig(root=str(demo_root))
    table = preprocess_manifest(build_manifest(cfg), MebinConfig(), CropConfig(), cfg)
    keep = [i for i, t in enumerate(table.column("gt_type").to_pylist()) if t != "good"]
    return table.take(pa.array(keep))


def category(table: pa.Table, cat: str) -> pa.Table:
    return table.filter(pc.equal(table.column("category"), cat))


def predictions(regions: pa.Table, seed: int = 0, unknown: int = 0, labelled: bool = True
                ) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """(image predictions, region predictions, features): clusters = true types + noise."""
    rng = np.random.default_rng(seed)
    gts = regions.column("gt_type").to_pylist()
    types = sorted(set(gts))
    top1 = np.asarray([(types.index(t) + 1) % len(types) for t in gts])
    flip = rng.random(top1.size) < 0.25
    top1[flip] = rng.integers(0, len(types), int(flip.sum()))
    cluster = top1.copy()
    cluster[:unknown] = UNKNOWN
    prob = rng.uniform(0.3, 1.0, top1.size)
    region_preds = pa.table({
        "region_id": regions.column("region_id"), "image_id": regions.column("image_id"),
        "category": regions.column("category"),
        "gt_type": regions.column("gt_type") if labelled else pa.array([""] * top1.size),
        "cluster": pa.array(cluster, pa.int64()), "probability": pa.array(prob),
        "top3": pa.array([[int(t), int(t + 1), int(t + 2)] for t in top1], pa.list_(pa.int64())),
        "top3_prob": pa.array([[float(p), 0.1, 0.0] for p in prob]), "area": regions.column("area"),
    })
    first: dict[str, int] = {}
    for i, image_id in enumerate(regions.column("image_id").to_pylist()):
        first.setdefault(image_id, i)
    image_preds = region_preds.take(pa.array(list(first.values()))).drop(["region_id", "area"])
    features = np.eye(len(types))[top1] * 4 + rng.normal(0, 1, (top1.size, len(types)))
    return image_preds, region_preds, features


def read_png(path: Path) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, f"{path} is not a PNG"
    return img


def linked_plots(md: str) -> set[str]:
    return set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md))


def table_row(md: str, first_cell: str, after: str = "") -> list[str]:
    text = md[md.index(after):] if after else md
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r}")


def test_report_writes_and_links_every_plot(regions_all, tmp_path):
    regions = category(regions_all, "plate")
    images, preds, feats = predictions(regions, unknown=2)
    uri = write_report(str(tmp_path), image_predictions=images, region_predictions=preds, regions=regions,
                       features=feats, metrics=None, k_info=None, title="plate report")
    assert uri == f"{tmp_path}/report.md"
    md = Path(uri).read_text()
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")}
    clusters = sorted(set(preds.column("cluster").to_pylist()) - {UNKNOWN})
    expected = {"plots/confusion_image.png", "plots/confusion_region.png", "plots/embedding.png",
                "plots/gallery_unknown.png"} | {f"plots/gallery_cluster{k}.png" for k in clusters}
    assert written == expected
    assert linked_plots(md) == written
    for rel in written:
        img = read_png(tmp_path / rel)
        assert img.shape[0] >= 120 and img.shape[1] >= 300, rel
    # the galleries show the regions' mask outlines
    gallery = read_png(tmp_path / f"plots/gallery_cluster{clusters[0]}.png")[..., ::-1]
    assert np.all(gallery == np.asarray(OUTLINE_RGB, np.uint8), axis=-1).sum() > 20
    # metrics computed from gt_type when not given
    for level, table in (("image", images), ("region", preds)):
        result = evaluate_predictions(table)
        for m in ("nmi", "ari", "f1"):
            assert f"{result['per_category']['plate'][m]:.3f}" in table_row(md, "plate", "## Metrics")
            assert f"**{result['mean'][m]:.3f}**" in md
            assert f"**{result['weighted_mean'][m]:.3f}**" in table_row(md, "**weighted mean**", "## Metrics")
        assert str(result["samples"]["plate"]) in table_row(md, "plate", "## Metrics")
    assert "How to read this" in md and "## Number of classes (K)" in md


def test_cluster_table_holds_the_matched_confusion(regions_all, tmp_path):
    regions = category(regions_all, "fabric")
    images, preds, _ = predictions(regions, seed=3)
    md = Path(write_report(str(tmp_path), image_predictions=images, region_predictions=preds, regions=regions,
                           features=None, metrics=None, k_info=None, title="t")).read_text()
    truth = preds.column("gt_type").to_pylist()
    pred = preds.column("cluster").to_pylist()
    matrix, labels, clusters = confusion_matrix_matched(truth, pred)
    matched = hungarian_mapping(truth, pred)
    assert np.trace(matrix) > 0
    for j, k in enumerate(clusters):
        row = table_row(md, f"c{k}", "Region level:")
        assert row[1] == str(int(matrix[:, j].sum()))  # size
        composition = dict(part.rsplit(" ", 1) for part in row[5].split(", ") if not part.startswith("+"))
        for i, lab in enumerate(labels):
            if matrix[i, j] and lab in composition:
                assert composition[lab] == str(int(matrix[i, j]))
        if matched[k] is not None:  # the matched type and its cell
            assert row[2] == matched[k] and row[3] == str(int(matrix[labels.index(matched[k]), j]))
        else:
            assert row[2] == row[3] == "—"


def test_cluster_summary_counts_rejections():
    table = pa.table({"image_id": ["a", "b", "c", "d", "e"], "category": ["x"] * 5,
                      "gt_type": ["s", "s", "h", "h", "s"], "cluster": [0, 0, 1, UNKNOWN, UNKNOWN],
                      "probability": [0.9, 0.8, 0.7, 0.2, 0.1], "top3": [[0], [0], [1], [1], [0]]})
    rows = {r["cluster"]: r for r in cluster_summary(level_data(table, "image_id"))}
    assert rows[0]["size"] == 2 and rows[0]["rejected"] == 1 and rows[1]["rejected"] == 1
    assert rows[0]["matched"] == "s" and rows[0]["in_matched"] == 2 and rows[0]["purity"] == 1.0
    assert rows[UNKNOWN]["size"] == 2 and rows[UNKNOWN]["matched"] is None
    assert rows[UNKNOWN]["composition"] == {"h": 1, "s": 1} and rows[UNKNOWN]["rejected"] is None
    assert list(rows) == [0, 1, UNKNOWN]
    assert rows[0]["mean_probability"] == pytest.approx(0.85)


def test_report_without_ground_truth(regions_all, tmp_path):
    regions = category(regions_all, "plate")
    images, preds, feats = predictions(regions, unknown=1, labelled=False)
    md = Path(write_report(str(tmp_path), image_predictions=images.drop(["gt_type"]), region_predictions=preds,
                           regions=regions, features=feats, metrics=None, k_info=None, title="t")).read_text()
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")}
    assert not any("confusion" in w for w in written)
    assert "plots/embedding.png" in written and "plots/gallery_unknown.png" in written
    assert sum(w.startswith("plots/gallery_cluster") for w in written) == len(
        set(preds.column("cluster").to_pylist()) - {UNKNOWN})
    assert linked_plots(md) == written
    assert "## Metrics" not in md and "matched true type" not in md and "not given" in md


def test_report_with_given_metrics_and_k_info(regions_all, tmp_path):
    regions = category(regions_all, "plate")
    images, preds, _ = predictions(regions)
    metrics = {"region": {"per_category": {"plate": {"nmi": 0.1234, "ari": 0.5678, "f1": 0.9012}},
                          "mean": {"nmi": 0.1234, "ari": 0.5678, "f1": 0.9012}}}
    k_info = {"k": 5, "k_estimated": 4, "criterion": "silhouette", "scores": {"3": 0.2, "4": 0.6, "5": 0.5}}
    md = Path(write_report(str(tmp_path), image_predictions=images, region_predictions=preds, regions=regions,
                           features=None, metrics=metrics, k_info=k_info, title="t")).read_text()
    assert table_row(md, "plate", "## Metrics")[1:] == ["0.123", "0.568", "0.901"]
    assert "image NMI" not in md  # only the levels given
    n_types = len(set(preds.column("gt_type").to_pylist()))
    assert table_row(md, "plate", "## Number of classes")[2:] == ["5", "4", str(n_types), "silhouette"]
    assert table_row(md, "4", "per K")[1] == "0.600"
    assert (tmp_path / "plots/k_scores.png").exists() and "plots/k_scores.png" in linked_plots(md)
    assert not (tmp_path / "plots/embedding.png").exists()


def test_an_oracle_k_is_marked_as_such():
    md = report.k_section({"k": 6, "source": "oracle", "criterion": "oracle: ground-truth type count"},
                          {"plate": 6}, {"plate": 6})[0]
    assert "| plate | 6 | 6 (oracle: gt type count) |" in md
    assert "(oracle" not in report.k_section({"k": 6, "source": "given"}, {"plate": 6}, {"plate": 6})[0]


def test_several_categories_get_their_own_folders(regions_all, tmp_path):
    images, preds, feats = predictions(regions_all, unknown=1)
    md = Path(write_report(str(tmp_path), image_predictions=images, region_predictions=preds,
                           regions=regions_all, features=feats, metrics=None, k_info=None, title="t")).read_text()
    for cat in ("plate", "fabric"):
        assert f"## {cat}" in md
        assert {"confusion_image.png", "confusion_region.png", "embedding.png"} <= {
            p.name for p in (tmp_path / "plots" / cat).iterdir()}
    assert linked_plots(md) == {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")}


def test_every_write_goes_through_io_with_the_s3_config(regions_all, monkeypatch):
    regions = category(regions_all, "plate")
    images, preds, _ = predictions(regions)
    calls = []
    monkeypatch.setattr(report.io, "write_bytes", lambda uri, data, s3=None: calls.append((uri, s3, data)))
    s3 = S3Config(endpoint_override="localhost:9000")
    uri = write_report("s3://bucket/run/report", image_predictions=images, region_predictions=preds,
                       regions=regions, features=None, metrics=None, k_info=None, title="t", s3=s3)
    assert uri == "s3://bucket/run/report/report.md" and calls[-1][0] == uri
    assert all(u.startswith("s3://bucket/run/report/plots/") for u, _, _ in calls[:-1])
    assert all(c is s3 for _, c, _ in calls) and all(d for _, _, d in calls)


def test_inconsistent_inputs_are_errors(regions_all, tmp_path):
    regions = category(regions_all, "plate")
    images, preds, feats = predictions(regions)
    kwargs = dict(image_predictions=images, region_predictions=preds, metrics=None, k_info=None, title="t")
    with pytest.raises(DataError, match="not in the region table"):
        write_report(str(tmp_path), regions=regions.slice(1), features=None, **kwargs)
    with pytest.raises(ValueError, match="not aligned"):
        write_report(str(tmp_path), regions=regions, features=feats[1:], **kwargs)
    with pytest.raises(DataError, match="probability"):
        write_report(str(tmp_path), regions=regions, features=None,
                     **{**kwargs, "region_predictions": preds.drop(["probability"])})
    assert not list(tmp_path.iterdir())
