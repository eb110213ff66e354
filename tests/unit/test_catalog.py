from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from ncd.config import DataConfig
from ncd.data.catalog import build_manifest
from ncd.data.io import DataError

MTD_ROOT = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "mtd"


def _img(path: Path, h=16, w=16, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), value, np.uint8))


def _map(path: Path, h=16, w=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, np.zeros((h, w), np.float32))
    else:
        cv2.imwrite(str(path), np.zeros((h, w), np.uint8))


def _generic(root: Path, names: dict[tuple[str, str], list[str]], map_ext=".png"):
    for (cat, typ), stems in names.items():
        for s in stems:
            _img(root / "images" / cat / typ / f"{s}.png")
            _map(root / "maps" / cat / typ / f"{s}{map_ext}")
    return root


def test_generic_layout_pairs_by_stem(tmp_path):
    root = _generic(tmp_path, {("plate", "scratch"): ["b", "a", "c10", "c9"], ("plate", "good"): ["z"],
                               ("fabric", "hole"): ["x"]}, map_ext=".npy")
    (root / "masks" / "plate" / "scratch").mkdir(parents=True)
    cv2.imwrite(str(root / "masks" / "plate" / "scratch" / "a.png"), np.zeros((16, 16), np.uint8))
    t = build_manifest(DataConfig(layout="generic", root=str(root)))
    rows = t.to_pylist()
    assert len(rows) == 6
    for r in rows:
        assert Path(r["image_uri"]).stem == Path(r["map_uri"]).stem
        assert r["image_id"] == f"{r['category']}/{r['gt_type']}/{Path(r['image_uri']).stem}"
        assert r["map_uri"].endswith(".npy")
    masks = {r["image_id"]: r["gt_mask_uri"] for r in rows}
    assert masks["plate/scratch/a"].endswith("masks/plate/scratch/a.png") and masks["plate/scratch/b"] == ""
    only = build_manifest(DataConfig(layout="generic", root=str(root), categories=("fabric",)))
    assert only.column("category").to_pylist() == ["fabric"]


def test_missing_map_names_the_image(tmp_path):
    root = _generic(tmp_path, {("c", "t"): ["a", "b"]})
    (root / "maps" / "c" / "t" / "b.png").unlink()
    with pytest.raises(DataError, match=r"no anomaly map for image .*images/c/t/b\.png"):
        build_manifest(DataConfig(layout="generic", root=str(root)))


def test_map_without_image_names_the_map(tmp_path):
    root = _generic(tmp_path, {("c", "t"): ["a"]})
    _map(root / "maps" / "c" / "t" / "ghost.png")
    with pytest.raises(DataError, match=r"no image for anomaly map .*ghost\.png"):
        build_manifest(DataConfig(layout="generic", root=str(root)))


def test_duplicate_stem_is_an_error(tmp_path):
    root = _generic(tmp_path, {("c", "t"): ["a"]})
    _img(root / "images" / "c" / "t" / "a.jpg")
    with pytest.raises(DataError, match="share the stem"):
        build_manifest(DataConfig(layout="generic", root=str(root)))


def test_unknown_layout_and_empty_category(tmp_path):
    with pytest.raises(DataError, match="unknown layout 'foo'.*generic"):
        build_manifest(DataConfig(layout="foo", root=str(tmp_path)))
    root = _generic(tmp_path, {("c", "t"): ["a"]})
    with pytest.raises(DataError, match="category 'nope' has no images"):
        build_manifest(DataConfig(layout="generic", root=str(root), categories=("nope",)))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_manifest(DataConfig(layout="generic", root=str(tmp_path / "missing")))


def test_mvtec_layout(tmp_path):
    root, maps = tmp_path / "mvtec", tmp_path / "maps"
    for typ in ("good", "crack", "combined"):
        for s in ("000", "001"):
            _img(root / "bottle" / "test" / typ / f"{s}.png")
            _map(maps / "bottle" / typ / f"{s}.png")
    _img(root / "bottle" / "train" / "good" / "000.png")
    _img(root / "bottle" / "ground_truth" / "crack" / "000_mask.png")
    t = build_manifest(DataConfig(layout="mvtec", root=str(root), maps=str(maps)))
    rows = {r["image_id"]: r for r in t.to_pylist()}
    assert sorted(rows) == ["bottle/crack/000", "bottle/crack/001", "bottle/good/000", "bottle/good/001"]
    assert rows["bottle/crack/000"]["gt_mask_uri"].endswith("ground_truth/crack/000_mask.png")
    assert rows["bottle/crack/001"]["gt_mask_uri"] == ""


