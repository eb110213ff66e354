"""What preprocessing found wrong with the input, for the summary and the report.

Two degenerate cases change results without failing: images whose MEBin mask is empty
(an all-constant map, or one whose values stay below its category's range) have no
defect region, so they are dropped and counted here; a map whose peak is an outlier
among its category's peaks (a saturated map, an all-zero one) sets the MEBin search
range of every image in the category, so it is flagged (``mebin.exclude_outliers``
leaves it out of the range). The outliers come from the region table's completion
records (``ncd.data.region_table``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pyarrow as pa

from ncd.data.region_table import read_completion

EXAMPLES = 5  # image ids named in a note


def input_checks(manifest: pa.Table, regions: pa.Table, regions_uri: str, s3: Any = None) -> dict[str, Any]:
    """``images_without_regions`` (count), ``empty_images`` (their ids, sorted) and
    ``mebin_outliers`` ({category: {"outliers": [[image_id, peak], ...], "median_peak",
    "excluded"}} for the categories with outlier maps)."""
    empty = sorted(set(manifest.column("image_id").to_pylist()) - set(regions.column("image_id").to_pylist()))
    outliers = {}
    for category in sorted(set(manifest.column("category").to_pylist())):
        record = read_completion(regions_uri, category, s3) or {}
        rng = record.get("range") or {}
        if rng.get("outliers"):
            outliers[category] = {"outliers": [list(o) for o in rng["outliers"]],
                                  "median_peak": rng.get("median_peak"), "excluded": bool(rng.get("excluded"))}
    return {"images_without_regions": len(empty), "empty_images": empty, "mebin_outliers": outliers}


def _ids(ids: Sequence[str]) -> str:
    return ", ".join(ids[:EXAMPLES]) + (f" and {len(ids) - EXAMPLES} more" if len(ids) > EXAMPLES else "")


def input_notes(checks: Mapping[str, Any], images: int) -> list[str]:
    """One sentence per finding of ``input_checks`` (empty when there is none)."""
    notes = []
    if checks["images_without_regions"]:
        notes.append(f"{checks['images_without_regions']} of {images} images have an empty MEBin mask (an "
                     f"all-constant map, or one below its category's range): no defect region, so they are not "
                     f"labelled or scored ({_ids(checks['empty_images'])}).")
    for category, info in checks["mebin_outliers"].items():
        maps = [f"{image_id} (peak {peak:g})" for image_id, peak in info["outliers"]]
        action = ("left out of the range (mebin.exclude_outliers)" if info["excluded"]
                  else "it sets the range of every image of the category; mebin.exclude_outliers=true leaves it out")
        notes.append(f"{category}: {len(maps)} anomaly map(s) with an outlier peak (median peak "
                     f"{info['median_peak']:g}): {_ids(maps)}; {action}.")
    return notes
