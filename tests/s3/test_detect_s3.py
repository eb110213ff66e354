"""``ncd detect`` with its images and its maps in the bucket (loopback S3 server)."""
from __future__ import annotations

import numpy as np
import pytest

from ncd.config import DataConfig, load_config
from ncd.data import io
from ncd.data.catalog import build_manifest
from ncd.detect import detect_local

pytestmark = pytest.mark.s3

TINY = dict(patch_size=8, embed_dim=32, depth=4, num_heads=2)


def test_detect_reads_and_writes_the_bucket(demo_root, s3_server, s3_prefix, tmp_path, monkeypatch):
    base = s3_prefix[len(f"s3://{s3_server.bucket}/"):]
    data = s3_server.upload_dir(demo_root, f"{base}/data")
    out = io.join(s3_prefix, "out")
    c = s3_server.config
    cfg = load_config(None, [f"data.root={data}", f"output={out}", "data.categories=plate", "detect.weights=random",
                             "detect.backbone=vit_tiny_patch16_224", "detect.image_size=32", "detect.blocks=1,3",
                             "detect.radii=1", "detect.write_npy=true",
                             *(f"s3.{k}={getattr(c, k)}" for k in ("endpoint_override", "scheme", "region",
                                                                    "access_key", "secret_key"))])
    monkeypatch.chdir(tmp_path)
    table = detect_local(cfg, model_kwargs=TINY)
    assert list(tmp_path.iterdir()) == []  # nothing written locally
    keys = s3_server.keys(out)
    pngs = [k for k in keys if k.startswith("maps/plate/") and k.endswith(".png")]
    npys = [k for k in keys if k.startswith("maps_npy/plate/") and k.endswith(".npy")]
    assert len(pngs) == len(npys) == table.num_rows > 0
    assert "maps/image_scores.parquet" in keys and "maps/image_scores.csv" in keys
    assert io.read_table(io.join(out, "maps", "image_scores.parquet"), c).num_rows == table.num_rows
    assert io.read_map(table.column("map_uri")[0].as_py(), c).dtype == np.uint8
    # discover's catalog reads the bucket's maps back, paired with every image
    manifest = build_manifest(DataConfig(root=data, maps=io.join(out, "maps"), categories=("plate",)), c)
    assert manifest.num_rows == table.num_rows
