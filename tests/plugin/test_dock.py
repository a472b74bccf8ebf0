"""The search dock and the settings dialog driven with QTest in real QGIS, with real search
processes: nothing blocks the GUI, results go to layers of their own, errors carry their fix."""
from __future__ import annotations

import json
import shutil
import sys
import time

import pytest
from conftest import EXAMPLE_SCENE, ROOT, write_sparse_scene
from project_layers import tile_layer_in_project
from qgis.core import QgsApplication, QgsGeometry, QgsProject, QgsSettings, QgsVectorLayer
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QPushButton, QToolButton
from qgis_fixtures import close_dock, embedded_example, new_dock, no_installed_engine, processing_run, qgis, wait_for  # noqa: F401  (fixtures)
from tiny_models import TINY_CLIP, TINY_COCA

from hqrs_geo import TileConfig, read_tiles
from hqrs_geo.api import caption, embed, tile
from hqrs_geo.engine.options import RunOptions
from hqrs_geo.search.session import SearchSession
from qgis_plugin.core import sessions, settings

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning:qgis_plugin", "error::ResourceWarning")
QUERY = "a river with a bridge"


@pytest.fixture(scope="module")
def embedded_master(tmp_path_factory, tiny_clip_checkpoint, tiny_coca_checkpoint):
    """64 tiles with tiny-CLIP embeddings and tiny-CoCa captions."""
    path = embedded_example(tmp_path_factory.mktemp("dock") / "tiles.gpkg", tiny_clip_checkpoint, tile_size=125)
    options = RunOptions(workers=0)
    from hqrs_geo.models.decoding import DecodingConfig

    caption(path, model=TINY_COCA, checkpoint=str(tiny_coca_checkpoint), device="cpu", options=options,
            decoding=DecodingConfig(method="greedy", max_length=4, min_length=1))
    return path


@pytest.fixture
def project_layer(embedded_master, tmp_path):
    """A private copy of the embedded tile layer, in the project."""
    with tile_layer_in_project(shutil.copy(embedded_master, tmp_path / "tiles.gpkg")) as layer:
        yield layer


@pytest.fixture
def dock(qgis):  # noqa: F811 - the shared QGIS fixture
    widget = new_dock()
    yield widget
    close_dock(widget)


def run_query(dock, text: str) -> float:
    """Type ``text``, press Enter; returns how long the GUI was blocked by the key press."""
    dock.query.clear()
    QTest.keyClicks(dock.query, text)
    started = time.perf_counter()
    QTest.keyClick(dock.query, Qt.Key_Return)
    return time.perf_counter() - started


def test_dock_never_blocks_and_shows_results_over_the_imagery(dock, project_layer, embedded_master):
    layer = project_layer
    style_before = layer.renderer().dump()
    assert dock.set_layer(layer)
    dock.k.setValue(5)
    blocked = run_query(dock, QUERY)
    assert blocked < 0.5  # the model loads in a task
    assert "loading the model" in dock.status.text() and dock.cancel_button.isEnabled()
    first = wait_for(lambda: dock.task.done)
    expected = SearchSession(str(embedded_master)).search_text(QUERY, k=5).tile_id.tolist()
    assert [h.result["tile_id"] for h in dock.hits] == expected
    assert dock.table.rowCount() == 5 and not dock.table.verticalHeader().isVisible()
    assert [dock.table.item(r, 1).text() for r in range(5)] == ["1", "2", "3", "4", "5"]
    captions = {f["tile_id"]: f["caption"] for f in layer.getFeatures()}
    assert [dock.table.item(r, 3).text() for r in range(5)] == [captions[t] for t in expected]
    assert expected[0] in dock.table.item(0, 3).toolTip()  # tile id and full caption in the tooltip
    thumbnail = dock.table.item(0, 0).data(Qt.DecorationRole)
    assert thumbnail is not None and thumbnail.availableSizes() == [QSize(72, 72)]  # drawn at the icon size
    assert not thumbnail.pixmap(72).toImage().isGrayscale()
    # results: a layer of their own, outlines coloured by score with rank labels; the tiles untouched
    hits = dock.results_layer()
    assert hits.name() == f'hits: "{QUERY}"' and hits.featureCount() == 5
    assert hits.renderer().type() == "graduatedSymbol" and hits.labelsEnabled()
    assert hits.renderer().ranges()[0].symbol().symbolLayer(0).brushStyle() == Qt.NoBrush
    assert sorted(f["tile_id"] for f in hits.getFeatures()) == sorted(expected)
    assert QgsProject.instance().layerTreeRoot().findGroup("HQRS results").findLayer(hits.id()) is not None
    assert layer.renderer().dump() == style_before and layer.selectedFeatureCount() == 0
    assert dock.iface_stand_in.map_tips.isChecked() and "caption" in layer.mapTipTemplate()
    # the second query reuses the session's loaded model
    run_query(dock, "parking lot")
    second = wait_for(lambda: dock.task.done)
    assert second < 1.0 < first or second < first / 2
    assert len(dock.result_layer_ids) == 1 and dock.results_layer().name() == 'hits: "parking lot"'
    print(f"\ndock: first query {first:.2f} s (model loading), second {second:.3f} s")
    # heat map: every tile's score, semi-transparent, under the outlines
    dock.heatmap.setChecked(True)
    run_query(dock, QUERY)
    wait_for(lambda: dock.task.done)
    heat = next(QgsProject.instance().mapLayer(i) for i in dock.result_layer_ids
                if QgsProject.instance().mapLayer(i).name().startswith("heat:"))
    assert heat.featureCount() == 64 and heat.opacity() < 1 and not heat.labelsEnabled()
    dock.heatmap.setChecked(False)
    # find similar from a result row; the example itself is left out
    dock.table.selectRow(2)
    example = dock.hits[2].result["tile_id"]
    dock.search_similar()
    wait_for(lambda: dock.task.done)
    listed = [h.result["tile_id"] for h in dock.hits]
    assert listed == SearchSession(str(embedded_master)).search_similar([example], k=5).tile_id.tolist()
    # clicking a row zooms to its tile
    dock.zoom_to_row(0)
    assert dock.iface_stand_in.canvas.extent().contains(dock.hits[0].geometry.boundingBox())
    dock.clear_results()
    assert dock.result_layer_ids == [] and dock.table.rowCount() == 0
    assert QgsProject.instance().layerTreeRoot().findGroup("HQRS results") is None


