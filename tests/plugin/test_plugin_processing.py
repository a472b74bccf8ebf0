"""Processing in real, headless QGIS, beyond one algorithm at a time: any raster layer within an
extent (a file, and an XYZ layer served on 127.0.0.1 from real imagery tiles), the settings
reaching the engine, searches reusing one session, outputs loaded with a name and a style."""
from __future__ import annotations

import json
import math
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import rasterio
from conftest import EXAMPLE_SCENE
from qgis.core import (
    QgsApplication,
    QgsProcessingContext,
    QgsProcessingOutputLayerDefinition,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import Qt
from qgis_fixtures import (  # noqa: F401  (fixtures)
    SCENE_BOUNDS,
    Recorder,
    TileHandler,
    embedded_example,
    extent_string,
    no_installed_engine,
    processing_run,
    xyz_server,
)
from tiny_models import TINY_CLIP

from qgis_plugin.core import sessions, settings  # noqa: E402
from qgis_plugin.processing.algorithms import CUSTOM_MODEL  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning:qgis_plugin", "error::ResourceWarning")


def test_xyz_layer_within_an_extent_is_written_at_a_ground_resolution_then_tiled(processing_run, xyz_server, tmp_path):
    url = f"{xyz_server}/{{z}}/{{x}}/{{y}}.png"
    xyz = QgsRasterLayer(f"type=xyz&url={url}&zmin=0&zmax=21", "river photo (XYZ)", "wms")
    assert xyz.isValid() and xyz.providerType() == "wms"
    QgsProject.instance().addMapLayer(xyz)
    out = tmp_path / "web" / "tiles.gpkg"
    out.parent.mkdir()
    feedback = Recorder()
    x0, y0, x1, y1 = SCENE_BOUNDS
    try:
        result = processing_run("hqrs:tile", {
            "INPUT": xyz.id(), "EXTENT": extent_string(x0 + 50, y0 + 50, x1 - 50, y1 - 50), "RESOLUTION": 0.5,
            "TILE_SIZE_M": 50, "OUTPUT": str(out)}, feedback=feedback)
    finally:
        QgsProject.instance().removeMapLayer(xyz.id())
    written = list(out.parent.glob("river_photo_XYZ_0.5m_*.tif"))
    assert len(written) == 1 and TileHandler.requests > 0
    with rasterio.open(written[0]) as src:
        assert src.crs.to_epsg() == 32631 and src.count >= 3  # the UTM zone of the extent: ground metres
        # 150 m of RD New (slightly more as a UTM bounding box) at 0.5 m per pixel on the ground
        assert 300 <= src.width <= 320 and 300 <= src.height <= 320 and abs(src.res[0] - 0.5) < 0.01
        expected_tiles = math.ceil(src.width * src.res[0] / 50) * math.ceil(src.height * src.res[1] / 50)
        pixels = src.read([1, 2, 3])
    assert pixels.std() > 20  # real imagery, not an empty canvas
    with rasterio.open(EXAMPLE_SCENE) as scene:
        original = scene.read([1, 2, 3], window=scene.window(x0 + 50, y0 + 50, x1 - 50, y1 - 50))
    assert abs(float(pixels[pixels > 0].mean()) - float(original.mean())) < 15
    layer = QgsVectorLayer(result["OUTPUT"], "tiles", "ogr")
    assert layer.isValid() and layer.featureCount() == expected_tiles  # 50 m tiles (ground metres)
    assert {str(f["source"]) for f in layer.getFeatures()} == {str(written[0])}
    assert any("at 0.5 m per pixel" in info for info in feedback.infos)


def test_file_raster_within_an_extent_reads_only_that_window(processing_run, tmp_path):
    scene = Path(shutil.copy(EXAMPLE_SCENE, tmp_path / "scene.tif"))
    x0, y0, x1, y1 = SCENE_BOUNDS
    out = tmp_path / "out" / "part.gpkg"
    out.parent.mkdir()
    feedback = Recorder()
    result = processing_run("hqrs:tile", {"INPUT": str(scene), "EXTENT": extent_string(x0, y0, x0 + 125, y0 + 125),
                                          "TILE_SIZE": 250, "OUTPUT": str(out)}, feedback=feedback)
    vrt = out.parent / "scene_x0_y500_500x500.vrt"  # the bottom-left quarter of the 1000 px scene
    assert vrt.is_file()
    layer = QgsVectorLayer(result["OUTPUT"], "tiles", "ogr")
    assert layer.featureCount() == 4 and {str(f["source"]) for f in layer.getFeatures()} == {str(vrt)}
    extent = layer.extent()
    assert abs(extent.xMinimum() - x0) < 1e-6 and abs(extent.yMinimum() - y0) < 1e-6
    assert abs(extent.xMaximum() - (x0 + 125)) < 1e-6
    assert any(t == "tiling: 4 / 4 tiles" for t in feedback.texts)
    # an extent covering the whole raster reads the file itself; one beside it is refused
    around = extent_string(x0 - 10, y0 - 10, x1 + 10, y1 + 10)
    whole = processing_run("hqrs:tile", {"INPUT": str(scene), "EXTENT": around,
                                         "TILE_SIZE": 500, "OUTPUT": str(tmp_path / "whole.gpkg")})
    assert {str(f["source"]) for f in QgsVectorLayer(whole["OUTPUT"], "w", "ogr").getFeatures()} == {str(scene)}
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="does not overlap"):
        processing_run("hqrs:tile", {"INPUT": str(scene), "EXTENT": extent_string(0, 0, 10, 10),
                                     "OUTPUT": str(tmp_path / "none.gpkg")})


