"""Tests of the embedded synthetic defect dataset (ncd.data.synthetic)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ncd.data import synthetic as S

SIZE = 96


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def samples() -> list[tuple[int, str, str | None, S.Sample]]:
    """One sample per (category, family or normal), each with its own seed."""
    out = []
    seed = 0
    for cat in S.CATEGORIES:
        for fam in (None,) + S.ALL_FAMILIES:
            seed += 1
            out.append((seed, cat, fam, S.generate_sample(_rng(seed), cat, fam, SIZE)))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_family_sets() -> None:
    assert len(S.TARGET_FAMILIES) >= 5 and len(S.BASE_FAMILIES) >= 3
    assert not set(S.TARGET_FAMILIES) & set(S.BASE_FAMILIES)
    assert S.NORMAL_TYPE not in S.ALL_FAMILIES
    spec = S.SyntheticSpec()
    assert spec.families == S.TARGET_FAMILIES and spec.image_size == 128


def test_sample_contract(samples: list) -> None:
    for _, cat, fam, s in samples:
        assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
        assert s.gt_mask.shape == (SIZE, SIZE) and s.gt_mask.dtype == np.uint8
        assert set(np.unique(s.gt_mask)) <= {0, 255}
        assert s.anomaly_map.shape == (SIZE, SIZE) and s.anomaly_map.dtype == np.float32
        assert 0.0 <= s.anomaly_map.min() and s.anomaly_map.max() <= 1.0
        assert s.category == cat and s.family == (fam or S.NORMAL_TYPE)
        if fam is None:
            assert not s.gt_mask.any() and s.severity == 0.0
        else:
            assert s.gt_mask.sum() / 255 >= S.MIN_DEFECT_AREA * SIZE * SIZE, (cat, fam)
            assert 0.0 < s.severity <= 1.0


def test_defect_changes_pixels_only_inside_mask(samples: list) -> None:
    for seed, cat, fam, s in samples:
        prod = S.render_product(_rng(seed), cat, SIZE)
        clean = np.round(prod.image * 255).astype(np.uint8)
        inside = s.gt_mask > 0
        assert np.array_equal(s.image[~inside], clean[~inside]), (cat, fam)
        if fam is None:
            continue
        assert not (inside & ~prod.object_mask).any(), (cat, fam)  # defects lie on the product
        changed = (np.abs(s.image.astype(int) - clean.astype(int)).max(2) >= 3)[inside]
        assert changed.mean() > 0.6, (cat, fam, changed.mean())


def test_map_peak_inside_gt_and_scaled_with_severity(samples: list) -> None:
    hits, peaks, sevs = [], [], []
    for _, _, fam, s in samples:
        if fam is None:
            continue
        r, c = np.unravel_index(np.argmax(s.anomaly_map), s.anomaly_map.shape)
        near = cv2.dilate(s.gt_mask, np.ones((5, 5), np.uint8)) > 0
        hits.append(bool(near[r, c]))
        peaks.append(float(s.anomaly_map[s.gt_mask > 0].max()))
        sevs.append(s.severity)
    assert np.mean(hits) >= 0.8, np.mean(hits)
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(peaks), rank(sevs))[0, 1] > 0.5


def test_normal_maps_mostly_lower_with_some_false_positives() -> None:
    normal, defect = [], []
    for i in range(30):
        for cat in ("plate", "fabric"):
            normal.append(S.generate_sample(_rng(1000 + i), cat, None, 64).anomaly_map)
            fam = S.TARGET_FAMILIES[i % len(S.TARGET_FAMILIES)]
            defect.append(S.generate_sample(_rng(2000 + i), cat, fam, 64).anomaly_map)
    n_peak = np.array([m.max() for m in normal])
    d_peak = np.array([m.max() for m in defect])
    assert np.median(n_peak) < np.median(d_peak) - 0.15
    # a false-positive blob: a peak well above the map's own background level
    contrast = np.array([m.max() - np.median(m) for m in normal])
    assert 0.1 < np.mean(contrast > 0.15) < 0.9
    assert (n_peak > d_peak.min()).any()  # realistic: not perfectly separable


def test_map_scale() -> None:
    s = S.generate_sample(_rng(0), "washer", "hole", 128, map_scale=0.5)
    assert s.anomaly_map.shape == (64, 64) and s.image.shape == (128, 128, 3)


@pytest.mark.parametrize("category", S.CATEGORIES)
def test_large_images(category: str) -> None:
    for fam in S.TARGET_FAMILIES:
        s = S.generate_sample(_rng(7), category, fam, 256)
        assert s.image.shape == (256, 256, 3) and s.gt_mask.any()


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="category"):
        S.generate_sample(_rng(0), "teapot", None, 64)
    with pytest.raises(ValueError, match="family"):
        S.generate_sample(_rng(0), "plate", "rust", 64)
    with pytest.raises(ValueError, match="size"):
        S.generate_sample(_rng(0), "plate", None, 8)
    with pytest.raises(ValueError, match="map_scale"):
        S.write_dataset(tmp_path, S.SyntheticSpec(map_scale=0.0))
    with pytest.raises(ValueError, match="disjoint"):
        S.write_base_set(tmp_path, S.SyntheticSpec(families=("dent", "scratch")))


SMALL = S.SyntheticSpec(
    categories=("plate", "fabric"), images_per_family=2, normal_images=2, image_size=64, map_scale=0.5
)


def test_write_dataset_layout(tmp_path: Path) -> None:
    root = S.write_dataset(tmp_path / "ds", SMALL)
    assert root == tmp_path / "ds"
    types = list(SMALL.families) + [S.NORMAL_TYPE]
    expected = {
        f"{cat}/{t}/{t}_{i:03d}.png"
        for cat in SMALL.categories
        for t in types
        for i in range(SMALL.images_per_family if t != S.NORMAL_TYPE else SMALL.normal_images)
    }
    for kind in ("images", "maps", "masks"):
        assert set(_files(root / kind)) == expected, kind
    records = {f"{r.category}/{r.type}/{r.name}.png": r for r in S.generate_dataset(SMALL)}
    for cat in SMALL.categories:
        maps = []
        for rel in sorted(e for e in expected if e.startswith(cat + "/")):
            img = cv2.imread(str(root / "images" / rel), cv2.IMREAD_UNCHANGED)
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
            assert np.array_equal(img[..., ::-1], records[rel].sample.image)  # stored as RGB
            mask = cv2.imread(str(root / "masks" / rel), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
            assert mask.any() == (f"/{S.NORMAL_TYPE}/" not in rel)
            amap = cv2.imread(str(root / "maps" / rel), cv2.IMREAD_UNCHANGED)
            assert amap.shape == (32, 32) and amap.dtype == np.uint8
            maps.append(amap)
        # jointly min-max normalised per category, and the order of the floats kept
        assert min(m.min() for m in maps) == 0 and max(m.max() for m in maps) == 255


def test_write_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = _files(S.write_dataset(tmp_path / "a", SMALL, workers=1))
    b = _files(S.write_dataset(tmp_path / "b", SMALL, workers=2))
    c = _files(S.write_dataset(tmp_path / "c", S.SyntheticSpec(**{**SMALL.__dict__, "seed": 1})))
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.startswith("images/"))


def test_images_keyed_by_name_not_position() -> None:
    alone = S.generate_dataset(S.SyntheticSpec(categories=("plate",), images_per_family=2, normal_images=1))
    mixed = S.generate_dataset(
        S.SyntheticSpec(categories=("fabric", "plate"), families=("hole",) + S.TARGET_FAMILIES[:1],
                        images_per_family=3, normal_images=1)
    )
    by_name = {(r.category, r.type, r.name): r.sample for r in mixed}
    shared = [r for r in alone if (r.category, r.type, r.name) in by_name]
    assert len(shared) >= 3
    for r in shared:
        assert np.array_equal(r.sample.image, by_name[(r.category, r.type, r.name)].image)


def test_write_base_set(tmp_path: Path) -> None:
    spec = S.SyntheticSpec(
        categories=("washer", "stone"), families=S.BASE_FAMILIES, images_per_family=2, normal_images=0,
        image_size=64,
    )
    root = S.write_base_set(tmp_path / "base", spec)
    files = _files(root / "masks")
    assert {k.split("/")[1] for k in files} == set(S.BASE_FAMILIES)
    assert {k.split("/")[0] for k in files} == {"base"}
    assert set(_files(root / "images")) == set(files)
    for rel in files:
        assert cv2.imread(str(root / "masks" / rel), cv2.IMREAD_UNCHANGED).any()


def _crude_features(s: S.Sample) -> np.ndarray:
    """Contrast histogram, colour shift, gradient and shape statistics of a defect."""
    m = s.gt_mask > 0
    ring = (cv2.dilate(s.gt_mask, np.ones((7, 7), np.uint8)) > 0) & ~m
    img = s.image.astype(np.float32) / 255
    sat = cv2.cvtColor(s.image, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32) / 255
    gray = img.mean(2)
    grad = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    hist = np.histogram(gray[m] - gray[ring].mean(), 8, (-1, 1))[0] / m.sum()
    ys, xs = np.nonzero(m)
    ev = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)) + 1e-3 * np.eye(2))
    area = m.sum()
    perimeter = cv2.Canny(s.gt_mask, 100, 200).sum() / 255
    return np.concatenate([
        hist,
        img[m].mean(0) - img[ring].mean(0),
        [sat[m].mean() - sat[ring].mean(), img[m].std(), grad[m].mean(),
         area / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)), np.log(ev[1] / ev[0]),
         np.sqrt(area) / s.image.shape[0], area / (perimeter + 1)],
    ])


def test_target_families_are_visually_distinct() -> None:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    spec = S.SyntheticSpec(images_per_family=12, normal_images=0, image_size=SIZE, seed=3)
    recs = S.generate_dataset(spec)
    x = np.array([_crude_features(r.sample) for r in recs])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = [S.TARGET_FAMILIES.index(r.type) for r in recs]
    pred = KMeans(len(S.TARGET_FAMILIES), n_init=10, random_state=0).fit_predict(x)
    assert adjusted_rand_score(y, pred) > 0.3
