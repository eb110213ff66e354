"""Real-IAD catalog on a tiny fake tree (2 objects, OK + 2 defect codes, 2 views)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest

from ncd.data.catalog import MANIFEST_SCHEMA
from ncd.data.catalog_realiad import REALIAD_DEFECTS, catalog_realiad, sample_key, view_of
from ncd.data.io import DataError

TS = "20231001120000"
OBJECTS = ("audiojack", "toy_brick")
VIEWS = ("C1", "C2")
# (sample, class, views whose defect is visible = with a mask)
SAMPLES = [("0001", "OK", ()), ("0002", "OK", ()), ("0003", "AK", ("C1", "C2")), ("0004", "HS", ("C1",))]


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), arr)


def _name(obj: str, sample: str, cls: str, view: str) -> str:
    kind = "OK" if cls == "OK" else f"NG_{cls}"
    return f"{obj}_{sample}_{kind}_{view}_{TS}"


def _rel_dir(sample: str, cls: str) -> str:
    return f"OK/S{sample}" if cls == "OK" else f"NG/{cls}/S{sample}"


def make_realiad(root: Path, nested_jsons: bool = False) -> tuple[Path, Path]:
    """Write the fake Real-IAD tree and its maps; returns (root, maps)."""
    maps = root / "maps"
    jsons = root / "realiad_jsons" / ("realiad_jsons" if nested_jsons else "")
    for obj in OBJECTS:
        train, test = [], []
        for sample, cls, visible in SAMPLES:
            for view in VIEWS:
                rel = f"{_rel_dir(sample, cls)}/{_name(obj, sample, cls, view)}"
                _write(root / "realiad_1024" / obj / f"{rel}.jpg", np.full((8, 8, 3), 128, np.uint8))
                _write(maps / obj / f"{rel}.png", np.zeros((8, 8), np.uint8))
                mask = ""
                if view in visible:
                    mask = f"{rel}_mask.png"
                    _write(root / "realiad_1024" / obj / mask, np.full((8, 8), 255, np.uint8))
                entry = {"category": obj, "anomaly_class": cls, "image_path": f"{rel}.jpg", "mask_path": mask or None}
                (train if sample == "0001" else test).append(entry)
        jsons.mkdir(parents=True, exist_ok=True)
        meta = {"prefix": obj, "normal_class": "OK"}
        (jsons / f"{obj}.json").write_text(json.dumps({"meta": meta, "train": train, "test": test}))
    return root, maps


@pytest.fixture
def realiad(tmp_path):
    return make_realiad(tmp_path)


def test_test_split_labels_from_masks(realiad):
    root, maps = realiad
    rows = catalog_realiad(str(root), str(maps))
    pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)  # the manifest's shape
    assert len(rows) == 2 * 3 * 2  # objects x test samples x views
    assert len({r["image_id"] for r in rows}) == len(rows)
    assert {r["category"] for r in rows} == set(OBJECTS)
    by_id = {r["image_id"]: r for r in rows}
    for obj in OBJECTS:
        for view in VIEWS:
            pit = by_id[f"{obj}/pit/{_name(obj, '0003', 'AK', view)}"]
            assert pit["gt_mask_uri"].endswith(f"NG/AK/S0003/{_name(obj, '0003', 'AK', view)}_mask.png")
            assert Path(pit["gt_mask_uri"]).is_file()
        scratch = by_id[f"{obj}/scratch/{_name(obj, '0004', 'HS', 'C1')}"]
        assert scratch["gt_mask_uri"]
        # the C2 view of the scratch sample has no mask: the defect is not visible there
        hidden = by_id[f"{obj}/good/{_name(obj, '0004', 'HS', 'C2')}"]
        assert hidden["gt_type"] == "good" and hidden["gt_mask_uri"] == ""
        assert hidden["image_uri"].endswith(f"realiad_1024/{obj}/NG/HS/S0004/{_name(obj, '0004', 'HS', 'C2')}.jpg")
    counts = {t: sum(r["gt_type"] == t for r in rows) for t in ("good", "pit", "scratch")}
    assert counts == {"good": 2 * (2 + 1), "pit": 2 * 2, "scratch": 2 * 1}
    for r in rows:  # maps paired by the path inside the object folder, not by position
        img_rel = r["image_uri"].split("/realiad_1024/", 1)[1].rsplit(".", 1)[0]
        assert r["map_uri"] == str(maps / f"{img_rel}.png")
        assert r["image_id"].rsplit("/", 1)[1] == Path(r["image_uri"]).stem


def test_codes_views_splits_and_objects(realiad):
    root, maps = realiad
    coded = catalog_realiad(str(root), str(maps), defect_names=False)
    assert {r["gt_type"] for r in coded} == {"good", "AK", "HS"}
    c1 = catalog_realiad(str(root), str(maps), views=("C1",))
    assert len(c1) == 6 and all(view_of(r["image_uri"]) == "C1" for r in c1)
    assert catalog_realiad(str(root), str(maps), views=("2",)) == \
        [r for r in catalog_realiad(str(root), str(maps)) if view_of(r["image_uri"]) == "C2"]
    both = catalog_realiad(str(root), str(maps), splits=("train", "test"))
    assert len(both) == 2 * 4 * 2
    one = catalog_realiad(str(root), str(maps), categories=("toy_brick",))
    assert {r["category"] for r in one} == {"toy_brick"} and len(one) == 6
    with pytest.raises(DataError, match="bottle.*found: audiojack, toy_brick"):
        catalog_realiad(str(root), str(maps), categories=("bottle",))
    with pytest.raises(DataError, match="view"):
        catalog_realiad(str(root), str(maps), views=("top",))
    with pytest.raises(DataError, match="resolution"):
        catalog_realiad(str(root), str(maps), resolution="2048")


def test_folder_mode_matches_json_labels(realiad):
    root, maps = realiad
    from_json = catalog_realiad(str(root), str(maps), splits=("train", "test"))
    from_folders = catalog_realiad(str(root), str(maps), jsons="")
    assert from_folders == from_json


def test_nested_json_folder_and_single_view_jsons(tmp_path):
    root, maps = make_realiad(tmp_path, nested_jsons=True)
    assert len(catalog_realiad(str(root), str(maps))) == 12
    sv = root / "realiad_jsons_sv"
    shutil.copytree(root / "realiad_jsons" / "realiad_jsons", sv)
    assert len(catalog_realiad(str(root), str(maps), jsons="realiad_jsons_sv")) == 12
    assert len(catalog_realiad(str(root), str(maps), jsons=str(sv))) == 12


def test_missing_and_extra_files_are_named(realiad):
    root, maps = realiad
    name = _name("audiojack", "0003", "AK", "C2")
    extra = maps / "audiojack" / "NG" / "AK" / "S0003" / "stray.png"
    _write(extra, np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="stray.png"):
        catalog_realiad(str(root), str(maps))
    extra.unlink()
    missing = maps / "audiojack" / "NG" / "AK" / "S0003" / f"{name}.png"
    missing.unlink()
    with pytest.raises(DataError, match=f"no anomaly map for image .*{name}.jpg"):
        catalog_realiad(str(root), str(maps))
    assert len(catalog_realiad(str(root), str(maps), views=("C1",))) == 6  # the C2 view is not selected
    _write(missing, np.zeros((8, 8), np.uint8))
    (root / "realiad_1024" / "audiojack" / "NG" / "AK" / "S0003" / f"{name}_mask.png").unlink()
    with pytest.raises(DataError, match=f"mask listed but missing: .*{name}_mask.png"):
        catalog_realiad(str(root), str(maps))
    with pytest.raises(DataError, match="data.maps"):
        catalog_realiad(str(root), "")


def test_defect_map_and_sample_key():
    assert REALIAD_DEFECTS["AK"] == "pit" and REALIAD_DEFECTS["QS"] == "missing_parts" and len(REALIAD_DEFECTS) == 8
    name = f"NG/BX/S0001/audiojack_0001_NG_BX_C2_{TS}.jpg"
    assert view_of(name) == "C2" and sample_key(name) == "audiojack_0001_NG_BX"
    assert sample_key(f"toy_brick_0007_OK_C5_{TS}.jpg") == "toy_brick_0007_OK"
    assert view_of("plain.jpg") == "" and sample_key("plain.jpg") == ""


@pytest.mark.parametrize("with_object", [False, True])
def test_json_without_meta_prefix(realiad, with_object):
    """No ``meta``: paths are relative to the object folder, or start with the object name."""
    root, maps = realiad
    expected = catalog_realiad(str(root), str(maps))
    for obj in OBJECTS:
        path = root / "realiad_jsons" / f"{obj}.json"
        data = json.loads(path.read_text())
        del data["meta"]
        for e in data["train"] + data["test"]:
            if with_object:
                e["image_path"] = f"{obj}/{e['image_path']}"
                e["mask_path"] = f"{obj}/{e['mask_path']}" if e["mask_path"] else None
        path.write_text(json.dumps(data))
    assert catalog_realiad(str(root), str(maps)) == expected
