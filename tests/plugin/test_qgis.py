"""Tile layers open in real QGIS (PyQGIS from Debian) as they are."""
from __future__ import annotations

import pytest
from conftest import EXAMPLE_SCENE, geographic_scene, run_cli
from qgis.core import QgsApplication, QgsFeatureRequest, QgsRasterLayer, QgsVectorLayer

from hqrs_geo import read_tiles


@pytest.fixture(scope="session")
def qgis_app():
    app = QgsApplication.instance() or QgsApplication([], False)  # one application per process
    app.initQgis()
    yield app
    # exitQgis() at interpreter exit can crash some QGIS builds; the process ends anyway


@pytest.mark.parametrize("suffix", [".gpkg", ".fgb"])
@pytest.mark.parametrize("scene, crs_args, authid", [
    (EXAMPLE_SCENE, [], "EPSG:28992"),
    ("geographic", [], "EPSG:4326"),  # R, G, B, alpha in EPSG:4326, like the Swellendam aerials
    (EXAMPLE_SCENE, ["--crs", "EPSG:4326"], "EPSG:4326"),
])
def test_layer_opens_in_qgis(qgis_app, tmp_path, suffix, scene, crs_args, authid):
    scene = geographic_scene() if scene == "geographic" else scene
    out = tmp_path / f"tiles{suffix}"
    result = run_cli("tile", scene, "-o", out, "--tile-size", "128", "-q", *crs_args)
    assert result.returncode == 0, result.stderr
    expected = read_tiles(out)
    uri = f"{out}|layername=tiles" if suffix == ".gpkg" else str(out)
    layer = QgsVectorLayer(uri, "tiles", "ogr")
    assert layer.isValid()
    assert layer.featureCount() == len(expected) > 0
    assert layer.crs().authid() == authid
    names = layer.fields().names()
    for column in ("tile_id", "source", "row", "col", "x_off", "y_off", "width", "height", "valid_fraction", "gsd"):
        assert column in names
    by_id = {f["tile_id"]: f for f in layer.getFeatures(QgsFeatureRequest())}
    row = expected.iloc[len(expected) // 2]
    feature = by_id[row.tile_id]
    assert feature["x_off"] == row.x_off and feature["valid_fraction"] == pytest.approx(row.valid_fraction)
    assert feature.geometry().area() == pytest.approx(row.geometry.area, rel=1e-9)
    if not crs_args:  # with edge=shift the tiles cover exactly the raster as QGIS itself places it
        raster = QgsRasterLayer(str(scene), "scene")
        assert raster.isValid() and raster.crs().authid() == authid
        a, b = layer.extent(), raster.extent()
        tol = 1e-9 * b.width()
        assert abs(a.xMinimum() - b.xMinimum()) < tol and abs(a.xMaximum() - b.xMaximum()) < tol
        assert abs(a.yMinimum() - b.yMinimum()) < tol and abs(a.yMaximum() - b.yMaximum()) < tol


def test_run_table_is_visible_to_qgis(qgis_app, tmp_path):
    out = tmp_path / "tiles.gpkg"
    assert run_cli("tile", EXAMPLE_SCENE, "-o", out, "-q").returncode == 0
    runs = QgsVectorLayer(f"{out}|layername=hqrs_runs", "runs", "ogr")
    assert runs.isValid() and runs.featureCount() == 1
    assert '"tile_size": "256"' in next(runs.getFeatures())["params"]


def test_layer_with_embeddings_opens_in_qgis(qgis_app, example_layer, tiny_clip_checkpoint):
    from qgis.PyQt.QtCore import QVariant

    from hqrs_geo.api import embed
    from hqrs_geo.engine.options import RunOptions

    embed(example_layer, model="hqrs-test-tiny-clip", checkpoint=str(tiny_clip_checkpoint), device="cpu",
          options=RunOptions(workers=0))
    layer = QgsVectorLayer(f"{example_layer}|layername=tiles", "tiles", "ogr")
    assert layer.isValid() and layer.featureCount() == 64
    field = layer.fields().field("emb_hqrs_test_tiny_clip_tiny_clip")
    assert field.type() == QVariant.ByteArray
    feature = next(layer.getFeatures())
    assert len(bytes(feature["emb_hqrs_test_tiny_clip_tiny_clip"])) == 64  # 32 float16 values
    assert feature["emb_hqrs_test_tiny_clip_tiny_clip_dim"] == 32
