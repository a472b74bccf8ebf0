"""Few-shot detection in the search dock, in real QGIS with a real search process: tiles labelled
by mouse clicks on the map canvas, "Find all like these" drawing a detection layer, accept / reject
and refit changing the probabilities in the same layer, labels kept across closing the dock."""
from __future__ import annotations

import shutil
import time

import pytest
from project_layers import tile_layer_in_project
from qgis.core import QgsApplication, QgsPointXY, QgsProcessingException, QgsProject, QgsRectangle, QgsVectorLayer
from qgis.PyQt.QtCore import QPoint, Qt
from qgis.PyQt.QtTest import QTest
from qgis_fixtures import close_dock, embedded_example, new_dock, no_installed_engine, processing_run, qgis, wait_for  # noqa: F401  (fixtures)

from hqrs_geo.search import fewshot
from hqrs_geo.search.session import SearchSession
from qgis_plugin.core import detections
from qgis_plugin.processing.algorithms import ALGORITHM_CLASSES

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning:qgis_plugin", "error::ResourceWarning")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_clip_checkpoint):
    """64 tiles of the example scene with tiny-CLIP embeddings."""
    return embedded_example(tmp_path_factory.mktemp("fewshot") / "tiles.gpkg", tiny_clip_checkpoint, tile_size=125)


@pytest.fixture
def layer(embedded, tmp_path):
    """A private copy of the embedded tile layer, in the project."""
    with tile_layer_in_project(shutil.copy(embedded, tmp_path / "tiles.gpkg")) as added:
        yield added


@pytest.fixture
def dock(qgis):  # noqa: F811 - the shared QGIS fixture
    widget = new_dock(show_canvas=True)
    yield widget
    close_dock(widget)
    for layer in list(QgsProject.instance().mapLayers().values()):
        if layer.customProperty(detections.LAYER_PATH):
            QgsProject.instance().removeMapLayer(layer.id())


def show_layer(dock, layer) -> None:
    """Choose ``layer`` in the dock and show all of it on the canvas."""
    assert dock.set_layer(layer)
    canvas = dock.iface_stand_in.canvas
    canvas.setDestinationCrs(layer.crs())
    canvas.setExtent(layer.extent())
    canvas.refresh()
    QgsApplication.processEvents()


def click_tile(dock, layer, tile_id: str, shift: bool = False) -> None:
    """A real mouse click (with shift: a shift-click) on the canvas at the centre of a tile."""
    feature = next(layer.getFeatures(f"\"tile_id\" = '{tile_id}'"))
    centre = feature.geometry().centroid().asPoint()
    canvas = dock.iface_stand_in.canvas
    pixel = canvas.getCoordinateTransform().transform(QgsPointXY(centre))
    modifier = Qt.ShiftModifier if shift else Qt.NoModifier
    QTest.mouseClick(canvas.viewport(), Qt.LeftButton, modifier, QPoint(round(pixel.x()), round(pixel.y())))
    QgsApplication.processEvents()


def labelled(dock) -> dict:
    """Tile id -> label of the labels layer on the map."""
    layer = dock.fewshot.labels_layer(create=False)
    return {f["tile_id"]: f["label"] for f in layer.getFeatures()} if layer is not None else {}


def tile_ids(layer) -> list:
    """The layer's tile ids in file order."""
    return [str(f["tile_id"]) for f in layer.getFeatures()]


def find_all(dock, refit: bool = False) -> float:
    """Press Find all like these (or Refit) and wait for the detection; returns how long the press
    blocked the GUI."""
    panel = dock.fewshot
    button = panel.refit_button if refit else panel.find_button
    assert button.isEnabled()
    started = time.perf_counter()
    QTest.mouseClick(button, Qt.LeftButton)
    blocked = time.perf_counter() - started
    wait_for(lambda: panel.task.done)
    return blocked


