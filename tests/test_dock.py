"""The search dock driven with QTest in real QGIS, a QgsTask running the engine, plugin zip."""
from __future__ import annotations

import subprocess
import time
import zipfile

import pytest
from qgis.core import QgsApplication, QgsProject, QgsVectorLayer
from qgis.gui import QgsMapCanvas
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtTest import QTest

from conftest import EXAMPLE_SCENE, ROOT, write_sparse_scene
from hqrs_geo import TileConfig, read_tiles
from hqrs_geo.api import embed, tile
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.search.session import SearchSession
from tiny_models import TINY_CLIP


@pytest.fixture(scope="module")
def qgis():
    app = QgsApplication.instance() or QgsApplication([], False)
    app.initQgis()
    return app


class IfaceStandIn:
    """The parts of QgisInterface the dock uses."""

    def __init__(self):
        self.canvas = QgsMapCanvas()
        self.canvas.resize(400, 400)

    def mapCanvas(self):  # noqa: N802 - QGIS API name
        return self.canvas


@pytest.fixture
def embedded_layer(tmp_path, tiny_clip_checkpoint):
    path = tmp_path / "tiles.gpkg"
    tile(EXAMPLE_SCENE, path, TileConfig(tile_size=125))
    embed(path, model=TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu", options=RunOptions(workers=0))
    return path


def test_dock_query_selects_expected_tiles(qgis, embedded_layer):
    from qgis_plugin.dock import SearchDock

    layer = QgsVectorLayer(f"{embedded_layer}|layername=tiles", "tiles", "ogr")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    iface = IfaceStandIn()
    iface.canvas.setLayers([layer])
    dock = SearchDock(iface)
    try:
        dock.layer_box.setLayer(layer)
        dock.k.setValue(5)
        QTest.keyClicks(dock.query, "a river with a bridge")
        QTest.keyClick(dock.query, Qt.Key_Return)
        expected = SearchSession(str(embedded_layer)).search_text("a river with a bridge", k=5).tile_id.tolist()
        assert dock.table.rowCount() == 5
        assert [dock.table.item(r, 2).text() for r in range(5)] == expected
        selected = sorted(f["tile_id"] for f in layer.selectedFeatures())
        assert selected == sorted(expected)
        assert layer.renderer().type() == "graduatedSymbol"
        # a second query answers quickly from the same session process
        dock.query.clear()
        QTest.keyClicks(dock.query, "parking lot")
        start = time.perf_counter()
        QTest.keyClick(dock.query, Qt.Key_Return)
        assert time.perf_counter() - start < 1.0 and dock.table.rowCount() == 5
        # clicking a row zooms to the tile
        dock.zoom_to_row(0)
        fid = next(f.id() for f in layer.getFeatures() if f["tile_id"] == dock.table.item(0, 2).text())
        assert iface.canvas.extent().contains(layer.getFeature(fid).geometry().boundingBox())
        # find similar from the selected features
        layer.selectByIds([fid])
        dock.search_similar()
        example = layer.getFeature(fid)["tile_id"]
        listed = [dock.table.item(r, 2).text() for r in range(dock.table.rowCount())]
        assert len(listed) == 5 and example not in listed  # the example itself is left out
        assert listed == SearchSession(str(embedded_layer)).search_similar([example], k=5).tile_id.tolist()
    finally:
        dock.close_sessions()
        QgsProject.instance().removeMapLayer(layer.id())


def test_dock_reports_layer_without_embeddings(qgis, tmp_path):
    from qgis_plugin.dock import SearchDock

    path = tmp_path / "plain.gpkg"
    tile(EXAMPLE_SCENE, path, TileConfig(tile_size=500))
    layer = QgsVectorLayer(f"{path}|layername=tiles", "plain", "ogr")
    QgsProject.instance().addMapLayer(layer)
    dock = SearchDock(IfaceStandIn())
    try:
        dock.layer_box.setLayer(layer)
        QTest.keyClicks(dock.query, "river")
        QTest.keyClick(dock.query, Qt.Key_Return)
        assert "has no embeddings" in dock.status.text() and dock.table.rowCount() == 0
    finally:
        dock.close_sessions()
        QgsProject.instance().removeMapLayer(layer.id())


def test_engine_task_progress_and_cancel(qgis, tmp_path):
    from qgis_plugin.tasks import EngineTask

    big = write_sparse_scene(tmp_path / "big.tif")
    out = tmp_path / "big.gpkg"
    done = []
    task = EngineTask("tile", ["tile", str(big), "-o", str(out), "--tile-size", "64"], on_done=done.append)
    QgsApplication.taskManager().addTask(task)
    deadline = time.time() + 60
    while task.progress() <= 0 and time.time() < deadline:
        QgsApplication.processEvents()
        time.sleep(0.05)
    assert task.progress() > 0
    task.cancel()
    while not done and time.time() < deadline:
        QgsApplication.processEvents()
        time.sleep(0.05)
    assert done and done[0].cancelled and done[0].returncode == 130
    assert not out.exists()  # nothing half-written
    small = tmp_path / "small.gpkg"
    finished = []
    task = EngineTask("tile", ["tile", str(EXAMPLE_SCENE), "-o", str(small), "--tile-size", "250"], on_done=finished.append)
    QgsApplication.taskManager().addTask(task)
    while not finished and time.time() < deadline + 60:
        QgsApplication.processEvents()
        time.sleep(0.05)
    assert finished[0].ok and len(read_tiles(small)) == 16


def test_missing_engine_gives_install_command(tmp_path):
    from qgis_plugin.engine import engine_problem

    bare = tmp_path / "bare"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(bare)], check=True)
    problem = engine_problem(str(bare / "bin" / "python"))
    assert problem.startswith("HQRS: the engine needs hqrs_geo") and "pip install 'hqrs_geo[all]'" in problem
    assert engine_problem() is None  # this environment has everything
    assert "not found" in engine_problem("/no/such/python")


