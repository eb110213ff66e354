"""Ray Data batch inference with model actors (the same outputs as the in-process path).

The region table streams from storage (local or ``s3://`` Parquet, only the columns the
model reads) through the actors; only features and logits come back to the driver.

    python -m ray_jobs.infer --model outputs/demo/model.pt --regions outputs/demo/regions --out outputs/infer

Transductive (the training crops) or inductive (a region table preprocessed from new
images + maps): the model file carries its config, class map and selected head.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
import torch

from ncd.config import S3Config
from ncd.data import io
from ncd.data.io import DataError, StorageError
from ncd.data.region_refs import is_light, source_of, table_parts
from ncd.data.region_table import ORDER_COLUMNS, canonical_order, table_files
from ncd.infer.forward import RegionOutputs
from ncd.infer.outputs import region_outputs
from ncd.infer.predict import TrainedModel, load_model, model_from_state, model_state, warn_unseen_categories
from ncd.methods import guide_columns

log = logging.getLogger(__name__)


ROW = "_row"  # position in an in-memory table, carried through the actors
METADATA_COLUMNS = ("region_id", "image_id", "region_index", "category", "gt_type", "area")  # what predictions need


class RegionPredictor:
    """A Ray Data actor holding one model; maps region batches to features and logits.

    Columns named in ``carry`` pass through unchanged, so the driver can restore the
    table's order from the (unordered) output blocks.
    """

    def __init__(self, state: Any, device: str | None = None, threads: int = 0,
                 carry: tuple[str, ...] = ()) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.trained = model_from_state(ray.get(state) if isinstance(state, ray.ObjectRef) else state, dev)
        self.device = torch.device(dev)
        self.carry = carry

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        cfg = self.trained.cfg
        out = region_outputs(self.trained.model, cfg, batch, self.device)
        result = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in self.carry}
        result["feat"] = out.feat
        for h, z in enumerate(out.logits):
            result[f"logits{h}"] = z
        return result


def input_columns(trained: TrainedModel) -> list[str]:
    """Region-table columns the model reads (crops, masks and this method's guide maps)."""
    return ["region_id", "crop_png", "mask_png", *guide_columns(trained.cfg)]


def _parquet_dataset(uri: str, columns: list[str], s3: S3Config | None) -> tuple[pads.Dataset, Any, list[str]]:
    """The region table at ``uri`` (the files ``table_files`` names) as a pyarrow dataset,
    checked to hold ``columns``."""
    fs, paths = table_files(uri, s3)
    if not paths:
        raise io.DataError(f"{uri} holds no region table parts")
    dataset = pads.dataset(paths, filesystem=fs, format="parquet")
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise io.DataError(f"{uri} is not a region table: missing column(s) {', '.join(missing)}")
    return dataset, fs, paths


def read_region_columns(uri: str, columns: list[str], s3: S3Config | None = None) -> "ray.data.Dataset":
    """A streaming Ray Dataset over ``columns`` of a region table (Parquet file or directory)."""
    _, fs, paths = _parquet_dataset(uri, columns, s3)
    return ray.data.read_parquet(paths, filesystem=fs).select_columns(columns)  # pushed down into the read


def _read_selected(batch: pa.Table, uri: str, columns: list[str], s3: S3Config | None,
                   region_ids: pa.Array) -> pa.Table:
    """The rows of the part files named in ``batch["path"]`` whose region is in
    ``region_ids``, only ``columns``, with their position in ``region_ids`` as ``ROW``."""
    fs, _ = io.filesystem(uri, s3)
    paths = batch.column("path").to_pylist()
    table = pa.concat_tables([pq.read_table(p, filesystem=fs, columns=columns) for p in paths])
    position = pc.index_in(table.column("region_id"), value_set=region_ids)
    keep = pc.is_valid(position)
    return table.filter(keep).append_column(ROW, position.filter(keep).cast(pa.int64()))


def ray_inference(trained: TrainedModel, regions: pa.Table) -> RegionOutputs:
    """``run_inference`` with its defaults and the model's S3 settings (a ``Stages.infer``)."""
    return run_inference(trained, regions, s3=trained.cfg.s3)


def region_metadata(uri: str, s3: S3Config | None = None) -> pa.Table:
    """The small columns of a region table (no crops), in canonical order, read in this process."""
    dataset, _, _ = _parquet_dataset(uri, list(METADATA_COLUMNS), s3)
    table = dataset.to_table(columns=list(METADATA_COLUMNS))
    return canonical_order(table)


def run_inference(trained: TrainedModel, regions: pa.Table | str, num_actors: int = 1, use_gpu: bool = False,
                  batch_size: int = 64, s3: S3Config | None = None,
                  cpus_per_actor: float | None = None) -> RegionOutputs:
    """Features and per-head logits of every region, computed by ``num_actors`` actors.

    ``regions`` is an in-memory table (outputs in its row order; a light table,
    ``ncd.data.region_refs``, has its crops read from its source by the workers) or the URI of a region
    table, local or ``s3://`` (read by the workers, only the columns the model needs;
    outputs in the canonical order ``image_id, region_index``, as ``read_regions``).
    Only the features and logits come back to the driver.
    """
    columns = input_columns(trained)
    if isinstance(regions, str):
        carry = ORDER_COLUMNS
        ds = read_region_columns(regions, [*columns, *carry], s3)
    elif is_light(regions):  # the crops stream from the table's source to the actors, never through here
        if regions.num_rows == 0:
            return RegionOutputs(np.zeros((0, trained.model.feature_dim), np.float32), [])
        categories = sorted(set(regions.column("category").to_pylist()))
        warn_unseen_categories(trained, categories)
        carry = (ROW,)
        uri = source_of(regions)
        _parquet_dataset(uri, columns, s3)  # checks the columns
        _, paths = table_parts(uri, s3, categories)
        # one task per part file, read with pyarrow (Ray's own file listing is not needed here)
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths)).map_batches(
            _read_selected, fn_kwargs={"uri": uri, "columns": columns, "s3": s3,
                                       "region_ids": regions.column("region_id").combine_chunks()},
            batch_format="pyarrow", batch_size=1)
    else:
        if regions.num_rows == 0:
            return RegionOutputs(np.zeros((0, trained.model.feature_dim), np.float32), [])
        warn_unseen_categories(trained, regions.column("category").to_pylist())
        carry = (ROW,)
        ds = ray.data.from_arrow(regions.select(columns).append_column(ROW, pa.array(np.arange(regions.num_rows))))
    cpus = cpus_per_actor if cpus_per_actor is not None else (1.0 if use_gpu else 0.5)
    out = ds.repartition(target_num_rows_per_block=batch_size).map_batches(
        RegionPredictor, batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        fn_constructor_kwargs={"state": ray.put(model_state(trained)), "threads": 0 if use_gpu else max(1, int(cpus)),
                               "carry": carry},
        num_gpus=1 if use_gpu else 0, num_cpus=cpus)
    return _ordered_outputs(list(out.iter_batches(batch_size=None, batch_format="numpy")), carry,
                            trained.model.feature_dim)


