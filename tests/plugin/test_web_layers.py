"""Web layers that draw, in real headless QGIS: a tile layer made from an XYZ layer served on
127.0.0.1 carries a complete CRS (GeoTIFF and tile layer: WKT with the EPSG code) and draws in a
project in EPSG:4326 (rendered to an image, its outline pixels counted), above the imagery; tile
layers hide their embedding columns; an empty GeoPackage is named as one."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import EXAMPLE_SCENE
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFillSymbol,
    QgsMapRendererParallelJob,
    QgsMapSettings,
    QgsProcessingException,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsSingleSymbolRenderer,
    QgsVectorFileWriter,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor
from qgis_fixtures import (  # noqa: F401  (fixtures)
    SCENE_BOUNDS,
    TileHandler,
    extent_string,
    no_installed_engine,
    processing_run,
    xyz_server,
)
from tiny_models import TINY_CLIP

from qgis_plugin.core import tile_layers

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning:qgis_plugin")
MAGENTA = (255, 0, 255)


@pytest.fixture(scope="module")
def xyz_url(xyz_server):
    return f"{xyz_server}/{{z}}/{{x}}/{{y}}.png"


@pytest.fixture
def project_4326():
    project = QgsProject.instance()
    project.clear()
    project.setCrs(QgsCoordinateReferenceSystem("EPSG:4326"))
    yield project
    project.clear()


def render(project: QgsProject, extent: QgsRectangle, size: int = 400) -> np.ndarray:
    """The project's layers in layer-tree order, drawn in the project's CRS: an RGB array."""
    settings = QgsMapSettings()
    settings.setLayers(project.layerTreeRoot().layerOrder())
    settings.setDestinationCrs(project.crs())
    settings.setOutputSize(QSize(size, size))
    settings.setExtent(extent)
    settings.setBackgroundColor(QColor("black"))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    image = job.renderedImage().convertToFormat(4)  # QImage.Format_RGB32
    data = np.frombuffer(image.constBits().asstring(image.sizeInBytes()), np.uint8).reshape(size, size, 4)
    return data[:, :, [2, 1, 0]]


def magenta_pixels(rgb: np.ndarray) -> int:
    return int(np.all(np.abs(rgb.astype(int) - MAGENTA) < 40, axis=-1).sum())


def test_xyz_tile_layer_has_a_complete_crs_and_draws_over_the_imagery_in_epsg_4326(
        processing_run, xyz_url, project_4326, tmp_path):  # noqa: F811
    from osgeo import gdal

    project = project_4326
    xyz = QgsRasterLayer(f"type=xyz&url={xyz_url}&zmin=0&zmax=21", "river photo (XYZ)", "wms")
    assert xyz.isValid()
    project.addMapLayer(xyz)
    x0, y0, x1, y1 = SCENE_BOUNDS
    to_4326 = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:28992"), project.crs(), project)
    area = to_4326.transformBoundingBox(QgsRectangle(x0 + 50, y0 + 50, x1 - 50, y1 - 50))
    out = tmp_path / "web" / "tiles.gpkg"
    out.parent.mkdir()
    result = processing_run("hqrs:tile", {
        "INPUT": xyz.id(), "EXTENT": extent_string(area.xMinimum(), area.yMinimum(), area.xMaximum(), area.yMaximum(),
                                                   "EPSG:4326"),
        "RESOLUTION": 1.0, "TILE_SIZE_M": 25, "OUTPUT": str(out)})
    written = list(out.parent.glob("river_photo_XYZ_1m_*.tif"))
    assert len(written) == 1 and not list(out.parent.glob("*.part.tif"))
    # the GeoTIFF: a complete CRS for GDAL and for QGIS (WKT with the EPSG code)
    srs = gdal.Open(str(written[0])).GetSpatialRef()
    assert srs.GetAuthorityName(None) == "EPSG" and srs.GetAuthorityCode(None) == "32631"
    assert 'AUTHORITY["EPSG","32631"]' in srs.ExportToWkt()
    raster = QgsRasterLayer(str(written[0]), "written", "gdal")
    assert raster.crs().authid() == "EPSG:32631" and "UTM zone 31N" in raster.crs().toWkt()
    tiles = QgsVectorLayer(result["OUTPUT"], "tiles", "ogr")
    assert tiles.isValid() and tiles.featureCount() > 20
    assert tiles.crs().authid() == "EPSG:32631" and 'ID["EPSG",32631]' in tiles.crs().toWkt(
        QgsCoordinateReferenceSystem.WKT2_2019)
    # a new tile layer QGIS put below the imagery (the bottom of the layer tree): moved above it
    tiles.setRenderer(QgsSingleSymbolRenderer(QgsFillSymbol.createSimple(
        {"style": "no", "outline_style": "solid", "outline_color": "255,0,255,255", "outline_width": "0.6"})))
    project.addMapLayer(tiles, False)
    project.layerTreeRoot().addLayer(tiles)
    view = to_4326.transformBoundingBox(QgsRectangle(*SCENE_BOUNDS))
    hidden = render(project, view)
    assert hidden.std() > 20 and magenta_pixels(hidden) == 0  # imagery drawn, the tiles under it
    tile_layers.settle_new_layer(tiles)
    assert project.layerTreeRoot().layerOrder()[0] is tiles
    shown = render(project, view)
    assert magenta_pixels(shown) > 2000, magenta_pixels(shown)  # the outlines of every tile, in EPSG:4326
    assert not tile_layers.place_above_imagery(tiles)  # already above: left where it is


def test_embedding_columns_are_hidden_in_the_attribute_table(processing_run, tiny_clip_checkpoint,  # noqa: F811
                                                             tmp_path):
    from hqrs_geo import TileConfig
    from hqrs_geo.api import embed, tile
    from hqrs_geo.engine.options import RunOptions

    path = tmp_path / "tiles.gpkg"
    tile(EXAMPLE_SCENE, path, TileConfig(tile_size=250))
    embed(path, model=TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu", options=RunOptions(workers=0))
    layer = QgsVectorLayer(f"{path}|layername=tiles", "tiles", "ogr")
    blob = [f.name() for f in layer.fields() if f.name().startswith("emb_") and not f.name().endswith(("_dim",
                                                                                                        "_model"))]
    assert len(blob) == 1
    assert tile_layers.hide_embedding_columns(layer) == blob
    index = layer.fields().indexOf(blob[0])
    assert layer.editorWidgetSetup(index).type() == "Hidden"
    columns = {c.name: c.hidden for c in layer.attributeTableConfig().columns()}
    assert columns[blob[0]] is True and columns["tile_id"] is False and columns[f"{blob[0]}_dim"] is False
    # the attribute table QGIS opens (a dual view with the layer's table config)
    from qgis.core import QgsFeatureRequest
    from qgis.gui import QgsAttributeEditorContext, QgsDualView, QgsMapCanvas

    canvas, view = QgsMapCanvas(), QgsDualView()
    view.init(layer, canvas, QgsFeatureRequest(), QgsAttributeEditorContext())
    view.setAttributeTableConfig(layer.attributeTableConfig())
    table = view.tableView()
    model = table.model()
    shown = [model.headerData(i, 1, 0) for i in range(model.columnCount()) if not table.isColumnHidden(i)]
    assert "tile_id" in shown and f"{blob[0]}_dim" in shown and blob[0] not in shown
    view.deleteLater()
    canvas.deleteLater()


def test_an_empty_geopackage_is_named_as_one(processing_run, tmp_path):  # noqa: F811
    empty = tmp_path / "new.gpkg"
    scratch = QgsVectorLayer("Polygon?crs=EPSG:28992&field=name:string", "parcels", "memory")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName, options.layerName = "GPKG", "parcels"
    error = QgsVectorFileWriter.writeAsVectorFormatV3(scratch, str(empty), project_context(), options)
    assert error[0] == QgsVectorFileWriter.NoError, error
    layer = QgsVectorLayer(f"{empty}|layername=parcels", "parcels", "ogr")
    assert layer.isValid()
    with pytest.raises(QgsProcessingException) as caught:
        processing_run("hqrs:embed", {"INPUT": layer})
    message = str(caught.value)
    assert message == (f"HQRS: {empty} has no tile layer: make one with the Processing algorithm "
                       "Processing ▸ HQRS ▸ Tiles ▸ Tile raster (or Models ▸ Tile, embed and caption)")
    # a GeoPackage that has a tile layer, opened at another table: choose 'tiles'
    both = shutil.copy(empty, tmp_path / "both.gpkg")
    from hqrs_geo import TileConfig
    from hqrs_geo.api import tile

    tile(EXAMPLE_SCENE, both, TileConfig(tile_size=250))
    other = QgsVectorLayer(f"{both}|layername=parcels", "parcels", "ogr")
    assert "choose the layer 'tiles' of that file" in tile_layers.not_a_tile_layer(other)


def project_context():
    return QgsProject.instance().transformContext()


def test_layers_read_after_a_worker_thread_keep_a_complete_crs(processing_run, project_4326, tmp_path):  # noqa: F811
    """QGIS 3.22 frees the PROJ objects of the CRSs a worker thread cached when the thread ends: a
    layer read afterwards with that CRS draws nowhere. Settled layers and layers read after
    :func:`opened_in_worker` keep a complete CRS."""
    import time

    from qgis.core import QgsApplication
    from qgis.PyQt.QtCore import QThreadPool

    from hqrs_geo import TileConfig
    from hqrs_geo.api import tile
    from qgis_plugin.core import tasks

    path = tmp_path / "tiles.gpkg"
    tile(EXAMPLE_SCENE, path, TileConfig(tile_size=250))
    uri = f"{path}|layername=tiles"
    pool = QThreadPool.globalInstance()
    expiry = pool.expiryTimeout()
    pool.setExpiryTimeout(100)  # worker threads end 0.1 s after their task

    def in_worker(fn) -> None:
        done: list = []
        tasks.start(tasks.CallTask("HQRS test: read in a worker", fn, lambda result, error: done.append(error)))
        while not done:
            QgsApplication.processEvents()
            time.sleep(0.01)
        assert done == [None]

    def thread_ended() -> None:
        time.sleep(1.5)  # idle for longer than the expiry: the worker thread ends
        QgsApplication.processEvents()

    def outline(layer):
        layer.setRenderer(QgsSingleSymbolRenderer(QgsFillSymbol.createSimple(
            {"style": "no", "outline_style": "solid", "outline_color": "255,0,255,255", "outline_width": "0.6"})))
        return layer

    try:
        project = project_4326
        view = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:28992"), project.crs(), project
                                      ).transformBoundingBox(QgsRectangle(*SCENE_BOUNDS))
        tile_layers.forget_crs_cache()
        in_worker(lambda _task: QgsVectorLayer(uri, "worker", "ogr").featureCount())
        plain = QgsVectorLayer(uri, "plain", "ogr")  # read while the worker thread still exists
        thread_ended()
        # QGIS 3.22 (here): its definition went with the thread, its code is left (an empty WKT)
        fault = plain.crs().authid() == "EPSG:28992" and not plain.crs().toWkt()
        # the same, settled as the plugin settles every new tile layer: it keeps its CRS and draws
        tile_layers.forget_crs_cache()
        in_worker(lambda _task: QgsVectorLayer(uri, "worker", "ogr").featureCount())
        settled = QgsVectorLayer(uri, "settled", "ogr")
        tile_layers.settle_new_layer(settled, new=False)
        thread_ended()
        assert settled.crs().authid() == "EPSG:28992" and "Amersfoort" in settled.crs().toWkt()
        print(f"\na layer read while a worker thread lived: {'empty' if fault else 'complete'} WKT after the "
              "thread ended; settled: complete")
        project.addMapLayer(outline(settled))
        assert magenta_pixels(render(project, view)) > 1000
        # a worker that reads through opened_in_worker leaves nothing behind
        tile_layers.forget_crs_cache()

        def read(_task):
            with tile_layers.opened_in_worker(uri) as layer:
                return layer.featureCount()

        in_worker(read)
        later = QgsVectorLayer(uri, "later", "ogr")
        thread_ended()
        assert later.crs().authid() == "EPSG:28992" and "Amersfoort" in later.crs().toWkt()
    finally:
        pool.setExpiryTimeout(expiry)
