"""A job's input resolved once at the entry (``resolve_input``) and the jobs that work on it:
rasters stay rasters, a layer file or dataset folder becomes its tile source, and the model job
refuses impossible combinations with one-line errors before any model is loaded."""
from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
from conftest import write_raster

from hqrs_geo.engine.jobs import model_job, model_plan, tile_job
from hqrs_geo.engine.partitioned import DatasetReport, ScaleOptions
from hqrs_geo.errors import InputError, OptionError
from hqrs_geo.layer.io import read_tiles
from hqrs_geo.raster.catalog import SourceFilter
from hqrs_geo.tiling.config import TileConfig
from hqrs_geo.tiling.inputs import Rasters, as_list, resolve_input

CONFIG = TileConfig(tile_size=100)
NO_SUCH_MODEL = model_plan("embed", ["no-such-model"])  # any model loading fails: the checks come first


@pytest.fixture
def scene(tmp_path):
    data = np.random.default_rng(7).integers(1, 255, size=(3, 200, 300), dtype=np.uint8)
    return write_raster(tmp_path / "scene.tif", data)


def test_rasters_stay_rasters_with_their_filter(scene, tmp_path):
    flt = SourceFilter(asset="visual")
    resolved = resolve_input([scene, str(tmp_path / "b.tif")], flt)
    assert resolved == Rasters([str(scene), str(tmp_path / "b.tif")], flt)
    assert resolve_input(scene).scenes() == [str(scene)]  # no filter: the items as given
    assert as_list(scene) == [str(scene)]


def test_a_layer_file_and_a_dataset_become_their_tile_source(scene, tmp_path):
    layer, folder = tmp_path / "tiles.parquet", tmp_path / "tiles"
    frame = tile_job(Rasters([str(scene)]), layer, CONFIG)
    report = tile_job(Rasters([str(scene)]), f"{folder}/", CONFIG)
    assert isinstance(frame, gpd.GeoDataFrame) and len(frame) == 6
    assert isinstance(report, DatasetReport) and report.tiles == 6
    file_source, dataset_source = resolve_input(layer), resolve_input([folder])
    assert not file_source.partitioned and file_source.path == str(layer)
    assert dataset_source.partitioned and dataset_source.path == str(folder)
    assert sorted(file_source.read()["tile_id"]) == sorted(dataset_source.read()["tile_id"])


def test_a_missing_layer_is_one_line_and_a_plain_folder_is_rasters(tmp_path):
    with pytest.raises(InputError, match="gone.gpkg: file not found") as caught:
        resolve_input(tmp_path / "gone.gpkg")
    assert "\n" not in str(caught.value)
    (tmp_path / "scenes").mkdir()
    assert resolve_input(tmp_path / "scenes") == Rasters([str(tmp_path / "scenes")])  # a folder of rasters


def test_model_job_checks_before_loading_models(scene, tmp_path):
    layer, folder = tmp_path / "tiles.gpkg", tmp_path / "tiles"
    tile_job(Rasters([str(scene)]), layer, CONFIG)
    tile_job(Rasters([str(scene)]), f"{folder}/", CONFIG)
    ray = ScaleOptions(engine="ray")
    cases = [
        (resolve_input(layer), None, ray, "Ray engine tiles rasters into a dataset folder"),
        (resolve_input(scene), None, None, "name the tile layer to write"),
        (resolve_input(scene), tmp_path / "out.gpkg", ray, "writes a partitioned dataset"),
        (resolve_input(folder), tmp_path / "copy.gpkg", None, "a dataset is updated in place"),
    ]
    for source, output, scale, expected in cases:
        with pytest.raises(OptionError, match=expected):
            model_job(source, output, NO_SUCH_MODEL, CONFIG, scale=scale)
    assert not (tmp_path / "out.gpkg").exists() and not (tmp_path / "copy.gpkg").exists()
    with pytest.raises(OptionError, match="unknown model .no-such-model."):  # the checks passed: now the model
        model_job(resolve_input(layer), tmp_path / "copy.gpkg", NO_SUCH_MODEL)
    assert not (tmp_path / "copy.gpkg").exists()  # models load before the layer is copied
    assert len(read_tiles(layer)) == 6


def test_model_plan_defaults_follow_the_command():
    assert model_plan("embed").embed_models and model_plan("embed").caption_model is None
    assert not model_plan("caption").embed_models and model_plan("caption").caption_model
    run = model_plan("run")
    assert run.embed_models and run.caption_model
    named = model_plan("run", caption_model="x")
    assert named.embed_models == [] and named.caption_model == "x"
