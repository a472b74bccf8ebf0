"""Tile layers: formats, run metadata, updates without duplicates, atomic writes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyogrio
import pytest
from conftest import write_raster

from hqrs_geo import TileConfig, read_runs, read_tiles, tile_rasters, write_tiles
from hqrs_geo.errors import InputError, OutputError
from hqrs_geo.layer.columns import TILE_COLUMNS
from hqrs_geo.layer.runs import new_run


@pytest.mark.parametrize("suffix", [".gpkg", ".parquet", ".fgb"])
def test_round_trip_each_format(tmp_path, rgb_raster, suffix):
    tiles, scenes = tile_rasters(rgb_raster, TileConfig(tile_size=256))
    out = tmp_path / f"tiles{suffix}"
    write_tiles(out, tiles, new_run("tile", "tiles", {"tiling": {"tile_size": 256}}))
    back = read_tiles(out)
    assert list(back.columns[: len(TILE_COLUMNS)]) == list(TILE_COLUMNS)
    tiles = tiles.sort_values("tile_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(
        pd.DataFrame(back.drop(columns="geometry")), pd.DataFrame(tiles.drop(columns="geometry")), check_dtype=False
    )
    assert back.crs.to_epsg() == 32633
    assert all(a.equals_exact(b, 1e-6) for a, b in zip(back.geometry, tiles.geometry))
    runs = read_runs(out)
    assert len(runs) == 1 and runs[0]["command"] == "tile" and runs[0]["params"]["tiling"]["tile_size"] == 256
    assert runs[0]["version"] and runs[0]["created"]


def test_unsupported_format_and_unwritable(tmp_path, rgb_raster):
    tiles, _ = tile_rasters(rgb_raster, TileConfig(tile_size=256))
    with pytest.raises(OutputError, match="unsupported layer format"):
        write_tiles(tmp_path / "tiles.shp", tiles)
    with pytest.raises(OutputError, match="does not exist"):
        write_tiles(tmp_path / "missing" / "tiles.gpkg", tiles)
    with pytest.raises(InputError, match="not an hqrs_geo tile layer"):
        pyogrio.write_dataframe(tiles.drop(columns="tile_id"), tmp_path / "other.gpkg", layer="tiles")
        read_tiles(tmp_path / "other.gpkg")


def test_rerun_updates_without_duplicates_and_keeps_results(tmp_path, rng):
    a = write_raster(tmp_path / "a.tif", rng.integers(0, 255, (3, 512, 512), dtype=np.uint8))
    b = write_raster(tmp_path / "b.tif", rng.integers(0, 255, (3, 256, 256), dtype=np.uint8))
    out = tmp_path / "tiles.gpkg"
    ta, _ = tile_rasters(a, TileConfig(tile_size=256))
    write_tiles(out, ta, new_run("tile", "tiles", {}))
    layer = read_tiles(out)
    layer["caption"] = [f"caption {i}" for i in range(len(layer))]  # a later stage's column
    write_tiles(out, layer, new_run("caption", "tiles", {}))
    tb, _ = tile_rasters(b, TileConfig(tile_size=256))
    write_tiles(out, tb, new_run("tile", "tiles", {}))
    again, _ = tile_rasters(a, TileConfig(tile_size=256))
    write_tiles(out, again, new_run("tile", "tiles", {}))
    final = read_tiles(out)
    assert len(final) == 5 and final.tile_id.is_unique
    assert final.set_index("tile_id").loc[ta.tile_id, "caption"].tolist() == [f"caption {i}" for i in range(4)]
    assert [r["run_id"] for r in read_runs(out)] == [1, 2, 3, 4]
    # a different grid for scene a replaces its tiles and drops results made for the old windows
    smaller, _ = tile_rasters(a, TileConfig(tile_size=128))
    write_tiles(out, smaller, new_run("tile", "tiles", {}))
    final = read_tiles(out)
    assert len(final) == 16 + 1 and final.tile_id.is_unique
    assert final[final.source == str(a)].caption.isna().all()


def test_interrupted_write_leaves_previous_file(tmp_path, rgb_raster, monkeypatch):
    tiles, _ = tile_rasters(rgb_raster, TileConfig(tile_size=256))
    out = tmp_path / "tiles.gpkg"
    write_tiles(out, tiles, new_run("tile", "tiles", {}))
    before = out.read_bytes()
    original = pyogrio.write_dataframe
    calls = []

    def crash_on_second_table(df, path, **kw):
        calls.append(path)
        original(df, path, **kw)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed after the tiles layer, before the run table

    monkeypatch.setattr(pyogrio, "write_dataframe", crash_on_second_table)
    bigger, _ = tile_rasters(rgb_raster, TileConfig(tile_size=128))
    with pytest.raises(KeyboardInterrupt):
        write_tiles(out, bigger, new_run("tile", "tiles", {}))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rgb.tif", "tiles.gpkg"]


def test_empty_layer_is_valid(tmp_path):
    path = write_raster(tmp_path / "empty.tif", np.zeros((3, 64, 64), np.uint8), nodata=0)
    tiles, _ = tile_rasters(path, TileConfig(tile_size=32))
    out = tmp_path / "empty.gpkg"
    write_tiles(out, tiles, new_run("tile", "tiles", {}))
    back = read_tiles(out)
    assert len(back) == 0 and back.crs.to_epsg() == 32633
    assert dict(pyogrio.list_layers(out))["tiles"] == "Polygon"
