"""Change detection in QGIS: the command line the plugin builds, the change style drawn on a change
layer written here with the engine's fixed columns, the Processing algorithm "Compare two dates"
and the dock's "Compare with…" panel run end to end with the real engine on two dates of the
example scene (the later one with some tiles painted over), in real, headless QGIS."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from conftest import EXAMPLE_SCENE, ROOT
from processing_fixture import processing_run  # noqa: F401  (the shared Processing fixture)
from qgis.core import (
    QgsGraduatedSymbolRenderer,
    QgsMapRendererCustomPainterJob,
    QgsMapSettings,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QSize
from qgis.PyQt.QtGui import QColor, QImage, QPainter
from test_dock import IfaceStandIn, no_installed_engine, qgis, wait_for  # noqa: F401  (shared fixtures)

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qgis_plugin.core import changes, settings, styles  # noqa: E402
from qgis_plugin.core.changes import ChangeError, ChangeOptions  # noqa: E402

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
        == 'became "a pond": delft_2019 → delft_2023_tiles'
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