def test_labels_from_clicks_on_the_map(dock, layer):
    show_layer(dock, layer)
    panel = dock.fewshot
    assert not panel.find_button.isEnabled()  # nothing to find yet
    QTest.mouseClick(panel.label_button, Qt.LeftButton)
    canvas = dock.iface_stand_in.canvas
    assert panel.label_button.isChecked() and canvas.mapTool() is panel.tool
    ids = tile_ids(layer)
    a, b, c, d = ids[0], ids[9], ids[20], ids[63]
    click_tile(dock, layer, a)
    click_tile(dock, layer, b, shift=True)
    click_tile(dock, layer, c)
    click_tile(dock, layer, d)
    click_tile(dock, layer, d)  # again: no label
    assert panel.labels().positive == [a, c] and panel.labels().negative == [b]
    assert labelled(dock) == {a: 1, b: -1, c: 1}
    assert "2</b> positive" in panel.counts.text() and "1</b> negative" in panel.counts.text()
    assert panel.find_button.isEnabled()
    # drawn as the tiles' own footprints, green for positives and red for negatives
    labels_layer = panel.labels_layer(create=False)
    footprints = {f["tile_id"]: f.geometry() for f in layer.getFeatures()}
    assert all(f.geometry().equals(footprints[f["tile_id"]]) for f in labels_layer.getFeatures())
    categories = {c.value(): c.symbol().symbolLayer(0).strokeColor().name() for c in
                  labels_layer.renderer().categories()}
    assert categories == {1: detections.POSITIVE_COLOUR, -1: detections.NEGATIVE_COLOUR}
    assert labels_layer.renderer().categories()[0].symbol().symbolLayer(0).brushStyle() == Qt.NoBrush
    assert QgsProject.instance().layerTreeRoot().findGroup("HQRS results").findLayer(labels_layer.id())
    # a click beside every tile says so; the map tool goes when the button is released
    outside = layer.extent()
    canvas.setExtent(QgsRectangle(outside.xMinimum() - outside.width(), outside.yMinimum(), outside.xMaximum(),
                                  outside.yMaximum()))
    canvas.refresh()
    QTest.mouseClick(canvas.viewport(), Qt.LeftButton, Qt.NoModifier, QPoint(3, 200))
    assert "no tile there" in panel.status.text() and len(panel.labels()) == 3
    QTest.mouseClick(panel.label_button, Qt.LeftButton)
    assert canvas.mapTool() is None and panel.tool is None


def test_find_all_accept_reject_refit(dock, layer):
    show_layer(dock, layer)
    panel = dock.fewshot
    ids = tile_ids(layer)
    positives = [ids[0], ids[1], ids[8]]
    panel.label_button.setChecked(True)
    for tile_id in positives:
        click_tile(dock, layer, tile_id)
    panel.threshold.setValue(0.3)
    blocked = find_all(dock)
    assert blocked < 0.5  # the model loads and the classifier fits in a task
    detected = panel.detection_layer()
    assert detected is not None and "detections" in detected.name(), panel.status.text()
    # the engine's own detection, independently: same tiles, same probabilities
    frame, detection = fewshot.detect(SearchSession(layer.source().split("|")[0]), positives, [], "logistic",
                                      10_000, 0.3)
    expected = dict(zip(frame.tile_id.astype(str), frame.score))
    drawn = {f["tile_id"]: f["detect_prob"] for f in detected.getFeatures()}
    assert drawn.keys() == expected.keys() and len(drawn) == detection.above > 3
    assert all(abs(drawn[t] - expected[t]) < 1e-5 for t in drawn)
    ranks = sorted(detected.getFeatures(), key=lambda f: f["detect_rank"])
    assert [f["detect_prob"] for f in ranks] == sorted(drawn.values(), reverse=True)
    assert {f["tile_id"]: f["label"] for f in detected.getFeatures() if f["label"]} == {t: 1 for t in positives}
    assert detected.renderer().type() == "graduatedSymbol" and detected.renderer().classAttribute() == "detect_prob"
    assert f"{detection.above}</b> of 64 tiles" in panel.status.text()
    assert panel.table.rowCount() == len(drawn) and panel.table.item(0, 0).text() == "1"
    # reject the two best detections that are not labelled yet, accept the third, refit
    rows = [r for r in range(panel.table.rowCount()) if panel.table.item(r, 2).text() == ""][:3]
    rejected = [panel.found[r].tile_id for r in rows[:2]]
    accepted = panel.found[rows[2]].tile_id
    for row in rows[:2]:
        panel.table.selectionModel().select(panel.table.model().index(row, 0),
                                            panel.table.selectionModel().Select | panel.table.selectionModel().Rows)
    QTest.mouseClick(panel.reject_button, Qt.LeftButton)
    assert panel.labels().negative == rejected and labelled(dock)[rejected[0]] == -1
    detected.selectByExpression(f"\"tile_id\" = '{accepted}'")  # accept from a selection on the map
    QTest.mouseClick(panel.accept_button, Qt.LeftButton)
    assert panel.labels().positive == positives + [accepted]
    before = drawn
    find_all(dock, refit=True)
    assert panel.detection_layer().id() == detected.id()  # updated in place, no new layer
    assert sum(1 for lyr in QgsProject.instance().mapLayers().values()
               if lyr.customProperty("hqrs/styled") == detections.DETECTIONS) == 1
    after = {f["tile_id"]: f["detect_prob"] for f in detected.getFeatures()}
    frame, _ = fewshot.detect(SearchSession(layer.source().split("|")[0]), positives + [accepted], rejected,
                              "logistic", 10_000, 0.3)
    assert after == pytest.approx(dict(zip(frame.tile_id.astype(str), frame.score)), abs=1e-5)
    assert after != before
    for tile_id in rejected:  # a rejected tile is now far less likely (or gone under the threshold)
        assert after.get(tile_id, 0.0) < before[tile_id]
    assert {f["tile_id"]: f["label"] for f in detected.getFeatures() if f["label"] == -1}.keys() <= set(rejected)


