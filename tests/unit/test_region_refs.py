"""Light region tables: the small columns in the driver, the crops read from storage on demand."""
import pyarrow.compute as pc
import pytest

from ncd.config import load_config
from ncd.data.catalog import build_manifest
from ncd.data.io import DataError
from ncd.data.region_refs import HEAVY_COLUMNS, full_rows, is_light, light_regions, read_rows, source_of
from ncd.data.region_table import read_regions, write_regions
from ncd.preprocess.regions import preprocess_manifest


@pytest.fixture(scope="module")
def stored(demo_root, tmp_path_factory):
    cfg = load_config("ncd/configs/demo_smoke.yaml", [f"data.root={demo_root}"])
    table = preprocess_manifest(build_manifest(cfg.data), cfg.mebin, cfg.crop, cfg.data)
    return write_regions(table, str(tmp_path_factory.mktemp("refs")))


def test_light_table_holds_no_crops_and_names_its_source(stored):
    full = read_regions(stored)
    light = light_regions(stored)
    assert is_light(light) and not is_light(full)
    assert not set(HEAVY_COLUMNS) & set(light.column_names)
    assert light.column("region_id").to_pylist() == full.column("region_id").to_pylist()  # canonical order
    assert light.nbytes < full.nbytes / 3
    part = light.filter(pc.equal(light.column("category"), "plate")).take([3, 0, 2])
    assert source_of(part) == stored  # subsets keep their source


def test_full_rows_of_a_subset_equal_the_stored_rows_in_its_order(stored):
    full = read_regions(stored)
    light = light_regions(stored)
    picked = [5, 1, light.num_rows - 1, 2]
    rows = full_rows(light.take(picked))
    assert rows.equals(full.take(picked))
    assert full_rows(full) is full
    only = read_rows(stored, [full.column("region_id")[4].as_py()], columns=["crop_png"])
    assert only.column_names == ["region_id", "crop_png"] and only.column("crop_png")[0] == full.column("crop_png")[4]


def test_unknown_rows_and_sourceless_light_tables_are_clear_errors(stored):
    with pytest.raises(DataError, match="'nope' is not in the region table"):
        read_rows(stored, ["nope"])
    bare = light_regions(stored).replace_schema_metadata(None)
    with pytest.raises(DataError, match="without its source URI"):
        full_rows(bare)
