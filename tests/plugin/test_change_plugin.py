"""Change detection in QGIS: the command line the plugin builds, the change style drawn on a change
layer written here with the engine's fixed columns, the Processing algorithm "Compare two dates"
and the dock's "Compare with…" panel run end to end with the real engine on two dates of the
example scene (the later one with some tiles painted over), in real, headless QGIS."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
from conftest import EXAMPLE_SCENE, ROOT
from qgis.core import (
    NULL,
    QgsApplication,
    QgsGraduatedSymbolRenderer,
    QgsMapRendererCustomPainterJob,
    QgsMapSettings,
    QgsProcessingContext,
    QgsProcessingOutputLayerDefinition,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QColor, QImage, QPainter
from qgis_fixtures import (  # noqa: F401  (fixtures)
    Recorder,
    close_dock,
    new_dock,
    no_installed_engine,
    processing_run,
    qgis,
    wait_for,
    xyz_server,
)

from qgis_plugin.core import changes, settings, styles
from qgis_plugin.core.changes import ChangeError, ChangeOptions

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning:qgis_plugin", "error::ResourceWarning")
SIDE = 100.0  # metres of a tile in the layers written here


# -- the command line ---------------------------------------------------------------------------
def test_change_args_carry_every_option_and_refuse_one_date_twice(tmp_path):
    args = changes.change_args("/d/2019.tif", "/d/2023.tif", "/d/out.gpkg", ChangeOptions(
        became=" a solar farm ", stopped="-forest", labels=["farmland", " ", "residential"], threshold=2.5,
        min_overlap=0.25, captions=False, model="hqrs-mini-clip", caption_model="hqrs-mini-coca", device="cpu",
        extra=["--tile-size", "64m"]))
    assert args[:5] == ["change", "/d/2019.tif", "/d/2023.tif", "-o", "/d/out.gpkg"]
    assert {"--threshold=2.5", "--min-overlap=0.25", "--became=a solar farm", "--stopped=-forest",
            "--labels=farmland,residential", "--no-captions", "--model=hqrs-mini-clip", "--device=cpu"} <= set(args)
    assert not any(a.startswith("--caption-model") for a in args)  # no captions: no caption model
    assert args[-2:] == ["--tile-size", "64m"]
    plain = changes.change_args("a.gpkg", "b.gpkg", "c.gpkg")
    assert plain == ["change", "a.gpkg", "b.gpkg", "-o", "c.gpkg", "--threshold=3.0", "--min-overlap=0.5"]
    with pytest.raises(ChangeError, match="both dates are"):
        changes.change_args(str(tmp_path / "a.gpkg"), str(tmp_path / "." / "a.gpkg"), "c.gpkg")
    with pytest.raises(ChangeError, match="fraction from 0 to 1"):
        changes.change_args("a", "b", "c", ChangeOptions(min_overlap=2))
    assert ChangeOptions(became="x").ranking == "became" and ChangeOptions(stopped="y").ranking == "stopped"
    assert changes.layer_name("/d/delft_2019.tif", "/d/delft_2023_tiles.gpkg", ChangeOptions(became="a pond")) \
        == 'change: delft_2019 → delft_2023_tiles (became "a pond")'
    assert changes.default_output(str(tmp_path / "b.tif"), "/x/a.gpkg") == str(tmp_path / "b_vs_a_change.gpkg")


def test_settings_give_the_models_and_tiling_of_raster_dates(qgis):  # noqa: F811 - the shared QGIS fixture
    before = settings.values()
    try:
        settings.set_values({"model": "hqrs-mini-clip", "caption_model": "hqrs-mini-coca", "device": "cpu",
                             "tile_size": 62.5, "tile_unit": "m", "overlap": 50.0, "gsd": 0.0})
        options = changes.settings_options(models=True, tiling=True, became="a road")
        args = changes.change_args("a.tif", "b.tif", "c.gpkg", options)
        assert {"--model=hqrs-mini-clip", "--caption-model=hqrs-mini-coca", "--device=cpu",
                "--became=a road"} <= set(args)
        assert args[-4:] == ["--tile-size", "62.5m", "--overlap", "50%"]
        layers = changes.change_args("a.gpkg", "b.gpkg", "c.gpkg", changes.settings_options(models=False,
                                                                                             tiling=False))
        assert not any(a.startswith(("--model", "--tile-size", "--caption-model")) for a in layers)
        assert "--device=cpu" in layers  # the device always
    finally:
        settings.set_values(before)


# -- a change layer with the engine's columns, written here ---------------------------------------
ROWS = [  # tile_id, change_score, change_rank, caption_before, caption_after, class_before, class_after
    ("t0", 0.2, 4, "a river", "a river", "water", "water"),
    ("t1", 4.0, 2, "a field", "a parking lot", "farmland", "residential"),
    ("t2", 9.0, 1, "trees", "houses", "forest", "residential"),
    ("t3", None, None, "a road", None, "road", None),
    ("t4", 2.2, 3, "a roof", "a roof", "residential", "residential"),
]


def write_change_layer(path, rows=ROWS, threshold=3.0):
    """A change layer in EPSG:28992 (one 100 m tile per row, side by side) with the fixed columns."""
    import geopandas as gpd
    from shapely.geometry import box

    records = []
    for i, (tile_id, score, rank, cap_b, cap_a, cls_b, cls_a) in enumerate(rows):
        compared = score is not None
        records.append({
            "tile_id": tile_id, "after_tile_id": tile_id if compared else None, "overlap": 1.0 if compared else 0.0,
            "compared": compared, "change_cosine": 0.1 * score if compared else None, "change_score": score,
            "change_pct": 10.0 * (rank or 0) if compared else None, "changed": bool(compared and score >= threshold),
            "change_rank": rank, "caption_before": cap_b, "caption_after": cap_a, "class_before": cls_b,
            "class_after": cls_a, "class_change": f"{cls_b} → {cls_a}" if compared and cls_a != cls_b else "",
            "geometry": box(127375 + i * SIDE, 428000, 127375 + (i + 1) * SIDE, 428000 + SIDE)})
    frame = gpd.GeoDataFrame(records, geometry="geometry", crs="EPSG:28992")
    frame["change_rank"] = frame["change_rank"].astype("Int64")
    frame.to_file(path, layer="tiles", driver="GPKG")
    return path


def render(layer: QgsVectorLayer, size: int = 500) -> tuple[QImage, QgsMapSettings]:
    """``layer`` drawn on white, the map fitted to its extent."""
    settings_ = QgsMapSettings()
    settings_.setLayers([layer])
    settings_.setDestinationCrs(layer.crs())
    extent = layer.extent()
    extent.scale(1.05)
    settings_.setExtent(extent)
    settings_.setOutputSize(QSize(size, size // 4))
    settings_.setBackgroundColor(QColor("#ffffff"))
    image = QImage(settings_.outputSize(), QImage.Format_ARGB32)
    image.fill(QColor("#ffffff"))
    painter = QPainter(image)
    job = QgsMapRendererCustomPainterJob(settings_, painter)
    job.renderSynchronously()
    painter.end()
    return image, settings_


def tile_pixels(image: QImage, settings_: QgsMapSettings, index: int, inset: float = 0.15) -> np.ndarray:
    """The RGB pixels inside tile ``index`` (a margin of ``inset`` of the side left out)."""
    from qgis.core import QgsPointXY

    to_pixel = settings_.mapToPixel()
    x0 = 127375 + (index + inset) * SIDE
    x1 = 127375 + (index + 1 - inset) * SIDE
    top_left = to_pixel.transform(QgsPointXY(x0, 428000 + (1 - inset) * SIDE))
    bottom_right = to_pixel.transform(QgsPointXY(x1, 428000 + inset * SIDE))
    pixels = []
    for y in range(int(top_left.y()), int(bottom_right.y())):
        for x in range(int(top_left.x()), int(bottom_right.x())):
            colour = QColor(image.pixel(x, y))
            pixels.append((colour.red(), colour.green(), colour.blue()))
    return np.array(pixels, dtype=float)


def test_change_style_draws_scores_from_unchanged_to_strongly_changed_and_hatches_not_compared(qgis, tmp_path):  # noqa: F811
    path = write_change_layer(tmp_path / "change.gpkg")
    layer = QgsVectorLayer(changes.change_layer_uri(str(path)), "change", "ogr")
    assert layer.isValid() and layer.featureCount() == len(ROWS)
    styles.change_style(layer, threshold=3.0)
    renderer = layer.renderer()
    assert isinstance(renderer, QgsGraduatedSymbolRenderer) and "change_score" in renderer.classAttribute()
    legend = [item.label() for item in renderer.legendSymbolItems()]
    assert legend[0].startswith("unchanged") and legend[-2].startswith("strongly changed")
    assert legend[-1] == "not compared" and legend[3].startswith("changed (3.0")
    assert layer.customProperty(styles.STYLED) == styles.CHANGE_STYLE
    # what each tile looks like, drawn: the unchanged tile lets the imagery (white here) through, the
    # changed ones are filled warmer the more they changed, the tile that was not compared is hatched grey
    image, map_settings = render(layer)
    unchanged, changed, strongly, not_compared, some = (tile_pixels(image, map_settings, i) for i in range(5))
    assert (unchanged == 255).all()
    for fill in (changed, strongly):
        r, g, b = np.median(fill, axis=0)
        assert r > 200 and r - b > 60, (r, g, b)  # red/orange over white
    assert np.median(strongly, axis=0)[1] < np.median(changed, axis=0)[1]  # stronger: darker red
    assert np.median(some, axis=0)[2] > np.median(changed, axis=0)[2]  # some change: paler than changed
    grey = np.all(np.abs(not_compared - not_compared.mean(axis=1, keepdims=True)) < 12, axis=1) & \
        (not_compared[:, 0] < 200)
    share = grey.mean()
    assert 0.05 < share < 0.7, share  # hatched: grey lines with white between them
    # map tips name the rank, the score and both dates
    assert "change_rank" in layer.mapTipTemplate() and "caption_before" in layer.mapTipTemplate()
    # the threshold recorded by a run is the default of a later styling
    assert styles.change_threshold(layer) == 3.0


def test_change_ranges_follow_the_threshold():
    ranges = styles.change_ranges(6.0)
    assert [round(high, 6) for _low, high, _c, _t in ranges[:-1]] == [2.0, 4.0, 6.0, 10.0]
    assert math.isinf(ranges[-1][1]) and ranges[3][3] == "changed (6.0 – 10.0)"
    assert styles.change_ranges(float("nan"))[3][3] == "changed (3.0 – 5.0)"


def test_most_changed_tiles_are_read_best_first(qgis, tmp_path):  # noqa: F811
    path = str(write_change_layer(tmp_path / "change.gpkg"))
    rows = changes.read_change_file(path, k=3)
    assert [r.tile_id for r in rows] == ["t2", "t1", "t4"] and [r.rank for r in rows] == [1, 2, 3]
    assert rows[0].score == 9.0 and rows[0].changed and not rows[2].changed
    assert rows[0].what == "forest → residential; trees → houses"
    assert rows[2].what == "residential (same class); a roof → a roof"
    assert abs(rows[1].geometry.boundingBox().xMinimum() - (127375 + SIDE)) < 1e-6
    assert len(changes.read_change_file(path, k=50)) == 4  # the tile that was not compared has no rank
    with pytest.raises(ChangeError, match="no became_rank column"):
        changes.read_change_file(path, ranking="became")
    assert changes.summary({"compared": 4, "changed": 2, "threshold": 3.0, "not_compared": 1}) == \
        "2 of 4 compared tile pairs changed (change score ≥ 3); 1 not compared"


# -- which layers are a date ----------------------------------------------------------------------
def test_dates_are_file_rasters_and_tile_layers(qgis, tmp_path, example_layer):  # noqa: F811
    raster = QgsRasterLayer(str(EXAMPLE_SCENE), "scene")
    tiles = QgsVectorLayer(f"{example_layer}|layername=tiles", "tiles", "ogr")
    change = QgsVectorLayer(changes.change_layer_uri(str(write_change_layer(tmp_path / "c.gpkg"))), "c", "ogr")
    xyz = QgsRasterLayer("type=xyz&url=http://127.0.0.1:9/{z}/{x}/{y}.png&zmin=0&zmax=19", "web", "wms")
    assert changes.is_date_layer(raster) and changes.is_date_layer(tiles)
    assert not changes.is_date_layer(change) and not changes.is_date_layer(xyz)
    assert changes.date_path(raster) == str(EXAMPLE_SCENE) and changes.date_path(tiles) == str(example_layer)
    with pytest.raises(ChangeError, match="not a raster file"):
        changes.date_path(xyz)
    with pytest.raises(ChangeError):
        changes.date_path(change)


# -- end to end with the engine: two dates of the example scene ---------------------------------
TILE_PX = 250  # 4 x 4 tiles of the 1000 px scene
PAINTED = ((0, 1), (2, 2), (3, 0))  # (row, column) of tiles with a new roof on the later date
EMPTY = ((1, 3),)  # tiles the later date does not cover (nodata): not compared


def later_date(path):
    """The example scene as a later date: a little darker and warmer all over (another day, another
    light: every pair differs a little), three tiles covered by a new roof, one tile without data."""
    import rasterio

    with rasterio.open(EXAMPLE_SCENE) as src:
        data, profile = src.read().astype(float), src.profile
    rng = np.random.default_rng(7)
    later = np.clip(data * np.array([0.9, 0.85, 0.8])[:, None, None] + 10, 1, 255)
    for row, col in PAINTED:
        window = (slice(None), slice(row * TILE_PX, (row + 1) * TILE_PX), slice(col * TILE_PX, (col + 1) * TILE_PX))
        later[window] = np.array([175.0, 75.0, 55.0])[:, None, None] + rng.normal(0, 8, later[window].shape)
    later = np.clip(later, 1, 255).astype(np.uint8)
    for row, col in EMPTY:
        later[:, row * TILE_PX:(row + 1) * TILE_PX, col * TILE_PX:(col + 1) * TILE_PX] = 0
    profile.update(compress="deflate", photometric="rgb", nodata=0)
    profile.pop("jpeg_quality", None)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(later)
    return path


@pytest.fixture(scope="module")
def dates(tmp_path_factory):
    """(earlier, later) rasters of the same place."""
    folder = tmp_path_factory.mktemp("dates")
    before = shutil.copy(EXAMPLE_SCENE, folder / "town_2019.tif")
    return before, later_date(folder / "town_2023.tif")


def tile_ids(layer_path, cells) -> set[str]:
    """The tile ids of the tiles at (row, column) ``cells`` of a tile layer of the scene."""
    from hqrs_geo import read_tiles

    frame = read_tiles(layer_path)
    wanted = {(row * TILE_PX, col * TILE_PX) for row, col in cells}
    return {str(t) for t, x, y in zip(frame["tile_id"], frame["x_off"], frame["y_off"]) if (y, x) in wanted}


@pytest.fixture
def mini_models():
    """The shipped demo models (no download) on the CPU, as the HQRS settings."""
    before = settings.values()
    settings.set_values({"model": "hqrs-mini-clip", "caption_model": "hqrs-mini-coca", "device": "cpu"})
    yield
    settings.set_values(before)


def test_compare_two_dates_in_processing_loads_the_change_layer_over_the_imagery(processing_run, mini_models,  # noqa: F811
                                                                                 dates, tmp_path):
    from processing.gui.Postprocessing import handleAlgorithmResults

    before, after = dates
    project = QgsProject.instance()
    imagery = QgsRasterLayer(str(before), "town 2019")
    project.addMapLayer(imagery)
    out = tmp_path / "town_change.gpkg"
    context = QgsProcessingContext()
    context.setProject(project)
    feedback = Recorder()
    try:
        result = processing_run("hqrs:change", {
            "BEFORE": str(before), "AFTER": str(after), "TILE_SIZE": TILE_PX, "CAPTIONS": False,
            "LABELS": "water, trees, buildings, road", "THRESHOLD": 2.5, "DEVICE": "cpu",
            "OUTPUT": QgsProcessingOutputLayerDefinition(str(out), project)}, context=context, feedback=feedback)
        command = feedback.commands[-1]
        assert " change " in command and "--model=hqrs-mini-clip" in command and "--no-captions" in command
        assert "--tile-size 250" in command and "--threshold=2.5" in command
        assert "--labels=water,trees,buildings,road" in command
        assert any("compared tile pairs changed" in info for info in feedback.infos)
        alg = QgsApplication.processingRegistry().createAlgorithmById("hqrs:change")
        assert handleAlgorithmResults(alg, context, feedback)
        loaded = project.mapLayersByName("change: town_2019 → town_2023")
        assert len(loaded) == 1 and loaded[0].source() == result["OUTPUT"]
        layer = loaded[0]
        assert layer.customProperty(styles.STYLED) == styles.CHANGE_STYLE
        assert isinstance(layer.renderer(), QgsGraduatedSymbolRenderer)
        order = [node.layer() for node in project.layerTreeRoot().findLayers()]
        assert order.index(layer) < order.index(imagery)  # drawn over the imagery
        # the engine's result: the painted tiles are the most changed, the empty one not compared
        date_layer = tmp_path / "town_change-before.gpkg"
        painted, empty = tile_ids(date_layer, PAINTED), tile_ids(date_layer, EMPTY)
        rows = changes.read_changes(layer, k=len(PAINTED))
        assert {r.tile_id for r in rows} == painted and all(r.changed for r in rows)
        features = {str(f["tile_id"]): f for f in layer.getFeatures()}
        assert len(features) == 16 and len(empty) == 1
        assert all(not features[t]["compared"] and features[t]["change_score"] in (None, NULL) for t in empty)
        assert all(str(features[t]["class_after"]) not in ("", "NULL") for t in painted)
        # the date layers it wrote, as tile layers of the project, ranked by a text they stopped being
        tiles = {}
        for when in ("before", "after"):
            tiles[when] = QgsVectorLayer(f"{tmp_path / f'town_change-{when}.gpkg'}|layername=tiles", when, "ogr")
            project.addMapLayer(tiles[when])
        feedback = Recorder()
        processing_run("hqrs:change", {"BEFORE": tiles["before"].id(), "AFTER": tiles["after"].id(),
                                       "STOPPED": "a river", "CAPTIONS": False, "DEVICE": "cpu",
                                       "OUTPUT": str(tmp_path / "stopped.gpkg")}, feedback=feedback)
        command = feedback.commands[-1]
        assert f"{tmp_path / 'town_change-before.gpkg'} {tmp_path / 'town_change-after.gpkg'}" in command
        assert "--model" not in command and "--tile-size" not in command  # the layers' own embeddings
        stopped = changes.read_change_file(str(tmp_path / "stopped.gpkg"), k=16, ranking="stopped")
        assert [row.rank for row in stopped] == sorted(row.rank for row in stopped) and len(stopped) == 15
        from qgis.core import QgsProcessingException

        with pytest.raises(QgsProcessingException, match="the later date .after.: .*change layer"):
            processing_run("hqrs:change", {"BEFORE": tiles["before"].id(), "AFTER": result["OUTPUT"],
                                           "OUTPUT": str(tmp_path / "never.gpkg")})
        assert not (tmp_path / "never.gpkg").exists()
    finally:
        for layer in project.mapLayers().values():
            project.removeMapLayer(layer.id())


def test_compare_with_in_the_dock_lists_the_most_changed_tiles_and_zooms_to_them(qgis, mini_models, dates,  # noqa: F811
                                                                                 tmp_path):
    from qgis.PyQt.QtTest import QTest

    before, after = dates
    project = QgsProject.instance()
    earlier, later = QgsRasterLayer(str(before), "town 2019"), QgsRasterLayer(str(after), "town 2023")
    far_away = QgsRasterLayer(str(ROOT / "examples" / "data" / "pucallpa_landsat_1985.tif"), "pucallpa 1985")
    for layer in (earlier, later, far_away):
        assert layer.isValid()
        project.addMapLayer(layer)
    settings.set_values({"tile_size": float(TILE_PX), "tile_unit": "px", "overlap": 0.0, "gsd": 0.0})
    dock = new_dock(show_canvas=True, show_dock=True)
    panel = dock.changes
    try:
        dialog = panel.open_dialog(earlier)
        assert dialog.before.layer() is earlier and dialog.after.layer() is later  # the overlapping raster
        dialog.captions.setChecked(False)
        out = tmp_path / "dock_change.gpkg"
        dialog.output.setFilePath(str(out))
        QTest.mouseClick(dialog.compare_button, Qt.LeftButton)
        assert not dialog.isVisible() and not panel.compare_button.isEnabled() and panel.cancel_button.isEnabled()
        seconds = wait_for(lambda: bool(panel.rows) or "failed" in panel.status.text(), 300)
        assert panel.rows, panel.status.text()
        layer = panel.change_layer()
        assert layer is not None and layer.name() == "change: town_2019 → town_2023"
        assert project.layerTreeRoot().findLayers()[0].layer() is layer  # on top of the imagery
        painted = tile_ids(tmp_path / "dock_change-before.gpkg", PAINTED)
        assert {row.tile_id for row in panel.rows[:len(PAINTED)]} == painted
        assert panel.table.rowCount() == len(panel.rows) == 15  # the tile without data is not listed
        assert "compared tile pairs changed" in panel.status.text()
        # clicking a row selects its tile in the change layer and zooms the map to it
        item = panel.table.item(1, 2)
        QTest.mouseClick(panel.table.viewport(), Qt.LeftButton, pos=panel.table.visualItemRect(item).center())
        chosen = panel.rows[1]
        assert [str(f["tile_id"]) for f in layer.selectedFeatures()] == [chosen.tile_id]
        canvas = dock.iface_stand_in.canvas
        assert canvas.extent().contains(chosen.geometry.boundingBox())
        assert canvas.extent().width() < 6 * 62.5  # zoomed in: a few tiles across
        print(f"\ndock comparison of two rasters (tiling, embedding, scoring): {seconds:.1f} s")
        # the same comparison again as tile layers, ranked by a text the tiles became
        tiles_before = QgsVectorLayer(f"{tmp_path / 'dock_change-before.gpkg'}|layername=tiles", "tiles 2019", "ogr")
        tiles_after = QgsVectorLayer(f"{tmp_path / 'dock_change-after.gpkg'}|layername=tiles", "tiles 2023", "ogr")
        project.addMapLayers([tiles_before, tiles_after])
        assert dock.set_layer(tiles_before) and panel.current_date() is tiles_before  # the dock's tile layer
        assert dock.current_choice().model == "hqrs-mini-clip"
        dialog = panel.open_dialog()
        assert dialog.before.layer() is tiles_before
        assert dialog.after.layer() is tiles_after  # a tile layer is compared with a tile layer first
        dialog.became.setText("red roofs")
        dialog.captions.setChecked(False)
        dialog.output.setFilePath(str(tmp_path / "became.gpkg"))
        dialog.accept()
        wait_for(lambda: panel.cancel_button.isEnabled() is False and panel.read_task is not None
                 and panel.read_task.done, 300)
        assert panel.change_layer().name() == 'change: dock_change-before → dock_change-after (became "red roofs")'
        assert [row.rank for row in panel.rows] == sorted(row.rank for row in panel.rows)
        assert panel.rows[0].score >= panel.rows[-1].score
        # Cancel stops the engine: no change layer, the status says so
        layers_before = len(project.mapLayers())
        dialog = panel.open_dialog(earlier)
        dialog.output.setFilePath(str(tmp_path / "cancelled.gpkg"))
        dialog.accept()
        # clicked while the engine starts: with both dates' tiles already made, a comparison can end
        # within a second, before a click that waits for its progress
        wait_for(lambda: panel.cancel_button.isEnabled(), 60)
        QTest.mouseClick(panel.cancel_button, Qt.LeftButton)
        waited = wait_for(lambda: not panel.cancel_button.isEnabled(), 60)
        assert panel.status.text().startswith("comparison cancelled") and waited < 20
        assert not (tmp_path / "cancelled.gpkg").exists() and len(project.mapLayers()) == layers_before
        # a date that does not cover the earlier one: the engine's one-line error, no layer
        layers_before = len(project.mapLayers())
        dialog = panel.open_dialog(earlier)
        dialog.after.set_layer(far_away)
        dialog.output.setFilePath(str(tmp_path / "nowhere.gpkg"))
        dialog.accept()
        wait_for(lambda: not panel.cancel_button.isEnabled(), 120)
        text = panel.status.text()
        assert text.startswith("<b>comparison failed</b>: ") and "Traceback" not in text and "\n" not in text
        assert len(project.mapLayers()) == layers_before and not (tmp_path / "nowhere.gpkg").exists()
        assert panel.rows and panel.change_layer() is not None  # the previous comparison's list and layer stay
    finally:
        close_dock(dock)
        for layer in list(project.mapLayers().values()):
            project.removeMapLayer(layer.id())


def test_compare_two_dates_takes_a_web_layer_as_the_later_date(processing_run, mini_models, xyz_server,  # noqa: F811
                                                                tmp_path):
    scene = shutil.copy(EXAMPLE_SCENE, tmp_path / "scene.tif")
    url = f"{xyz_server}/{{z}}/{{x}}/{{y}}.png"
    xyz = QgsRasterLayer(f"type=xyz&url={url}&zmin=0&zmax=21", "scene XYZ", "wms")
    assert xyz.isValid()
    QgsProject.instance().addMapLayer(xyz)
    try:
        result = processing_run("hqrs:change", {
            "BEFORE": str(scene), "AFTER": xyz.id(), "TILE_SIZE": TILE_PX, "RESOLUTION": 0.5, "CAPTIONS": False,
            "DEVICE": "cpu", "OUTPUT": str(tmp_path / "web_change.gpkg")})
    finally:
        QgsProject.instance().removeMapLayer(xyz.id())
    written = list(tmp_path.glob("scene_XYZ_0.5m_*.tif"))  # the web layer over the earlier date's extent
    assert len(written) == 1
    import rasterio

    with rasterio.open(written[0]) as src:
        assert src.crs.to_epsg() == 32631 and abs(src.res[0] - 0.5) < 0.01
    layer = QgsVectorLayer(result["OUTPUT"], "change", "ogr")
    assert layer.featureCount() == 16 and all(f["compared"] for f in layer.getFeatures())