def test_cancel_while_the_model_loads(dock, project_layer):
    assert dock.set_layer(project_layer)
    run_query(dock, QUERY)
    dock.cancel()
    wait_for(lambda: dock.task.done, 60)
    assert dock.status.text() == "cancelled" and not dock.cancel_button.isEnabled()
    run_query(dock, QUERY)  # the next query loads it again
    wait_for(lambda: dock.task.done)
    assert dock.table.rowCount() == 20


def test_layer_list_shows_tile_layers_with_their_embedding_models(dock, embedded_master, tiny_clip_checkpoint,
                                                                   tmp_path):
    two = shutil.copy(embedded_master, tmp_path / "two.gpkg")
    other = shutil.copy(tiny_clip_checkpoint, tmp_path / "other.pt")
    embed(two, model=TINY_CLIP, checkpoint=str(other), device="cpu", options=RunOptions(workers=0))
    plain = tmp_path / "plain.gpkg"
    tile(EXAMPLE_SCENE, plain, TileConfig(tile_size=500))
    from hqrs_geo.search.output import write_result_layer

    results = SearchSession(str(two), model="hqrs_test_tiny_clip_tiny_clip").search_text(QUERY, k=3)
    write_result_layer(str(two), results, "search_river", {"query": QUERY})
    layers = [QgsVectorLayer(f"{two}|layername=tiles", "two", "ogr"),
              QgsVectorLayer(f"{plain}|layername=tiles", "plain", "ogr"),
              QgsVectorLayer(f"{two}|layername=search_river", "river results", "ogr")]
    assert all(layer.isValid() for layer in layers)
    QgsProject.instance().addMapLayers(layers)
    try:
        dock.refresh_layers()
        assert dock.layer_box.itemText(dock.layer_box.count() - 1) == "Open dataset…"  # always last
        entries = [dock.layer_box.itemText(i) for i in range(dock.layer_box.count() - 1)]
        assert len(entries) == 2 and all(e.startswith("two — ") for e in entries)  # one per model
        assert entries[0] != entries[1] and any("other" in e for e in entries)
        assert "plain: no embeddings yet" in dock.layer_hint.text() and "Embed tiles" in dock.layer_hint.text()
        for index in range(2):  # each choice searches its own embeddings
            dock.layer_box.setCurrentIndex(index)
            dock.k.setValue(3)
            run_query(dock, QUERY)
            wait_for(lambda: dock.task.done)
            assert dock.table.rowCount() == 3, dock.status.text()
        assert len({key.embeddings for key in sessions.running_sessions()}) == 2
    finally:
        for layer in layers:
            QgsProject.instance().removeMapLayer(layer.id())


@pytest.fixture
def bare_interpreter(tmp_path):
    import subprocess

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    previous = QgsSettings().value(settings.key("interpreter"), None)
    python = str(tmp_path / "bare" / "bin" / "python")
    yield python
    QgsSettings().setValue(settings.key("interpreter"), previous or "")


def test_errors_show_in_the_dock_and_message_bar_with_their_fix(dock, project_layer, bare_interpreter):
    assert dock.set_layer(project_layer)
    settings.set_value("interpreter", bare_interpreter)
    run_query(dock, QUERY)
    wait_for(lambda: dock.task.done)
    assert "hqrs_geo" in dock.status.text() and "Set up engine" in dock.status.text()
    assert dock.pages.currentIndex() == 1  # the set-up page
    bar = dock.iface_stand_in.bar
    item = bar.currentItem()
    assert item is not None and "Set up engine" in item.text()
    assert [b.text() for b in item.findChildren(QPushButton)] == ["Set up engine…"]


@pytest.fixture
def saved_device():
    """The device setting, restored after the test's dock is gone (requested before ``dock``): a
    dock would check the engine again for the restored device, a process the test does not need."""
    previous = settings.value("device")
    yield
    settings.set_value("device", previous)


def test_settings_changes_restart_search_sessions(saved_device, dock, project_layer):
    assert dock.set_layer(project_layer)
    settings.set_value("device", "auto")
    run_query(dock, QUERY)
    wait_for(lambda: dock.task.done)
    assert [key.device for key in sessions.running_sessions()] == ["auto"]
    settings.set_value("device", "cpu")
    assert sessions.running_sessions() == []  # closed: the next query starts one with the new device
    run_query(dock, QUERY)
    wait_for(lambda: dock.task.done)
    assert [key.device for key in sessions.running_sessions()] == ["cpu"] and dock.table.rowCount() == 20