def test_labels_follow_the_layer_shown(dock, layer, embedded, tmp_path):
    show_layer(dock, layer)
    panel = dock.fewshot
    ids = tile_ids(layer)
    panel.label_tiles([ids[0]], detections.POSITIVE)
    assert labelled(dock) == {ids[0]: 1}
    with tile_layer_in_project(shutil.copy(embedded, tmp_path / "other.gpkg"), "other") as other:
        assert dock.set_layer(other)
        assert len(panel.labels()) == 0 and labelled(dock) == {} and panel.table.rowCount() == 0
        panel.label_tiles([ids[1]], detections.NEGATIVE)
        assert labelled(dock) == {ids[1]: -1} and "0</b> positive" in panel.counts.text()
        assert dock.set_layer(layer)
        assert labelled(dock) == {ids[0]: 1}
        assert dock.set_layer(other)
    # the layer shown was removed: the dock shows the other one, and so do the labels
    wait_for(lambda: panel.path == layer.source().split("|")[0], 10)
    assert labelled(dock) == {ids[0]: 1} and "1</b> positive" in panel.counts.text()


def test_requests_replace_cancel_and_explain(dock, layer):
    show_layer(dock, layer)
    panel = dock.fewshot
    assert panel.find_all() is None and "no positive example" in panel.status.text()
    panel.label_tiles([tile_ids(layer)[5]], detections.POSITIVE)
    cancelled = panel.find_all()
    assert panel.cancel_button.isEnabled()
    QTest.mouseClick(panel.cancel_button, Qt.LeftButton)
    wait_for(lambda: cancelled.done)
    assert panel.status.text() == "detection cancelled" and not panel.cancel_button.isEnabled()
    assert panel.detection_layer() is None
    first = panel.find_all()
    second = panel.find_all()  # the first is still loading the model: replaced, and said so
    assert "replaced by this one" in panel.status.text()
    wait_for(lambda: first.done and second.done)
    assert panel.detection_layer() is not None and "tiles at probability" in panel.status.text()
    panel.label_tiles([tile_ids(layer)[5]], detections.NEGATIVE)  # now only a negative
    assert panel.labels().positive == [] and not panel.find_button.isEnabled()


