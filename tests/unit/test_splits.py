import numpy as np
import pyarrow as pa
import pytest

from ncd.data.io import DataError
from ncd.data.splits import evaluation_split, is_normal_type, type_counts


def _manifest(groups: dict[tuple[str, str], int]) -> pa.Table:
    rows = [dict(image_id=f"{c}/{t}/{i:03d}", category=c, gt_type=t) for (c, t), n in groups.items() for i in range(n)]
    rows.sort(key=lambda r: r["image_id"])
    return pa.Table.from_pylist(rows)


def test_normal_type_names():
    assert all(is_normal_type(t) for t in ("MT_Free", "Free", "good", "Normal", "OK"))
    assert not any(is_normal_type(t) for t in ("MT_Blowhole", "Open", "freedom", "MT_Good_crack"))


def test_split_samples_normals_and_caps_defect_types_per_category():
    m = _manifest({("a", "good"): 10, ("a", "scratch"): 5, ("a", "hole"): 3, ("b", "good"): 2, ("b", "scratch"): 4})
    s = evaluation_split(m, normal_images=4, max_per_type=3, seed=0)
    counts = {}
    for r in s.to_pylist():
        counts[(r["category"], r["gt_type"])] = counts.get((r["category"], r["gt_type"]), 0) + 1
    assert counts == {("a", "good"): 4, ("a", "scratch"): 3, ("a", "hole"): 3, ("b", "good"): 2, ("b", "scratch"): 3}
    assert s.column("image_id").to_pylist() == sorted(s.column("image_id").to_pylist())  # manifest order kept
    assert s.equals(evaluation_split(m, normal_images=4, max_per_type=3, seed=0))  # seeded
    assert not s.equals(evaluation_split(m, normal_images=4, max_per_type=3, seed=5))
    assert type_counts(evaluation_split(m, normal_images=0)) == {"hole": 3, "scratch": 9}  # all defects, no normals


def test_split_keeps_mtd_protocol():
    """Every defect image and the same 191 MT_Free images as the benchmark always drew (seed 0)."""
    m = _manifest({("MTD", "MT_Blowhole"): 115, ("MTD", "MT_Free"): 952, ("MTD", "MT_Crack"): 57})
    s = evaluation_split(m)
    types = m.column("gt_type").to_pylist()
    free = [i for i, t in enumerate(types) if t == "MT_Free"]
    drawn = np.random.default_rng(0).choice(free, 191, replace=False)
    expected = sorted([i for i, t in enumerate(types) if t != "MT_Free"] + drawn.tolist())
    assert s.column("image_id").to_pylist() == [m.column("image_id")[i].as_py() for i in expected]


def test_split_without_normal_class_uses_every_defect_image():
    m = _manifest({("MTD", "Open"): 7, ("MTD", "Short"): 2})
    assert evaluation_split(m).num_rows == 9
    with pytest.raises(DataError, match="empty"):
        evaluation_split(_manifest({("MTD", "good"): 3}), normal_images=0)