def test_engine_task_progress_and_cancel(qgis, tmp_path):  # noqa: F811 - the shared QGIS fixture
    from qgis_plugin.core.tasks import EngineTask, start

    big = write_sparse_scene(tmp_path / "big.tif")
    out = tmp_path / "big.gpkg"
    done = []
    task = start(EngineTask("tile", ["tile", str(big), "-o", str(out), "--tile-size", "64"], on_done=done.append,
                            python=sys.executable))
    wait_for(lambda: task.progress() > 0, 60)
    assert task.last.text.startswith("tiling: ")
    task.cancel()
    wait_for(lambda: bool(done), 60)
    assert done[0].cancelled and done[0].returncode == 130
    assert not out.exists()  # nothing half-written
    small = tmp_path / "small.gpkg"
    finished = []
    start(EngineTask("tile", ["tile", str(EXAMPLE_SCENE), "-o", str(small), "--tile-size", "250"],
                     on_done=finished.append, python=sys.executable))
    wait_for(lambda: bool(finished), 120)
    assert finished[0].ok and len(read_tiles(small)) == 16


def test_settings_dialog_round_trip_and_background_check(qgis):  # noqa: F811 - the shared QGIS fixture
    from qgis_plugin.widgets.settings_dialog import SettingsDialog

    before = settings.values()
    try:
        dialog = SettingsDialog()
        dialog.device.setCurrentText("cpu")
        dialog.batch.setValue(7)
        dialog.tile_size.setValue(62.5)
        dialog.tile_unit.setCurrentIndex(1)
        dialog.model.setCurrentIndex(dialog.model.findData("remoteclip-vit-b-32"))
        changed = []
        settings.notifier.changed.connect(changed.extend)
        dialog.save()
        settings.notifier.changed.disconnect(changed.extend)
        assert {"device", "batch_size", "tile_size", "tile_unit", "model"} <= set(changed)
        assert settings.value("device") == "cpu" and settings.value("batch_size") == 7
        assert settings.value("tile_size") == 62.5 and settings.value("tile_unit") == "m"
        again = SettingsDialog()
        assert again.batch.value() == 7 and again.device.currentText() == "cpu"
        assert again.model.currentData() == "remoteclip-vit-b-32" and again.tile_unit.currentData() == "m"
        started = time.perf_counter()
        QTest.mouseClick(again.check, Qt.LeftButton)
        assert time.perf_counter() - started < 0.5  # the check (torch import) runs in a task
        wait_for(lambda: again.task.done, 120)
        text = again.check_result.text()
        assert text.startswith("engine OK: hqrs_geo ") and " on cpu, " in text and text.endswith(" threads")
    finally:
        settings.set_values(before)


def test_example_renders_search_map(qgis, embedded_master, tmp_path):  # noqa: F811 - the shared QGIS fixture
    import numpy as np
    from PIL import Image

    from examples.render_search_map import render

    png = tmp_path / "map.png"
    summary = render(str(embedded_master), QUERY, str(png), k=10, size=300)
    image = np.asarray(Image.open(png).convert("RGB"))
    assert image.shape == (300, 300, 3) and image.std() > 10
    assert summary["top"] == SearchSession(str(embedded_master)).search_text(QUERY, k=1).tile_id[0]


# -------------------------------------------------------------------- datasets (partitioned folders)
@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory, tiny_clip_checkpoint, tiny_coca_checkpoint):
    """Three crops of the example scene as a partitioned dataset: 48 tiles in 6 parts, with
    tiny-CLIP embeddings and tiny-CoCa captions; and a dataset of the same crops without embeddings."""
    from rasterio.windows import Window
    from scale_helpers import write_crop

    from hqrs_geo.api import run
    from hqrs_geo.engine.partitioned import ScaleOptions
    from hqrs_geo.models.decoding import DecodingConfig

    folder = tmp_path_factory.mktemp("dock_dataset")
    windows = [Window(0, 0, 500, 500), Window(500, 0, 500, 500), Window(0, 500, 500, 500)]
    crops = [str(write_crop(EXAMPLE_SCENE, folder / f"q{i}.tif", w, cog=False)) for i, w in enumerate(windows)]
    run(crops, f"{folder}/archive/", embed_models=[TINY_CLIP], embed_checkpoints=[str(tiny_clip_checkpoint)],
        caption_model=TINY_COCA, caption_checkpoint=str(tiny_coca_checkpoint),
        decoding=DecodingConfig(method="greedy", max_length=4, min_length=1), device="cpu",
        tiling=TileConfig(tile_size=125), options=RunOptions(batch_size=32), scale=ScaleOptions(block_tiles=8))
    tile(crops, f"{folder}/plain/", TileConfig(tile_size=250))
    return folder


def open_dataset_from_the_list(dock, folder) -> bool:
    """Pick "Open dataset…" in the layer list's popup (as a user does) and choose ``folder`` in the browser."""
    box = dock.layer_box
    box.showPopup()
    view = box.view()
    entry = view.visualRect(view.model().index(box.count() - 1, 0)).center()  # the last entry: "Open dataset…"
    QTest.mouseClick(view.viewport(), Qt.LeftButton, Qt.NoModifier, entry)
    assert not view.isVisible()
    dialog = dock.folder_dialog
    assert dialog is not None and dialog.isVisible()
    dialog.selectFile(str(folder))
    dialog.accept()
    return dock.folder_dialog is None