def test_labels_survive_closing_and_reopening(qgis, layer):  # noqa: F811 - the shared QGIS fixture
    ids = tile_ids(layer)
    dock = new_dock(show_canvas=True)
    try:
        show_layer(dock, layer)
        panel = dock.fewshot
        panel.label_button.setChecked(True)
        click_tile(dock, layer, ids[3])
        click_tile(dock, layer, ids[4])
        click_tile(dock, layer, ids[40], shift=True)
        task = panel.save_labels()
        wait_for(lambda: task.done)
        assert "3 labels saved" in panel.status.text()
    finally:
        close_dock(dock)
    path = layer.source().split("|")[0]
    saved = fewshot.saved_labels(path)  # read back by the engine, independently
    assert saved["positive"] == [ids[3], ids[4]] and saved["negative"] == [ids[40]]
    dock = new_dock(show_canvas=True)  # a new dock (QGIS reopened): its session starts again
    try:
        show_layer(dock, layer)
        panel = dock.fewshot
        assert len(panel.labels()) == 0
        panel.label_button.setChecked(True)  # labelling this layer brings its saved labels back
        wait_for(lambda: len(panel.labels()) == 3)
        assert panel.labels().positive == [ids[3], ids[4]] and panel.labels().negative == [ids[40]]
        assert labelled(dock) == {ids[3]: 1, ids[4]: 1, ids[40]: -1}
        assert "restored" in panel.status.text()
    finally:
        close_dock(dock)
    for layer_ in list(QgsProject.instance().mapLayers().values()):
        if layer_.customProperty(detections.LAYER_PATH):
            QgsProject.instance().removeMapLayer(layer_.id())


def test_detect_from_examples_processing(processing_run, embedded, tmp_path):  # noqa: F811 - shared fixture
    assert any(cls.NAME == "detect" for cls in ALGORITHM_CLASSES)
    tiles = str(shutil.copy(embedded, tmp_path / "tiles.gpkg"))
    ids = [str(f["tile_id"]) for f in QgsVectorLayer(f"{tiles}|layername=tiles", "t", "ogr").getFeatures()]
    out = tmp_path / "found.gpkg"
    result = processing_run("hqrs:detect", {"INPUT": tiles, "POSITIVE_IDS": f"{ids[0]}, {ids[1]}",
                                            "NEGATIVE_IDS": ids[30], "THRESHOLD": 0.3, "OUTPUT": str(out)})
    found = QgsVectorLayer(result["OUTPUT"], "found", "ogr")
    assert found.isValid() and result["OUTPUT"].endswith("|layername=detections")
    drawn = {f["tile_id"]: f["detect_prob"] for f in found.getFeatures()}
    frame, detection = fewshot.detect(SearchSession(tiles), [ids[0], ids[1]], [ids[30]], "logistic", 10_000, 0.3)
    assert drawn == pytest.approx(dict(zip(frame.tile_id.astype(str), frame.score)), abs=1e-5)
    assert len(drawn) == detection.above > 0
    # the labels saved with the layer (as the dock's Save labels does), then no ids at all
    fewshot.save_labels(SearchSession(tiles), [ids[0], ids[1]], [ids[30]])
    again = processing_run("hqrs:detect", {"INPUT": tiles, "SAVED_LABELS": True, "THRESHOLD": 0.3,
                                           "OUTPUT": str(tmp_path / "again.gpkg")})
    assert {f["tile_id"]: f["detect_prob"] for f in QgsVectorLayer(again["OUTPUT"], "a", "ogr").getFeatures()} \
        == pytest.approx(drawn, abs=1e-5)
    # the saved labels as a training set (what the dock's Export training set… opens)
    exported = processing_run("hqrs:export_dataset", {"INPUT": tiles, "CAPTIONS": "labels", "FORMAT": "png",
                                                      "OUTPUT": str(tmp_path / "training")})
    assert exported["IMAGES"] == 3
    classes = (tmp_path / "training" / "labels.csv").read_text()
    assert all(tile_id in classes for tile_id in (ids[0], ids[1], ids[30])) and "negative" in classes
    with pytest.raises(QgsProcessingException) as caught:
        processing_run("hqrs:detect", {"INPUT": tiles, "OUTPUT": str(tmp_path / "none.gpkg")})
    assert "no positive example" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "none.gpkg").exists()
