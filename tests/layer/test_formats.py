"""The format modules under the layer facade: each stores the run records its own way, and the
one reader (layer.io.read_runs) reads them back the same; foreign files are one-line errors."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import pytest

from hqrs_geo import TileConfig, tile_rasters
from hqrs_geo.errors import InputError, OutputError
from hqrs_geo.layer.files import read_file_tiles, write_file
from hqrs_geo.layer.flatgeobuf import sidecar_path
from hqrs_geo.layer.gpkg import RUNS_TABLE
from hqrs_geo.layer.io import read_runs, read_tiles
from hqrs_geo.layer.parquet import PARQUET_KEY, read_parquet_runs, stored_runs
from hqrs_geo.layer.runs import new_run

RUNS = [{"run_id": 1, **new_run("tile", "tiles", {"tiling": {"tile_size": 256}, "note": "ünïcode"})}]


@pytest.fixture
def tiles(rgb_raster):
    frame, _ = tile_rasters(rgb_raster, TileConfig(tile_size=256))
    return frame


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet", ".fgb"])
def test_each_format_stores_run_records_where_its_module_says(tmp_path, tiles, suffix):
    path = tmp_path / f"t{suffix}"
    write_file(path, tiles, RUNS)
    if suffix == ".gpkg":
        stored = pyogrio.read_dataframe(path, layer=RUNS_TABLE).to_dict("records")
        stored[0]["params"] = json.loads(stored[0]["params"])
    elif suffix == ".parquet":
        stored = json.loads(pq.read_schema(path).metadata[PARQUET_KEY])
    else:
        stored = json.loads(sidecar_path(path).read_text())
    assert stored == RUNS
    assert list(read_runs(path)) == RUNS
    assert len(read_file_tiles(path)) == len(tiles) == len(read_tiles(path))


def test_foreign_files_are_one_line_errors_and_parts_without_records_have_none(tmp_path, tiles):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), plain)
    assert stored_runs(plain) == [] and list(read_parquet_runs(plain)) == []
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    assert stored_runs(garbage) == []
    for reader in (read_parquet_runs, read_runs, read_tiles):
        with pytest.raises(InputError) as error:
            reader(garbage)
        assert "garbage.parquet" in str(error.value) and "\n" not in str(error.value)
    broken = tmp_path / "t.fgb"
    write_file(broken, tiles, RUNS)
    sidecar_path(broken).write_text("{")
    with pytest.raises(InputError, match="run records are not valid JSON"):
        read_runs(broken)
    with pytest.raises(OutputError, match="unsupported layer format"):
        write_file(tmp_path / "t.shp", tiles, RUNS)