def test_dock_searches_a_dataset_folder_without_loading_it(dock, dataset_folder, tmp_path):
    from hqrs_geo.layer.dataset import read_dataset_tiles
    from hqrs_geo.search.partitioned import DatasetSession
    from qgis_plugin.core import datasets

    archive = dataset_folder / "archive"
    manifest = json.loads((archive / "_manifest.json").read_text())
    project = QgsProject.instance()
    layers_before = set(project.mapLayers())
    try:
        assert dock.layer_box.itemText(dock.layer_box.count() - 1) == "Open dataset…"
        # not a dataset, a dataset without embeddings: said in the dock and the message bar
        assert open_dataset_from_the_list(dock, dataset_folder)
        assert "not a dataset (no _manifest.json)" in dock.status.text() and "hqrs-geo" not in dock.status.text()
        assert "not a dataset" in dock.iface_stand_in.bar.currentItem().text()
        assert not dock.add_dataset(str(dataset_folder / "plain"))
        assert "no embeddings yet" in dock.status.text() and "hqrs-geo" not in dock.status.text()
        assert not dock.add_dataset(str(archive / "_search")) and "inside a dataset; choose its parent" in \
            dock.status.text()
        # the dataset: listed with its tile count and model, chosen, nothing loaded into QGIS
        assert open_dataset_from_the_list(dock, archive)
        choice = dock.current_choice()
        assert choice.dataset and choice.path == str(archive) and choice.layer_id == ""
        text = dock.layer_box.currentText()
        assert text == f"archive/ — 48 tiles — {DatasetSession(str(archive)).source.model}", text
        tip = dock.layer_box.itemData(dock.layer_box.currentIndex(), Qt.ToolTipRole)
        assert f"48 tiles in {len(manifest['parts'])} parts, 3 scenes, EPSG:28992" in tip
        assert datasets.project_datasets() == [str(archive)]  # remembered in the project
        assert set(project.mapLayers()) == layers_before
        # a query: in the background, through serve-search DATASET
        dock.k.setValue(5)
        assert run_query(dock, QUERY) < 0.5
        assert "loading the model" in dock.status.text() and dock.cancel_button.isEnabled()
        wait_for(lambda: dock.task.done)
        assert "5 of the dataset's 48 tiles in " in dock.status.text(), dock.status.text()
        assert [key.layer for key in sessions.running_sessions()] == [str(archive)]
        expected = DatasetSession(str(archive)).search_text(QUERY, k=5)
        assert [h.result["tile_id"] for h in dock.hits] == expected.tile_id.tolist()
        assert [round(h.result["score"], 4) for h in dock.hits] == [round(s, 4) for s in expected.score]
        assert [dock.table.item(r, 1).text() for r in range(5)] == ["1", "2", "3", "4", "5"]
        assert [dock.table.item(r, 3).text() for r in range(5)] == expected.caption.tolist()
        thumbnail = dock.table.item(0, 0).data(Qt.DecorationRole)
        assert thumbnail is not None and thumbnail.availableSizes() == [QSize(72, 72)]
        assert not thumbnail.pixmap(72).toImage().isGrayscale()
        # the thumbnail is the tile's window of its own raster (not another tile's)
        from qgis_plugin.core.tile_layers import thumbnail as read_thumbnail

        top = expected.iloc[0]
        assert dock.hits[0].thumbnail == read_thumbnail(top.source, (top.x_off, top.y_off, top.width, top.height))
        hits = dock.results_layer()
        assert hits.name() == f'hits: "{QUERY}"' and hits.featureCount() == 5
        assert hits.crs().authid() == "EPSG:28992"
        assert hits.renderer().type() == "graduatedSymbol" and hits.labelsEnabled()
        footprints = {f["tile_id"]: f.geometry() for f in hits.getFeatures()}
        for row in expected.itertuples():
            assert footprints[row.tile_id].equals(QgsGeometry.fromWkt(row.geometry.wkt))
        assert set(project.mapLayers()) - layers_before == {hits.id()}  # only the results layer
        # find similar from a result row, zoom to a row
        dock.table.selectRow(2)
        example = dock.hits[2].result["tile_id"]
        dock.search_similar()
        wait_for(lambda: dock.task.done)
        assert [h.result["tile_id"] for h in dock.hits] == \
            DatasetSession(str(archive)).search_similar([example], k=5).tile_id.tolist()
        dock.zoom_to_row(0)
        assert dock.iface_stand_in.canvas.extent().contains(dock.hits[0].geometry.boundingBox())
        # merge the area of the selected hits to a GeoPackage, in the background; it loads as a tile layer
        assert dock.merge_button.isVisibleTo(dock) and dock.merge_button.isEnabled()
        dock.table.clearSelection()
        dock.table.selectRow(0)
        area = dock.merge_area()
        box = dock.hits[0].geometry.boundingBox()
        assert area == (box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum())
        QTest.mouseClick(dock.merge_button, Qt.LeftButton)
        dialog = dock.merge_dialog
        assert dialog is not None and dialog.selectedFiles()[0].endswith(".gpkg")
        assert dialog.selectedFiles()[0].startswith(str(dataset_folder / f"archive_like_{example}"))
        output = tmp_path / "area.gpkg"
        dialog.selectFile(str(output))
        dialog.accept()
        assert dock.merging and "merging the hits' area of archive (at most " in dock.status.text()
        wait_for(lambda: not dock.merging, 120)
        merged = project.mapLayer(dock.merged_layer_id)
        assert merged is not None and merged.isValid(), dock.status.text()
        assert merged.name().startswith('archive: "like ') and merged.name().endswith('" area')
        reference = read_dataset_tiles(archive, bbox=area)
        assert sorted(f["tile_id"] for f in merged.getFeatures()) == sorted(reference.tile_id)
        assert "merged into" in dock.status.text() and f"{len(reference)} tiles of archive" in dock.status.text()
        dock.refresh_layers()  # the merged area is a tile layer with embeddings: searchable from the list
        assert any(dock.layer_box.itemData(i).layer_id == merged.id() for i in range(dock.layer_box.count())
                   if isinstance(dock.layer_box.itemData(i), type(choice)))
        dock.clear_results()
        assert not dock.merge_button.isVisibleTo(dock) and dock.results_layer() is None
    finally:
        datasets.forget(str(archive))
        for layer_id in set(project.mapLayers()) - layers_before:
            project.removeMapLayer(layer_id)
    dock.refresh_layers()
    assert all(not getattr(dock.layer_box.itemData(i), "dataset", False) for i in range(dock.layer_box.count()))


