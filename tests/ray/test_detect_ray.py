"""``ncd detect`` on Ray Data actors and Ray tasks equals the in-process path."""
from __future__ import annotations

import pytest

from ncd.config import load_config
from ncd.detect import detect_local

pytestmark = pytest.mark.ray

TINY = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2)


def test_ray_detect_equals_local(demo_root, ray_local, tmp_path):
    from ray_jobs.detect import run_detect

    def cfg(name):
        return load_config(None, [f"data.root={demo_root}", f"detect.output={tmp_path / name}", "detect.weights=random",
                                  "detect.backbone=vit_tiny_patch16_224", "detect.image_size=32", "detect.blocks=1,3",
                                  "detect.radii=1,3", "detect.subset_size=7", "detect.batch_size=5",
                                  "detect.mode=zero_shot"])

    seen = []
    on_ray = run_detect(cfg("ray"), num_actors=2, progress=lambda *a: seen.append(a), model_kwargs=TINY)
    local = detect_local(cfg("local"), model_kwargs=TINY)
    assert on_ray.column("image_id").to_pylist() == local.column("image_id").to_pylist()
    assert on_ray.column("score").to_pylist() == local.column("score").to_pylist()
    for rel in ("plate/hole", "fabric/good"):
        for path in sorted((tmp_path / "local" / rel).iterdir()):
            assert (tmp_path / "ray" / rel / path.name).read_bytes() == path.read_bytes()
    assert ("features", on_ray.num_rows, on_ray.num_rows) in seen and any(s[0] == "score" for s in seen)