@pytest.fixture
def saved_settings():
    before = settings.values()
    yield
    settings.set_values(before)


def test_every_setting_reaches_the_engine(processing_run, saved_settings, tmp_path, tiny_clip_checkpoint):
    settings.set_values({"tile_size": 62.5, "tile_unit": "m", "overlap": 50.0, "device": "cpu", "batch_size": 7,
                         "model": "remoteclip-vit-b-32", "caption_model": "rs-coca", "gsd": 0.0})
    scene = str(shutil.copy(EXAMPLE_SCENE, tmp_path / "scene.tif"))
    feedback = Recorder()
    tiles = processing_run("hqrs:tile", {"INPUT": scene, "OUTPUT": str(tmp_path / "t.gpkg")}, feedback=feedback)
    assert "--tile-size 62.5m" in feedback.commands[-1] and "--overlap 50%" in feedback.commands[-1]
    assert QgsVectorLayer(tiles["OUTPUT"], "t", "ogr").featureCount() == 49  # 62.5 m tiles every 31.25 m: 7 x 7
    registry = QgsApplication.processingRegistry()
    embed = registry.createAlgorithmById("hqrs:embed")
    assert embed.parameterDefinition("MODEL").defaultValue() == "remoteclip-vit-b-32"
    run = registry.createAlgorithmById("hqrs:run")
    assert run.parameterDefinition("CAPTION_MODEL").defaultValue() == "rs-coca"
    assert run.parameterDefinition("OUTPUT").createByDefault()  # "Open output file after running" is enabled
    # device and batch size reach a real run (its run record), the model its error
    feedback = Recorder()
    processing_run("hqrs:embed", {"INPUT": tiles["OUTPUT"], "MODEL": CUSTOM_MODEL, "ARCH": TINY_CLIP,
                                  "CHECKPOINT": str(tiny_clip_checkpoint)}, feedback=feedback)
    assert "--device cpu --batch-size 7" in feedback.commands[-1]
    record = json.loads(sqlite3.connect(tmp_path / "t.gpkg").execute(
        "select params from hqrs_runs order by rowid desc limit 1").fetchone()[0])
    assert record["batch_size"] == 7 and record["device"] == "cpu"
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="RemoteCLIP-ViT-B-32.pt"):
        processing_run("hqrs:embed", {"INPUT": tiles["OUTPUT"]})
    # the checkpoint setting: the Processing default, and the dock's sessions of that model
    settings.set_values({"model": "hqrs-mini-clip", "checkpoint": str(tiny_clip_checkpoint)})
    embed = registry.createAlgorithmById("hqrs:embed")
    assert embed.parameterDefinition("CHECKPOINT").defaultValue() == str(tiny_clip_checkpoint)
    key = sessions.session_key("/d/t.gpkg", model="hqrs-mini-clip")
    assert key.checkpoint == str(tiny_clip_checkpoint) and f"--checkpoint={tiny_clip_checkpoint}" in key.argv()
    assert sessions.session_key("/d/t.gpkg", model="remoteclip-vit-b-32").checkpoint == ""


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_clip_checkpoint):
    return embedded_example(tmp_path_factory.mktemp("embedded") / "embedded.gpkg", tiny_clip_checkpoint)