def _ordered_outputs(batches: list[dict[str, np.ndarray]], keys: tuple[str, ...], feature_dim: int) -> RegionOutputs:
    """Concatenate actor outputs and sort them by ``keys`` (ascending, as ``pa.Table.sort_by``)."""
    batches = [b for b in batches if len(b["feat"])]
    if not batches:
        return RegionOutputs(np.zeros((0, feature_dim), np.float32), [])
    key_table = pa.table({k: np.concatenate([b[k] for b in batches]) for k in keys})
    order = pc.sort_indices(key_table, sort_keys=[(k, "ascending") for k in keys]).to_numpy()
    feat = np.concatenate([b["feat"] for b in batches])[order].astype(np.float32, copy=False)
    n_head = sum(1 for k in batches[0] if k.startswith("logits"))
    logits = [np.concatenate([b[f"logits{h}"] for b in batches])[order].astype(np.float32, copy=False)
              for h in range(n_head)]
    return RegionOutputs(feat=feat, logits=logits)


def main(argv: list[str] | None = None) -> None:
    from ncd.infer.rejection import prediction_tables
    from ncd.pipeline import write_predictions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model.pt written by ncd discover / ncd train")
    parser.add_argument("--regions", required=True, help="region table (ncd preprocess output)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--address", default=None)
    parser.add_argument("--s3-endpoint", default="", help="host:port of an S3-compatible server")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show Ray's logs")
    args = parser.parse_args(argv)
    from ray_jobs.session import setup_logging, start_ray

    setup_logging(args.verbose)
    s3 = S3Config(endpoint_override=args.s3_endpoint) if args.s3_endpoint else None
    try:  # before starting Ray: a bad model file is one line naming it
        trained = load_model(args.model, s3)
    except (DataError, StorageError, FileNotFoundError) as err:
        raise SystemExit(f"ray_jobs.infer: error: {err}") from None
    start_ray(args.address, s3 or S3Config(), args.verbose)
    regions = region_metadata(args.regions, s3)  # crops stay in storage: the actors stream them
    warn_unseen_categories(trained, regions.column("category").to_pylist())
    outputs = run_inference(trained, args.regions, args.num_actors, args.use_gpu, s3=s3)
    if len(outputs.feat) != regions.num_rows:
        raise RuntimeError(f"inference returned {len(outputs.feat)} rows for {regions.num_rows} regions")
    region_table, images = prediction_tables(trained, regions, outputs)
    write_predictions(args.out, "region_predictions", region_table, s3)
    write_predictions(args.out, "image_predictions", images, s3)
    print(f"{regions.num_rows} regions, {images.num_rows} images -> {io.join(args.out, 'image_predictions.parquet')}")


if __name__ == "__main__":
    main()
