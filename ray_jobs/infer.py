"""Ray Data batch inference with model actors (the same outputs as the in-process path).

    python -m ray_jobs.infer --model outputs/demo/model.pt --regions outputs/demo/regions --out outputs/infer

Transductive (the training crops) or inductive (a region table preprocessed from new
images + maps): the model file carries its config, class map and selected head.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray
import torch

from ncd import io
from ncd.config import S3Config
from ncd.data import eval_set
from ncd.engine import view_spec
from ncd.method import guide_columns
from ncd.infer import RegionOutputs, forward_regions
from ncd.predict import TrainedModel, load_model, model_from_state, model_state

log = logging.getLogger(__name__)


class RegionPredictor:
    """A Ray Data actor holding one model; maps region batches to features and logits."""

    def __init__(self, state: Any, device: str | None = None) -> None:
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.trained = model_from_state(ray.get(state) if isinstance(state, ray.ObjectRef) else state, dev)
        self.device = torch.device(dev)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        cfg = self.trained.cfg
        out = forward_regions(self.trained.model, eval_set(batch, guide_columns(cfg)), view_spec(cfg),
                              cfg.infer.batch_size,
                              self.device, cfg.train.amp)
        result = {"row": batch.column("row").to_numpy(), "feat": out.feat}
        for h, z in enumerate(out.logits):
            result[f"logits{h}"] = z
        return result


def run_inference(trained: TrainedModel, regions: pa.Table, num_actors: int = 1, use_gpu: bool = False,
                  batch_size: int = 64) -> RegionOutputs:
    """Features and per-head logits of every region, in table order, computed by actors."""
    state_ref = ray.put(model_state(trained))
    columns = ["region_id", "crop_png", "mask_png", *guide_columns(trained.cfg)]
    table = regions.select(columns).append_column("row", pa.array(np.arange(regions.num_rows)))
    ds = ray.data.from_arrow(table).repartition(max(1, min(regions.num_rows // batch_size, 4 * num_actors)))
    out = ds.map_batches(RegionPredictor, fn_constructor_kwargs={"state": state_ref}, batch_size=batch_size,
                         batch_format="pyarrow", concurrency=num_actors, num_gpus=1 if use_gpu else 0,
                         num_cpus=0.5 if not use_gpu else 1)
    rows = out.to_pandas() if regions.num_rows else pd.DataFrame()
    order = np.argsort(rows["row"].to_numpy())
    feat = np.stack(rows["feat"].to_numpy()[order]).astype(np.float32)
    n_head = sum(1 for c in rows.columns if c.startswith("logits"))
    logits = [np.stack(rows[f"logits{h}"].to_numpy()[order]).astype(np.float32) for h in range(n_head)]
    return RegionOutputs(feat=feat, logits=logits)


def main(argv: list[str] | None = None) -> None:
    from ncd.pipeline import write_predictions
    from ncd.predict import head_probabilities, image_predictions, region_predictions
    from ncd.preprocess import read_regions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model.pt written by ncd discover / ncd train")
    parser.add_argument("--regions", required=True, help="region table (ncd preprocess output)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--address", default=None)
    parser.add_argument("--s3-endpoint", default="", help="host:port of an S3-compatible server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    s3 = S3Config(endpoint_override=args.s3_endpoint) if args.s3_endpoint else None
    ray.init(address=args.address, ignore_reinit_error=True)
    trained = load_model(args.model, s3)
    regions = read_regions(args.regions, s3)
    outputs = run_inference(trained, regions, args.num_actors, args.use_gpu)
    cfg = trained.cfg
    probs = head_probabilities(outputs.logits, trained.head, trained.class_map["num_base"], cfg.loss.student_temp)
    write_predictions(args.out, "region_predictions", region_predictions(regions, probs, cfg.infer.unknown_threshold), s3)
    images, _ = image_predictions(regions, probs, cfg.infer.area_temperature, cfg.infer.unknown_threshold)
    write_predictions(args.out, "image_predictions", images, s3)
    print(f"{regions.num_rows} regions, {images.num_rows} images -> {io.join(args.out, 'image_predictions.parquet')}")


if __name__ == "__main__":
    main()