def test_searches_reuse_a_session_and_load_named_styled_results(processing_run, embedded, tmp_path):
    from processing.gui.Postprocessing import handleAlgorithmResults

    sessions.close_all()
    timings, feedbacks = [], []
    for query in ("a river with a bridge", "parking lot"):
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        feedback = Recorder()
        started = time.perf_counter()
        result = processing_run("hqrs:search", {
            "INPUT": str(embedded), "QUERY": query, "K": 4,
            "OUTPUT": QgsProcessingOutputLayerDefinition(str(tmp_path / "hits.gpkg"), QgsProject.instance())},
            context=context, feedback=feedback)
        timings.append(time.perf_counter() - started)
        feedbacks.append(feedback)
        details = context.layersToLoadOnCompletion()[result["OUTPUT"]]
        assert details.name == f'hits: "{query}"' and details.forceName
        alg = QgsApplication.processingRegistry().createAlgorithmById("hqrs:search")
        assert handleAlgorithmResults(alg, context, feedback)
        loaded = QgsProject.instance().mapLayersByName(f'hits: "{query}"')
        assert len(loaded) == 1 and loaded[0].featureCount() == 4
        assert loaded[0].renderer().type() == "graduatedSymbol" and loaded[0].labelsEnabled()
        assert loaded[0].renderer().ranges()[0].symbol().symbolLayer(0).brushStyle() == Qt.NoBrush
        QgsProject.instance().removeMapLayer(loaded[0].id())
    assert any("Loading the model" in info for info in feedbacks[0].infos)
    assert any("Using the running search session" in info for info in feedbacks[1].infos)
    assert len(sessions.running_sessions()) == 1
    assert timings[1] < timings[0]
    print(f"\nProcessing search: first {timings[0]:.2f} s (model loading), second {timings[1]:.3f} s")


def test_tile_outputs_load_as_outlines_with_caption_map_tips(processing_run, tmp_path):
    from processing.gui.Postprocessing import handleAlgorithmResults

    scene = str(shutil.copy(EXAMPLE_SCENE, tmp_path / "scene.tif"))
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    feedback = Recorder()
    typed = QgsProcessingOutputLayerDefinition(str(tmp_path / "typed.gpkg"), QgsProject.instance())  # a typed path
    processing_run("hqrs:tile", {"INPUT": scene, "TILE_SIZE": 500, "OUTPUT": typed}, context=context,
                   feedback=feedback)
    alg = QgsApplication.processingRegistry().createAlgorithmById("hqrs:tile")
    assert handleAlgorithmResults(alg, context, feedback)
    layer = QgsProject.instance().mapLayersByName("tiles: typed")[0]
    try:
        symbol = layer.renderer().symbol()
        assert symbol.symbolLayer(0).brushStyle() == Qt.NoBrush  # outlines: the imagery shows through
        assert '"tile_id"' in layer.mapTipTemplate()
    finally:
        QgsProject.instance().removeMapLayer(layer.id())


def test_cancelled_run_says_which_output_now_exists(processing_run, tmp_path, tiny_clip_checkpoint):
    from qgis.core import QgsProcessingException

    scene = str(shutil.copy(EXAMPLE_SCENE, tmp_path / "scene.tif"))
    out = tmp_path / "all.gpkg"
    feedback = Recorder()
    original = feedback.setProgressText

    def cancel_when_embedding(text):
        original(text)
        if text.startswith("embedding and captioning"):
            feedback.cancel()

    feedback.setProgressText = cancel_when_embedding
    with pytest.raises(QgsProcessingException) as caught:
        processing_run("hqrs:run", {"INPUT": scene, "TILE_SIZE": 125, "OUTPUT": str(out), "EMBED_MODEL": CUSTOM_MODEL,
                                    "EMBED_ARCH": TINY_CLIP, "EMBED_CHECKPOINT": str(tiny_clip_checkpoint),
                                    "DEVICE": "cpu", "BATCH_SIZE": 1, "MAX_LENGTH": 4}, feedback=feedback)
    message = str(caught.value)
    assert message.startswith("cancelled: HQRS Tile, embed and caption stopped")
    # the tile layer was written before the model stage began: the message says so (not "left as before")
    assert out.exists() and str(out) in message and "resumes" in message