# -------------------------------------------------------------------- results on the map, no stale state
def symbol_colour(layer, feature) -> tuple:
    """The fill and outline colours (RGBA) the layer's renderer draws ``feature`` with."""
    from qgis.core import QgsRenderContext

    context = QgsRenderContext()
    renderer = layer.renderer().clone()
    renderer.startRender(context, layer.fields())
    symbol = renderer.symbolForFeature(feature, context)
    renderer.stopRender(context)
    assert symbol is not None, feature.attributes()
    first = symbol.symbolLayer(0)
    return first.fillColor().getRgb(), first.strokeColor().getRgb(), first.brushStyle()


def test_hit_colours_are_absolute_on_the_models_score_scale(qgis):  # noqa: F811 - the shared QGIS fixture
    from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle

    from qgis_plugin.core import styles

    scale = styles.score_scale({"score_scale": {"none": 0.2, "good": 0.3}})
    assert (scale.none, scale.good) == (0.2, 0.3)
    assert styles.score_scale({}) == styles.score_scale({"score_scale": "broken"}) == \
        styles.ScoreScale(styles.DEFAULT_SCORE_SCALE["none"], styles.DEFAULT_SCORE_SCALE["good"])
    assert styles.score_scale({"score_scale": {"none": 0.2, "good": 0.3, "similar": {"none": 0.6, "good": 0.9}}},
                              similar=True) == styles.ScoreScale(0.6, 0.9)
    crs = QgsCoordinateReferenceSystem("EPSG:28992")

    def layer_of(scores):
        hits = [({"rank": i + 1, "score": s, "tile_id": f"t{i}"}, QgsGeometry.fromRect(QgsRectangle(i, 0, i + 1, 1)),
                 "") for i, s in enumerate(scores)]
        return styles.hits_layer("hits", crs, hits, scale=scale)

    # a query that matches nothing (0.04-0.10) and one that matches (0.12-0.36): the same score, the same colour
    nothing, matches = layer_of([0.10, 0.07, 0.04]), layer_of([0.36, 0.26, 0.12])
    colour = {f["score"]: symbol_colour(layer, f)[1] for layer in (nothing, matches) for f in layer.getFeatures()}
    grey, red = styles.SCORE_COLOURS[0], styles.SCORE_COLOURS[-1]
    assert {colour[0.10][:3], colour[0.07][:3], colour[0.04][:3], colour[0.12][:3]} == {QColor(grey).getRgb()[:3]}
    assert colour[0.36][:3] == QColor(red).getRgb()[:3]
    assert colour[0.26][:3] not in (colour[0.36][:3], colour[0.10][:3])
    assert all(symbol_colour(nothing, f)[2] == Qt.NoBrush for f in nothing.getFeatures())  # outlines only
    legend = [r.label() for r in nothing.renderer().ranges()]
    assert legend[0] == "≤ 0.20 no real match" and legend[-1] == "≥ 0.30 strong match"
    assert nothing.customProperty(styles.SCALE) == [0.2, 0.3]


def test_detection_style_is_graduated_on_the_probability(qgis):  # noqa: F811 - the shared QGIS fixture
    from qgis.core import QgsFeature

    from qgis_plugin.core import styles

    for field in ("detect_prob", "score"):
        layer = QgsVectorLayer(f"Polygon?crs=EPSG:28992&field=tile_id:string&field={field}:double&field=rank:integer",
                               "detections", "memory")
        features = []
        for i, p in enumerate((0.3, 0.55, 0.75, 0.95, 1.0)):
            feature = QgsFeature(layer.fields())
            feature.setGeometry(QgsGeometry.fromWkt(f"POLYGON(({i} 0,{i + 1} 0,{i + 1} 1,{i} 1,{i} 0))"))
            feature.setAttributes([f"t{i}", p, i + 1])
            features.append(feature)
        layer.dataProvider().addFeatures(features)
        styles.detection_style(layer)
        renderer = layer.renderer()
        assert renderer.type() == "graduatedSymbol" and renderer.classAttribute() == field
        assert [(r.lowerValue(), r.upperValue()) for r in renderer.ranges()][1:] == \
            [(0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0)]  # fixed classes, whatever the data
        drawn = {f[field]: symbol_colour(layer, f) for f in layer.getFeatures()}
        assert drawn[0.3][2] == Qt.NoBrush  # below 0.5: a thin outline
        for p, colour in ((0.55, styles.DETECTION_COLOURS[1]), (0.95, styles.DETECTION_COLOURS[5]),
                          (1.0, styles.DETECTION_COLOURS[5])):
            fill, stroke, _ = drawn[p]
            assert stroke[:3] == QColor(colour).getRgb()[:3] and 0 < fill[3] < 255  # see-through over the imagery
        assert "probability" in layer.mapTipTemplate() and layer.customProperty(styles.STYLED) == "detections"
    with pytest.raises(ValueError, match="no probability field"):
        styles.detection_style(QgsVectorLayer("Polygon?crs=EPSG:28992&field=x:double", "x", "memory"))