def test_make_plugin_builds_an_installable_zip(tmp_path):
    result = subprocess.run(["make", "-s", "plugin", f"PLUGIN_ZIP={tmp_path / 'hqrs.zip'}"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "hqrs.zip") as zf:
        names = zf.namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"hqrs_geo_plugin"}
    for required in ("metadata.txt", "__init__.py", "plugin.py", "icon.png", "LICENSE", "processing_provider.py"):
        assert f"hqrs_geo_plugin/{required}" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".so"))]


def test_example_renders_search_map(qgis, embedded_layer, tmp_path):
    import numpy as np
    from PIL import Image

    from examples.render_search_map import render

    png = tmp_path / "map.png"
    summary = render(str(embedded_layer), "a river with a bridge", str(png), k=10, size=300)
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (300, 300, 3) and image.std() > 10
    assert summary["top"] == SearchSession(str(embedded_layer)).search_text("a river with a bridge", k=1).tile_id[0]


def test_settings_dialog_round_trip(qgis):
    from qgis_plugin.engine import setting
    from qgis_plugin.settings_dialog import SettingsDialog, value

    before = {name: setting(name) for name in ("device", "batch_size", "tile_size")}
    try:
        dialog = SettingsDialog()
        dialog.device.setCurrentText("cpu")
        dialog.batch.setValue(7)
        dialog.tile_size.setValue(224)
        dialog.save()
        assert value("device") == "cpu" and value("batch_size") == 7 and value("tile_size") == 224
        again = SettingsDialog()
        assert again.batch.value() == 7 and again.device.currentText() == "cpu"
        dialog.check_engine()
        assert dialog.check_result.text() == "engine OK"
    finally:
        from qgis_plugin.engine import set_setting

        for name, old in before.items():
            set_setting(name, old if old is not None else "")
