"""The built-in detector (``ncd.detect``): mutual scoring against a slow exact reference,
the FAISS shortcut's exactness, small and one-image categories, determinism, and maps
written where the catalog reads them."""
from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
import pytest
import torch

from ncd.config import DataConfig, DetectConfig, load_config
from ncd.data import io
from ncd.data.catalog import build_manifest, catalog_images
from ncd.data.io import DataError
from ncd.detect import Features, detect_category, detect_local, plan_detection, write_detector_maps
from ncd.detect.run import reference_sample, stratified_subsets
from ncd.detect.scoring import _faiss_rows, _exact_rows, bank_scores, mutual_scores, rescore, smallest_count

TINY = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2)
TINY_DETECT = ["detect.weights=random", "detect.backbone=vit_tiny_patch16_224", "detect.image_size=32",
               "detect.blocks=1,3", "detect.radii=1,3"]


def tokens(n: int, seed: int, layers: int = 2, h: int = 4, w: int = 3, c: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, layers, h, w, c)).astype(np.float16)


def slow_lnamd(tok: np.ndarray, r: int) -> np.ndarray:
    """(h, w, C) -> (h*w, C): per-image standardisation, r x r zero-padded mean, L2 norm; by loops."""
    x = tok.astype(np.float64)
    x = (x - x.mean()) / (x.std() + 1e-6)
    h, w, c = x.shape
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            acc = np.zeros(c)
            for di in range(-(r // 2), r // 2 + 1):
                for dj in range(-(r // 2), r // 2 + 1):
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        acc += x[i + di, j + dj]
            out[i, j] = acc / (r * r)
    out = out.reshape(h * w, c)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def slow_mutual(query: np.ndarray, ref: np.ndarray, self_index: np.ndarray, radii, fraction: float) -> np.ndarray:
    """MuSc by its definition, image by image and patch by patch."""
    n, n_layers, h, w, _ = query.shape
    m = ref.shape[0]
    k = max(1, math.ceil(fraction * (m - 1)))
    total = np.zeros((n, h * w))
    for layer in range(n_layers):
        for r in radii:
            refs = [slow_lnamd(ref[j, layer], r) for j in range(m)]
            for i in range(n):
                z = slow_lnamd(query[i, layer], r)
                for p in range(h * w):
                    minima = sorted(np.linalg.norm(refs[j] - z[p], axis=1).min() for j in range(m) if j != self_index[i])
                    total[i, p] += np.mean(minima[:k])
    return (total / (n_layers * len(radii))).reshape(n, h, w)


@pytest.mark.parametrize("knn", ["exact", "faiss"])
def test_mutual_scores_match_the_definition(knn):
    query, ref = tokens(3, 0), tokens(6, 1)
    ref[2] = query[1]  # query 1 is reference image 2: left out of its own scoring
    self_index = np.array([-1, 2, -1])
    cfg = DetectConfig(radii=(1, 3), fraction=0.3, knn=knn, knn_candidates=8)
    got = mutual_scores(query, ref, self_index, cfg)
    want = slow_mutual(query.astype(np.float32), ref.astype(np.float32), self_index, (1, 3), 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_faiss_shortcut_is_exact_and_falls_back_where_it_cannot_be():
    g = torch.Generator().manual_seed(0)
    n_images, per_image = 12, 20
    ref_image = torch.arange(n_images).repeat_interleave(per_image)
    centres = torch.randn(n_images, 16, generator=g)  # patches of one image resemble each other
    ref = torch.nn.functional.normalize(centres[ref_image] + 0.5 * torch.randn(n_images * per_image, 16, generator=g),
                                        dim=1)
    query = torch.nn.functional.normalize(centres[torch.randint(0, n_images, (200,), generator=g)]
                                          + 0.5 * torch.randn(200, 16, generator=g), dim=1)
    self_image = torch.randint(-1, n_images, (200,), generator=g)
    k = smallest_count(n_images, 0.3)
    exact = _exact_rows(query, ref, ref_image, n_images, self_image, k)
    fallbacks = []
    for candidates in (6, 12, 24, 40, 240):
        got, fallback = _faiss_rows(query, ref, ref_image, n_images, self_image, k, candidates)
        np.testing.assert_allclose(got.numpy(), exact.numpy(), rtol=1e-5, atol=1e-6)
        fallbacks.append(fallback)
    assert fallbacks[-1] == 0  # the whole reference listed: exact from the list alone
    assert any(0 < f < 200 for f in fallbacks)  # short lists: some rows from the list, some fell back
    assert fallbacks == sorted(fallbacks, reverse=True)


def test_smallest_count_never_zero():
    assert [smallest_count(m, 0.3) for m in (2, 3, 4, 5, 11)] == [1, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="at least 2"):
        smallest_count(1, 0.3)


def test_bank_scores_are_zero_for_bank_images_seen_elsewhere_and_leave_one_out():
    bank = tokens(4, 3)
    bank[1] = bank[0]  # a duplicate: image 0 scored leave-one-out still finds itself in image 1
    cfg = DetectConfig(radii=(1,), knn="exact")
    scores = bank_scores(bank[:3], bank, np.array([0, 1, 2]), cfg)
    assert np.allclose(scores[0], 0, atol=1e-3) and np.allclose(scores[1], 0, atol=1e-3)
    assert scores[2].min() > 0.1  # image 2 has no copy: its own patches are not used
    faiss_cfg = dataclasses.replace(cfg, knn="faiss")
    # sqrt(2 - 2 cos) near 0 turns float32 rounding of cos into ~1e-4: compare at that scale
    np.testing.assert_allclose(bank_scores(bank[:3], bank, np.array([0, 1, 2]), faiss_cfg), scores, atol=1e-3)


def test_greedy_coreset_bank_still_scores():
    bank = tokens(6, 4)
    cfg = DetectConfig(radii=(1,), knn="exact", bank_max_patches=20)
    scores = bank_scores(tokens(2, 5), bank, np.array([-1, -1]), cfg)
    full = bank_scores(tokens(2, 5), bank, np.array([-1, -1]), dataclasses.replace(cfg, bank_max_patches=10**6))
    assert np.isfinite(scores).all() and (scores >= full - 1e-6).all()  # a subset is never nearer


def test_rescore_smooths_over_cls_neighbours():
    scores = np.array([0.0, 1.0, 0.5, 0.25])
    cls = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1]], np.float32)
    assert np.allclose(rescore(scores, cls, (1,)), scores)  # a window of one: itself, min-max normalised
    two = rescore(scores, cls, (2,))
    assert abs(two[0] - two[1]) < 0.01 and abs(two[2] - two[3]) < 0.01  # averaged with the near twin
    assert np.array_equal(rescore(scores, cls, ()), scores)


def test_reference_sample_is_seeded_and_stratified():
    types = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    ref = reference_sample(types, 10, seed=0)
    assert np.array_equal(ref, reference_sample(types, 10, seed=0))
    assert not np.array_equal(ref, reference_sample(types, 10, seed=1))
    assert [sum(types[i] == t for i in ref) for t in "abc"] == [5, 3, 2]
    assert np.array_equal(reference_sample(types, 0, seed=0), np.arange(100))
    parts = stratified_subsets(types, 30, seed=0)
    assert len(parts) == 4 and sorted(np.concatenate(parts).tolist()) == list(range(100))
    assert all(sum(types[i] == "c" for i in p) == 5 for p in parts)


def _features(ids: list[str], seed: int) -> Features:
    rng = np.random.default_rng(seed)
    n = len(ids)
    return Features(ids, tokens(n, seed), rng.normal(size=(n, 8)).astype(np.float32), np.full((n, 2), 40))


def _rows(category: str, n: int, typ: str = "x") -> list[dict]:
    return [dict(image_id=f"{category}/{typ}/{i}", image_uri=f"/nowhere/{i}.png", category=category, gt_type=typ,
                 gt_mask_uri="") for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_small_categories_give_finite_maps(n):
    rows = _rows("c", n)
    job = plan_detection(rows, DetectConfig(mode="zero_shot"))[0]
    res = detect_category(job, _features([r["image_id"] for r in rows], n), DetectConfig(radii=(1, 3)))
    assert np.isfinite(res.patch_maps).all() and np.isfinite(res.scores).all()
    assert res.patch_maps.min() > 0


def test_one_image_category_is_a_clear_error():
    rows = _rows("big", 5) + _rows("lonely", 1)
    with pytest.raises(DataError, match=r"category 'lonely' has 1 image.*at least 2"):
        plan_detection(rows, DetectConfig())
    with pytest.raises(DataError, match="few_shot: category 'big' has no normal images"):
        plan_detection(_rows("big", 5), DetectConfig(mode="few_shot"))


def test_subsets_do_not_change_the_scores():
    rows = _rows("c", 9, "a") + _rows("c", 5, "b")
    feats = _features([r["image_id"] for r in rows], 7)
    cfg = DetectConfig(radii=(1,), reference_images=6, subset_size=0)
    job = plan_detection(rows, cfg)[0]
    whole = detect_category(job, feats, cfg)
    split = detect_category(job, feats, dataclasses.replace(cfg, subset_size=4))
    np.testing.assert_array_equal(whole.patch_maps, split.patch_maps)
    np.testing.assert_array_equal(whole.scores, split.scores)


def test_auto_mode_uses_the_layouts_normal_class_as_bank():
    rows = _rows("c", 4, "good") + _rows("c", 3, "dent")
    job = plan_detection(rows, DetectConfig())[0]
    assert job.mode == "few_shot" and len(job.normals) == 4 and len(job.images) == 7
    assert plan_detection(rows, DetectConfig(mode="zero_shot"))[0].mode == "zero_shot"


def _detect_cfg(root, out, *extra):
    return load_config(None, [f"data.root={root}", f"output={out}", *TINY_DETECT, *extra])


def test_detect_writes_maps_the_catalog_pairs_and_is_deterministic(demo_root, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = _detect_cfg(demo_root, tmp_path / name, "detect.mode=zero_shot", "detect.subset_size=5")
        table = detect_local(cfg, model_kwargs=TINY)
        runs.append(table)
    a, b = runs
    assert a.column("score").to_pylist() == b.column("score").to_pylist()
    maps_a = tmp_path / "a" / "maps"
    for uri in a.column("map_uri").to_pylist()[:5]:
        rel = uri[len(str(maps_a)):]
        assert (maps_a / rel.lstrip("/")).read_bytes() == (tmp_path / "b" / "maps" / rel.lstrip("/")).read_bytes()
    # discover's catalog pairs every image with its map, and maps are per-category 8-bit at the image size
    manifest = build_manifest(DataConfig(root=str(demo_root), maps=str(maps_a)))
    assert manifest.num_rows == a.num_rows == len(catalog_images(DataConfig(root=str(demo_root))))
    for cat in ("fabric", "plate"):
        maps = [io.read_map(u) for u, c in zip(a.column("map_uri").to_pylist(), a.column("category").to_pylist())
                if c == cat]
        assert all(m.dtype == np.uint8 and m.shape == (96, 96) for m in maps)
        assert max(int(m.max()) for m in maps) >= 250 and min(int(m.min()) for m in maps) <= 5
    assert (tmp_path / "a" / "maps" / "image_scores.parquet").is_file()


def test_write_detector_maps_for_the_mtd_layout(tmp_path):
    """The benchmark's entry point: MTD-style rows -> maps ``catalog_mtd`` reads."""
    from ncd.data.catalog import catalog_mtd_images

    rng = np.random.default_rng(0)
    for typ, n in (("MT_Free", 3), ("MT_Crack", 3)):
        folder = tmp_path / "mtd" / typ / "Imgs"
        folder.mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(folder / f"img{i}.jpg"), rng.integers(0, 255, (40, 56), np.uint8))
            cv2.imwrite(str(folder / f"img{i}.png"), np.zeros((40, 56), np.uint8))
    rows = catalog_mtd_images(str(tmp_path / "mtd"))
    detect = load_config(None, TINY_DETECT).detect
    table = write_detector_maps(rows, str(tmp_path / "maps"), detect, model_kwargs=TINY)
    assert set(table.column("mode").to_pylist()) == {"few_shot"}  # MT_Free is a normal type
    manifest = build_manifest(DataConfig(layout="mtd", root=str(tmp_path / "mtd"), maps=str(tmp_path / "maps")))
    assert manifest.num_rows == 6
    assert io.read_map(manifest.column("map_uri")[0].as_py()).shape == (40, 56)


def test_cli_detect_local_and_its_one_line_error(demo_root, tmp_path, capsys):
    from ray_jobs.cli import main

    tiny = ["--set", "detect.backbone=vit_tiny_patch16_224", "--set", "detect.weights=random", "--set",
            "detect.image_size=32", "--set", "detect.blocks=1,3", "--set", "detect.radii=1"]
    assert main(["detect", "--local", "--images", str(demo_root), "--out", str(tmp_path / "maps"),
                 "--set", "data.categories=plate", *tiny]) == 0
    assert "maps (few_shot)" in capsys.readouterr().out  # the demo's good images form the bank
    assert len(list((tmp_path / "maps" / "plate").rglob("*.png"))) > 0
    lonely = tmp_path / "lonely" / "images" / "solo" / "dent"
    lonely.mkdir(parents=True)
    cv2.imwrite(str(lonely / "a.png"), np.zeros((20, 20, 3), np.uint8))
    assert main(["detect", "--local", "--images", str(tmp_path / "lonely"), "--out", str(tmp_path / "m2"), *tiny]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "category 'solo' has 1 image" in err
    assert not (tmp_path / "m2").exists()  # refused before any work


def test_bad_detect_settings_are_listed_before_any_work():
    from ncd.config import ConfigError

    with pytest.raises(ConfigError, match=r"detect\.mode='fast'.*detect\.radii=\[2\].*detect\.reference_images=1"):
        plan_detection(_rows("c", 3), DetectConfig(mode="fast", radii=(2,), reference_images=1))


def test_feature_precision_follows_detect_amp():
    """bf16 features where the CPU computes bf16 natively (float32 with ``detect.amp=false``),
    equal to the float32 ones to bf16's precision."""
    from ncd.detect.features import PatchFeatureExtractor
    from ncd.model.precision import uses_bf16

    images = [np.random.default_rng(i).integers(0, 255, (40, 48, 3), np.uint8) for i in range(3)]
    out = {}
    for amp in (True, False):
        detect = load_config(None, [*TINY_DETECT, f"detect.amp={str(amp).lower()}"]).detect
        extractor = PatchFeatureExtractor(detect, device="cpu", model_kwargs=TINY)
        assert extractor.half == (amp and uses_bf16("cpu", True))
        out[amp] = extractor(images)
    (layers16, cls16), (layers32, cls32) = out[True], out[False]
    assert layers16.shape == layers32.shape and cls16.shape == cls32.shape
    np.testing.assert_allclose(cls16, cls32, atol=0.1)
    cos = (cls16 * cls32).sum(1) / (np.linalg.norm(cls16, axis=1) * np.linalg.norm(cls32, axis=1))
    assert cos.min() > 0.99
    assert (uses_bf16("cpu", True)) == (not np.array_equal(cls16, cls32))