def test_results_go_above_the_imagery(qgis, tmp_path):  # noqa: F811 - the shared QGIS fixture
    from qgis.core import QgsRasterLayer

    from qgis_plugin.core import styles

    project = QgsProject.instance()
    raster = QgsRasterLayer(str(EXAMPLE_SCENE), "imagery")
    below = QgsVectorLayer("Polygon?crs=EPSG:28992", "result", "memory")
    project.addMapLayer(below, False)
    project.layerTreeRoot().addLayer(below)  # at the bottom
    project.addMapLayer(raster)
    try:
        order = [n.layer() for n in project.layerTreeRoot().findLayers()]
        assert order.index(raster) < order.index(below)
        styles.above_imagery(below)
        order = [n.layer() for n in project.layerTreeRoot().findLayers()]
        assert order.index(below) < order.index(raster) and order.count(below) == 1
    finally:
        project.removeMapLayers([raster.id(), below.id()])


def test_no_good_match_is_said_and_not_painted_red(dock, project_layer, monkeypatch):
    from qgis_plugin.core import styles

    assert dock.set_layer(project_layer)
    dock.k.setValue(5)
    run_query(dock, QUERY)
    wait_for(lambda: dock.task.done)
    info = dock.session.info
    scale = styles.score_scale(info)
    hits = dock.results_layer()
    assert [(r.lowerValue(), r.label()) for r in hits.renderer().ranges()][0] == \
        (-1.0, f"≤ {scale.none:.2f} no real match")  # the model's scale, not the query's scores
    # a model whose calibration puts every score of this query below "no real match"
    best = max(h.result["score"] for h in dock.hits)
    monkeypatch.setitem(info, "score_scale", {"none": best + 0.01, "good": best + 0.1})
    run_query(dock, QUERY)
    wait_for(lambda: dock.task.done)
    assert f"no good match for '{QUERY}' (best score {best:.2f}" in dock.status.text(), dock.status.text()
    hits = dock.results_layer()
    grey = QColor(styles.SCORE_COLOURS[0]).getRgb()[:3]
    assert all(symbol_colour(hits, f)[1][:3] == grey for f in hits.getFeatures())
    monkeypatch.setitem(info, "score_scale", {"none": best - 0.1, "good": best - 0.01})
    run_query(dock, QUERY)
    wait_for(lambda: dock.task.done)
    assert "no good match" not in dock.status.text() and dock.status.text().startswith("5 tiles in ")
    # a query replaced by a newer one before it ended: said in the status line, not a failed task
    run_query(dock, "a river")
    first, outcome = dock.task, []
    first.taskCompleted.connect(lambda: outcome.append("completed"))
    first.taskTerminated.connect(lambda: outcome.append("failed"))
    run_query(dock, "a bridge")
    assert "'a river' replaced by 'a bridge'" in dock.status.text(), dock.status.text()
    wait_for(lambda: bool(outcome) and dock.task.done)
    assert outcome == ["completed"]  # ended normally, not a failed task in QGIS' list
    assert dock.results_layer().name() == 'hits: "a bridge"' and len(dock.result_layer_ids) == 1
    assert "5 tiles in " in dock.status.text() and len(sessions.running_sessions()) == 1


@pytest.fixture
def two_layers(embedded_master, tmp_path):
    """Two copies of the embedded tile layer in the project ("north", "south")."""
    layers = [QgsVectorLayer(f"{shutil.copy(embedded_master, tmp_path / f'{name}.gpkg')}|layername=tiles", name, "ogr")
              for name in ("north", "south")]
    ids = [layer.id() for layer in layers]
    QgsProject.instance().addMapLayers(layers)
    yield layers
    for layer_id in ids:  # those the test did not remove
        if QgsProject.instance().mapLayer(layer_id) is not None:
            QgsProject.instance().removeMapLayer(layer_id)


def results_group():
    return QgsProject.instance().layerTreeRoot().findGroup("HQRS results")


def test_switching_or_removing_a_layer_leaves_no_stale_rows(dock, two_layers):
    north, south = two_layers
    assert dock.set_layer(north)
    dock.k.setValue(5)
    run_query(dock, QUERY)
    wait_for(lambda: dock.task.done)
    assert dock.table.rowCount() == 5 and dock.results_layer() is not None, dock.status.text()
    # another layer in the list: the table and the hits go at once (before any query of the new layer)
    index = next(i for i in range(dock.layer_box.count()) if getattr(dock.layer_box.itemData(i), "layer_id", "")
                 == south.id())
    dock.layer_box.setCurrentIndex(index)
    assert dock.table.rowCount() == 0 and dock.hits == [] and dock.results_layer() is None
    assert results_group() is None and dock.status.text() == ""
    dock.table.selectAll()
    dock.search_similar()
    assert "select result rows or tiles" in dock.status.text()  # nothing left to find similar tiles of
    # a query in flight when the layer changes: its answer is dropped, not shown for the other layer
    run_query(dock, "parking lot")
    flying = dock.task
    assert dock.set_layer(north)
    wait_for(lambda: flying.done)
    QgsApplication.processEvents()
    assert dock.table.rowCount() == 0 and dock.results_layer() is None and not dock.cancel_button.isEnabled()
    # the searched layer is removed: the dock moves to the other layer without the removed one's rows
    run_query(dock, QUERY)
    wait_for(lambda: dock.task.done)
    assert dock.table.rowCount() == 5
    QgsProject.instance().removeMapLayer(north.id())
    assert dock.current_choice().layer_id == south.id()
    assert dock.table.rowCount() == 0 and dock.hits == [] and results_group() is None
    assert dock.selected_tile_ids() == []
    # the last layer removed: nothing left at all
    run_query(dock, QUERY)
    wait_for(lambda: dock.task.done)
    assert dock.table.rowCount() == 5
    QgsProject.instance().removeMapLayer(south.id())
    assert dock.current_choice() is None and dock.table.rowCount() == 0 and results_group() is None


