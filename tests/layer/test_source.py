"""Tile sources: a layer file and a dataset folder of the same tiles read, list parts, report
CRS and bounds, and write back alike; open_source tells them apart; copy_layer copies a file."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import shapely
from affine import Affine
from conftest import write_raster

import hqrs_geo as hg
from hqrs_geo.errors import InputError, OptionError
from hqrs_geo.layer import (
    DatasetSource,
    FileSource,
    TilePart,
    TileSource,
    copy_layer,
    new_run,
    open_source,
    read_runs,
    read_tiles,
)
from hqrs_geo.layer.columns import TILE_COLUMNS

CONFIG = hg.TileConfig(tile_size=64)
FORMATS = (".gpkg", ".parquet", ".fgb")


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """Two scenes tiled into a dataset folder and into each layer file format."""
    folder = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(7)
    a = write_raster(folder / "a.tif", rng.integers(0, 255, (3, 192, 256), dtype=np.uint8))
    b = write_raster(folder / "b.tif", rng.integers(0, 255, (3, 128, 128), dtype=np.uint8),
                     transform=Affine(0.5, 0, 500200, 0, -0.5, 3999900))
    out = {"dataset": folder / "ds"}
    hg.tile([str(a), str(b)], f"{out['dataset']}/", CONFIG)
    for suffix in FORMATS:
        out[suffix] = folder / f"tiles{suffix}"
        hg.tile([str(a), str(b)], out[suffix], CONFIG)
    return out


def _plain(frame) -> pd.DataFrame:
    """The tile columns and footprints (as WKB) of a frame, ordered by tile id."""
    frame = frame.sort_values("tile_id").reset_index(drop=True)
    plain = pd.DataFrame(frame[list(TILE_COLUMNS)])
    plain["wkb"] = shapely.to_wkb(shapely.normalize(frame.geometry.values), hex=True)
    return plain


def test_open_source_tells_files_from_datasets(layers):
    dataset = open_source(layers["dataset"])
    assert isinstance(dataset, DatasetSource) and dataset.partitioned and isinstance(dataset, TileSource)
    for suffix in FORMATS:
        source = open_source(str(layers[suffix]))
        assert isinstance(source, FileSource) and not source.partitioned and isinstance(source, TileSource)
        assert source.path == str(layers[suffix])


@pytest.mark.parametrize("suffix", FORMATS)
def test_file_and_dataset_read_the_same_tiles(layers, suffix):
    file, dataset = open_source(layers[suffix]), open_source(layers["dataset"])
    whole = dataset.read()
    assert len(whole) == 3 * 4 + 2 * 2  # 256x192 px in 64 px tiles, then 128x128 px
    pd.testing.assert_frame_equal(_plain(file.read()), _plain(whole), check_dtype=False)
    assert file.crs() == dataset.crs() == "EPSG:32633"
    assert file.bounds() == pytest.approx(dataset.bounds())
    assert dataset.bounds() == pytest.approx(tuple(whole.total_bounds))
    assert [r["command"] for r in file.runs()] == ["tile"]
    assert file.runs()[0]["params"]["scenes"] and set(dataset.runs().scenes()) == set(file.runs().scenes())


def test_parts_of_a_dataset_add_up_to_the_whole_and_a_file_is_one_part(layers):
    dataset, file = open_source(layers["dataset"]), open_source(layers[".gpkg"])
    parts = dataset.parts()
    assert [p.name for p in parts] == ["a.parquet", "b.parquet"]
    assert all(isinstance(p, TilePart) for p in parts)
    pieces = pd.concat([_plain(p.read()) for p in parts], ignore_index=True)
    pd.testing.assert_frame_equal(pieces, _plain(dataset.read()), check_dtype=False)
    [only] = file.parts()
    assert only.name == "tiles.gpkg" and only.path == str(layers[".gpkg"])
    pd.testing.assert_frame_equal(_plain(only.read()), _plain(file.read()), check_dtype=False)
    columns = parts[0].read(columns=["tile_id", "valid_fraction"])
    assert list(columns.columns) == ["tile_id", "valid_fraction", "geometry"]
    assert list(only.read(columns=["tile_id"]).columns) == ["tile_id", "geometry"]
    with pytest.raises(InputError, match="has no column 'nope'"):
        parts[0].read(columns=["nope"])
    with pytest.raises(InputError, match="has no column 'nope'"):
        only.read(columns=["nope"])


@pytest.mark.parametrize("crs", [None, "EPSG:4326"])
def test_a_box_selects_the_same_tiles_from_a_file_a_dataset_and_a_part(layers, crs):
    box = (500010.0, 3999910.0, 500070.0, 3999950.0)  # in the layers' UTM zone
    reference = read_tiles(layers[".parquet"])
    expected = sorted(reference.tile_id[reference.geometry.intersects(shapely.box(*box))])
    query = box
    if crs is not None:
        from pyproj import Transformer

        query = Transformer.from_crs("EPSG:32633", crs, always_xy=True).transform_bounds(*box)
        grown = Transformer.from_crs(crs, "EPSG:32633", always_xy=True).transform_bounds(*query, densify_pts=21)
        expected = sorted(reference.tile_id[reference.geometry.intersects(shapely.box(*grown))])
    assert expected and len(expected) < len(reference)
    for source in (open_source(layers[".gpkg"]), open_source(layers["dataset"])):
        assert sorted(source.read(query, crs).tile_id) == expected
    parts = open_source(layers["dataset"]).parts()
    assert sorted(t for p in parts for t in p.read(bbox=query, bbox_crs=crs).tile_id) == expected
    with pytest.raises(OptionError, match="is not a box"):
        open_source(layers[".gpkg"]).read((1, 2, 0, 3))


@pytest.mark.parametrize("kind", [".fgb", "dataset"])
def test_write_through_a_source_adds_a_column_and_a_run(layers, tmp_path, kind):
    if kind == "dataset":
        import shutil

        target = tmp_path / "ds"
        shutil.copytree(layers["dataset"], target)
    else:
        target = tmp_path / "tiles.fgb"
        copy_layer(layers[kind], target)
    source = open_source(target)
    frame = source.read()
    frame["caption"] = [f"tile {i}" for i in range(len(frame))]
    source.write(frame, new_run("caption", "tiles", {}))
    back = open_source(target).read()
    assert back.caption.tolist() == [f"tile {i}" for i in range(len(back))]
    assert [r["command"] for r in read_runs(target)] == ["tile", "caption"]


def test_copy_layer_copies_the_sidecar_of_a_flatgeobuf(layers, tmp_path):
    copy_layer(layers[".fgb"], tmp_path / "copy.fgb")
    sidecar = tmp_path / "copy.fgb.hqrs.json"
    assert json.loads(sidecar.read_text())[0]["command"] == "tile"
    assert (tmp_path / "copy.fgb").read_bytes() == layers[".fgb"].read_bytes()
    pd.testing.assert_frame_equal(_plain(read_tiles(tmp_path / "copy.fgb")), _plain(read_tiles(layers[".fgb"])),
                                  check_dtype=False)


def test_open_source_refuses_what_is_not_a_tile_layer_in_one_line(layers, tmp_path):
    cases = {tmp_path / "missing.gpkg": "file not found", tmp_path: "folder without _manifest.json",
             tmp_path / "scene.tif": "not a tile layer"}
    for path, fragment in cases.items():
        with pytest.raises(InputError, match=fragment) as error:
            open_source(path)
        assert "\n" not in str(error.value)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "_manifest.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        open_source(broken)