@pytest.mark.skipif(not MTD_ROOT.is_dir(), reason="shared MTD dataset not present")
def test_mtd_layout_as_published(tmp_path):
    maps = tmp_path / "maps"
    for typ_dir in sorted(MTD_ROOT.glob("MT_*")):
        for jpg in sorted((typ_dir / "Imgs").glob("*.jpg")):
            _map(maps / typ_dir.name / f"{jpg.stem}.png", 2, 2)
    t = build_manifest(DataConfig(layout="mtd", root=str(MTD_ROOT), maps=str(maps)))
    counts = {}
    for r in t.to_pylist():
        counts[r["gt_type"]] = counts.get(r["gt_type"], 0) + 1
        assert r["category"] == "MTD"
        assert r["gt_mask_uri"].endswith(f"{Path(r['image_uri']).stem}.png")
        assert r["image_uri"].endswith(".jpg")
    assert counts == {"MT_Blowhole": 115, "MT_Break": 85, "MT_Crack": 57, "MT_Fray": 32, "MT_Free": 952,
                      "MT_Uneven": 103}


def test_manifest_csv_relative_uris(tmp_path):
    _img(tmp_path / "img" / "a.png")
    _map(tmp_path / "m" / "a.tiff")
    t = pa.table({"image_uri": ["img/a.png"], "map_uri": ["m/a.tiff"], "category": ["c"], "gt_type": ["t"]})
    pacsv.write_csv(t, tmp_path / "manifest.csv")
    rows = build_manifest(DataConfig(layout="manifest", manifest=str(tmp_path / "manifest.csv"))).to_pylist()
    assert rows[0]["image_uri"] == str(tmp_path / "img" / "a.png")
    assert rows[0]["image_id"] == "c/t/a"
    bad = pa.table({"image_uri": ["img/a.png"], "category": ["c"]})
    pacsv.write_csv(bad, tmp_path / "bad.csv")
    with pytest.raises(DataError, match="lacks column.*map_uri"):
        build_manifest(DataConfig(layout="manifest", manifest=str(tmp_path / "bad.csv")))


def test_mtd_layout_takes_any_type_folder(tmp_path):
    """An MTD-style folder without the ``MT_`` prefix (DeepPCB's layout): every ``<Type>/Imgs``
    folder is a type, masks pair by stem, and stray files at the root are ignored."""
    root, maps = tmp_path / "data", tmp_path / "maps"
    for typ, stems in {"Open": ["a", "b"], "Short": ["a"]}.items():
        for s in stems:
            _img(root / typ / "Imgs" / f"{s}.jpg")
            _map(maps / typ / f"{s}.npy")
    cv2.imwrite(str(root / "Open" / "Imgs" / "a.png"), np.zeros((16, 16), np.uint8))
    (root / "manifest.csv").write_text("type\n")
    rows = {r["image_id"]: r for r in build_manifest(DataConfig(layout="mtd", root=str(root), maps=str(maps))).to_pylist()}
    assert sorted(rows) == ["MTD/Open/a", "MTD/Open/b", "MTD/Short/a"]
    assert [rows[k]["gt_type"] for k in sorted(rows)] == ["Open", "Open", "Short"]
    assert rows["MTD/Open/a"]["gt_mask_uri"].endswith("Open/Imgs/a.png")
    assert rows["MTD/Open/b"]["gt_mask_uri"] == ""
    with pytest.raises(DataError, match="no <Type>/Imgs/<name>.jpg images under"):
        build_manifest(DataConfig(layout="mtd", root=str(tmp_path / "maps"), maps=str(maps)))


def test_gt_maps_pair_with_an_mtd_style_folder(tmp_path):
    """Maps made from the gt masks of a folder without the MT_ prefix pair with every image."""
    from ncd.data.catalog import catalog_mtd_images
    from ncd.data.gt_maps import write_gt_maps

    root = tmp_path / "pcb"
    for typ in ("Open", "Spur"):
        _img(root / typ / "Imgs" / "x1.jpg", 20, 24)
        mask = np.zeros((20, 24), np.uint8)
        mask[5:9, 6:12] = 255
        cv2.imwrite(str(root / typ / "Imgs" / "x1.png"), mask)
    write_gt_maps(catalog_mtd_images(str(root)), tmp_path / "maps")
    rows = build_manifest(DataConfig(layout="mtd", root=str(root), maps=str(tmp_path / "maps"))).to_pylist()
    assert [r["map_uri"].rsplit("/", 2)[-2:] for r in rows] == [["Open", "x1.npy"], ["Spur", "x1.npy"]]
    m = np.load(rows[0]["map_uri"])
    assert m.shape == (10, 12) and m[3, 4] > m[9, 0]  # half resolution, hot on the defect