def test_the_embeddings_hint_follows_finished_runs(dock, tmp_path, tiny_clip_checkpoint):
    from qgis_plugin.core import tasks

    plain = tmp_path / "plain.gpkg"
    tile(EXAMPLE_SCENE, plain, TileConfig(tile_size=500))
    with tile_layer_in_project(plain, "plain") as layer:
        dock.refresh_layers()
        assert "plain: no embeddings yet" in dock.layer_hint.text() and dock.layer_hint.isVisibleTo(dock)
        assert "hqrs-geo" not in dock.layer_hint.text() and "Embed tiles" in dock.layer_hint.text()
        # an engine run in a background task (as Processing runs one) writes embeddings into the file
        task = tasks.start(tasks.CallTask("embed", lambda _t: embed(
            plain, model=TINY_CLIP, checkpoint=str(tiny_clip_checkpoint), device="cpu",
            options=RunOptions(workers=0))))
        wait_for(lambda: task.done, 120)
        wait_for(lambda: not dock.layer_hint.isVisibleTo(dock), 5)  # no refresh by hand
        assert any(dock.layer_box.itemData(i).layer_id == layer.id() for i in range(dock.layer_box.count() - 1))


def test_help_and_hints_name_gui_actions_not_terminal_commands(qgis):  # noqa: F811 - the shared QGIS fixture
    import re

    from qgis_plugin.processing.algorithms import algorithms

    for alg in algorithms():
        assert not re.search(r"hqrs-geo \w", alg.shortHelpString()), (alg.name(), alg.shortHelpString())
    source = (ROOT / "qgis_plugin" / "widgets" / "dock.py").read_text()
    texts = re.findall(r'"((?:[^"\\]|\\.)*)"', source.split('"""', 2)[2])  # string literals after the docstring
    assert not [t for t in texts if "hqrs-geo " in t and "``" not in t]


def test_zero_shot_classes_are_drawn_with_a_legend_over_the_imagery(processing_run, dock, project_layer):  # noqa: F811
    import processing
    from qgis.core import QgsLayerTreeModel, QgsRasterLayer

    project = QgsProject.instance()
    imagery = QgsRasterLayer(str(EXAMPLE_SCENE), "imagery")
    project.addMapLayer(imagery)  # the imagery above the tile layer, as an analyst adds it
    style_before, imagery_id = project_layer.renderer().dump(), imagery.id()
    labels = ["river", "forest", "parking lot"]
    try:
        processing.runAndLoadResults("hqrs:classify", {"INPUT": project_layer, "LABELS": ", ".join(labels)})
        found = [layer for layer in project.mapLayers().values() if layer.name().startswith("classes: ")]
        assert len(found) == 1
        classes = found[0]
        assert classes.name() == "classes: river, forest, parking lot" and classes.id() != project_layer.id()
        assert classes.featureCount() == project_layer.featureCount() == 64
        written = {f["label"] for f in classes.getFeatures()}
        renderer = classes.renderer()
        assert renderer.type() == "categorizedSymbol" and renderer.classAttribute() == "label"
        assert [c.value() for c in renderer.categories()] == [label for label in labels if label in written]
        for category in renderer.categories():  # see-through fill, solid outline in the class colour
            fill, stroke = category.symbol().color(), category.symbol().symbolLayer(0).strokeColor()
            assert 0 < fill.alpha() < 255 and stroke.alpha() == 255 and fill.rgb() == stroke.rgb()
        assert len({c.symbol().color().rgb() for c in renderer.categories()}) == len(renderer.categories())
        assert classes.labelsEnabled() and classes.labeling().settings().fieldName == "label"
        assert "label_score" in classes.mapTipTemplate()
        # the legend: one entry per class with its tile count; the layer above the imagery
        node = project.layerTreeRoot().findLayer(classes.id())
        model = QgsLayerTreeModel(project.layerTreeRoot())
        legend = [n.data(Qt.DisplayRole) for n in model.layerLegendNodes(node)]
        counts = {label: sum(f["label"] == label for f in classes.getFeatures()) for label in written}
        wait_for(lambda: all("N/A" not in n.data(Qt.DisplayRole) for n in model.layerLegendNodes(node)), 30)
        legend = [n.data(Qt.DisplayRole) for n in model.layerLegendNodes(node)]  # counted in the background
        assert legend == [f"{c.value()} [{counts[c.value()]}]" for c in renderer.categories()], legend
        order = [n.layer() for n in project.layerTreeRoot().findLayers()]
        assert order.index(classes) < order.index(imagery) < order.index(project_layer)
        assert project_layer.renderer().dump() == style_before  # the tile layer's own style untouched
        dock.refresh_layers()  # the classes layer is not a second entry for the same tiles in the dock's list
        assert [dock.layer_box.itemData(i).layer_id for i in range(dock.layer_box.count() - 1)] == [project_layer.id()]
        # a new run's layer replaces the earlier one (as Processing loads it)
        from qgis.core import QgsProcessingContext, QgsProcessingFeedback

        from qgis_plugin.processing.base import StylePostProcessor

        again = QgsVectorLayer(classes.source(), "new", "ogr")
        project.addMapLayer(again)
        StylePostProcessor("classes: water, roofs", "classes", labels=["water"]).postProcessLayer(
            again, QgsProcessingContext(), QgsProcessingFeedback())
        found = [layer for layer in project.mapLayers().values() if layer.name().startswith("classes: ")]
        assert found == [again] and again.renderer().type() == "categorizedSymbol"
    finally:
        for layer in list(project.mapLayers().values()):
            if layer.name().startswith("classes: ") or layer.id() == imagery_id:
                project.removeMapLayer(layer.id())


def visible_rows(table) -> float:
    """How many rows of ``table`` its viewport shows."""
    return table.viewport().height() / table.rowHeight(0)


def settle() -> None:
    """Let layouts and the dock's splitter follow a change."""
    for _ in range(4):
        QgsApplication.processEvents()


def test_the_hit_list_gets_the_docks_height_and_the_sections_keep_their_state(qgis, project_layer):  # noqa: F811
    """20 hits with thumbnails in a 520x760 dock: 8+ rows while the few-shot and change sections are collapsed (as
    they start), 4+ with a section expanded, what an expanded section does not fit scrolls; the
    state and the dragged height come back in a new dock (QgsSettings of this test's HOME)."""
    QgsSettings().remove("hqrs_geo/dock")

    def open_dock():
        dock = new_dock()
        dock.engine_checked = True  # no engine probe when shown: this test is about the layout
        dock.resize(520, 760)
        dock.show()
        settle()
        return dock

    dock = open_dock()
    try:
        assert dock.fewshot.isCollapsed() and dock.changes.isCollapsed()
        assert dock.set_layer(project_layer)
        # 20 hits, read from the tile layer and shown the way a search's answer is (no engine: fast)
        ids = [f["tile_id"] for f in project_layer.getFeatures()][:20]
        results = [{"tile_id": t, "rank": i + 1, "score": 0.6 - i / 100} for i, t in enumerate(ids)]
        dock.hits = dock._read_hits(project_layer.source().split("|")[0], results, 20)
        dock.show_results(QUERY, project_layer.crs(), [])
        settle()
        assert dock.table.rowCount() == 20 and dock.table.item(0, 0).data(Qt.DecorationRole) is not None
        collapsed_rows = visible_rows(dock.table)
        assert collapsed_rows >= 8, collapsed_rows
        assert dock.fewshot.isVisible() and dock.changes.isVisible()  # their titles are shown
        # the analyst opens the few-shot section (its arrow): it gets room, the hit list keeps 4 rows
        QTest.mouseClick(dock.fewshot.findChild(QToolButton, "collapseButton"), Qt.LeftButton)
        settle()
        assert not dock.fewshot.isCollapsed()
        one_open = visible_rows(dock.table)
        assert one_open >= 4, one_open
        pane = dock.splitter.pane
        top = dock.fewshot.add_hits_button.mapTo(pane.viewport(), dock.fewshot.add_hits_button.rect().bottomLeft())
        assert 0 < top.y() <= pane.viewport().height()  # its buttons are on screen
        assert dock.fewshot.table.viewport().height() > 0
        # "Compare with…" opens the change section too: the hit list still keeps 4 rows, the pane scrolls
        dialog = dock.changes.open_dialog()
        dialog.close()
        settle()
        assert not dock.changes.isCollapsed() and dock.changes.compare_button.isVisible()
        assert not dock.changes.progress.isVisible()  # no run: no progress bar
        both_open = visible_rows(dock.table)
        assert both_open >= 4, both_open
        assert pane.verticalScrollBar().maximum() > 0
        # a taller dock: the extra height goes to the hit list
        before = dock.splitter.sizes()
        dock.resize(520, 1000)
        settle()
        after = dock.splitter.sizes()
        assert after[1] == before[1] and after[0] == before[0] + 240, (before, after)
        # the analyst drags the handle up 60 px
        dock.splitter.moveSplitter(after[0] - 60, 1)
        dragged = dock.splitter.sizes()[1]
        assert dragged == after[1] + 60
    finally:
        close_dock(dock)
    dock = open_dock()  # as the analyst left it
    try:
        assert not dock.fewshot.isCollapsed() and not dock.changes.isCollapsed()
        dock.resize(520, 1000)
        settle()
        dock.splitter.arrange()
        assert dock.splitter.sizes()[1] == dragged
        dock.fewshot.setCollapsed(True)
        dock.changes.setCollapsed(True)
    finally:
        close_dock(dock)
    dock = open_dock()
    try:
        assert dock.fewshot.isCollapsed() and dock.changes.isCollapsed()
        assert dock.splitter.sizes()[1] < 3 * dock.fontMetrics().height() + 20  # the two titles only
    finally:
        close_dock(dock)
        QgsSettings().remove("hqrs_geo/dock")
    print(f"\ndock 520x760, 20 hits: rows visible {collapsed_rows:.1f} (sections collapsed), {one_open:.1f} (one "
          f"expanded), {both_open:.1f} (both)")
