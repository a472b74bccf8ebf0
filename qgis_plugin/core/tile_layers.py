"""Tile layers as QGIS sees them: which layers are tile layers, their files, their embeddings,
the hit features of a search, and thumbnails read from the raster window of a tile.

The column contract is the engine's (docs/layers.md): ``tile_id``, ``source`` (the raster),
``x_off``/``y_off``/``width``/``height`` (its pixel window), ``emb_<key>`` + ``emb_<key>_dim``
(+ ``emb_<key>_model``) per embedding model, ``caption``. Only GeoPackage layer ``tiles`` or a
single-layer file (GeoParquet, FlatGeobuf) is a tile layer the engine opens.
"""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsEditorWidgetSetup,
    QgsFeature,
    QgsFeatureRequest,
    QgsLayerTree,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsMapLayerType,
    QgsProject,
    QgsProviderRegistry,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

TILES_LAYER = "tiles"
TILE_COLUMNS = ("tile_id", "source", "x_off", "y_off", "width", "height")
TILE_SUFFIXES = (".gpkg", ".parquet", ".geoparquet", ".fgb")
THUMBNAIL_PX = 72
MAKE_TILE_LAYER = "Processing ▸ HQRS ▸ Tiles ▸ Tile raster (or Models ▸ Tile, embed and caption)"


def layer_file(layer: QgsMapLayer | None) -> tuple[str | None, str | None]:
    """(file, sub-layer name) behind an OGR layer; (None, None) for other layers."""
    if not isinstance(layer, QgsVectorLayer) or layer.providerType() != "ogr":
        return None, None
    parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
    path = str(parts.get("path") or "")
    return (path or None), (parts.get("layerName") or None)


def is_tile_layer(layer: QgsMapLayer | None) -> bool:
    """A polygon layer with the engine's tile columns."""
    if not isinstance(layer, QgsVectorLayer) or not layer.isValid():
        return False
    if QgsWkbTypes.geometryType(layer.wkbType()) != QgsWkbTypes.PolygonGeometry:
        return False
    names = set(layer.fields().names())
    return all(column in names for column in TILE_COLUMNS)


def engine_layer_file(layer: QgsMapLayer | None) -> str | None:
    """The file the engine can open as this tile layer, or None (a result layer, a memory layer…)."""
    path, sublayer = layer_file(layer)
    if not path or Path(path).suffix.lower() not in TILE_SUFFIXES or not os.path.isfile(path):
        return None
    if path.lower().endswith(".gpkg") and sublayer not in (None, TILES_LAYER):
        return None
    return path


def engine_layer_uri(path: str) -> str:
    """The QGIS data source of a tile layer file (``path|layername=tiles`` for GeoPackages)."""
    return f"{path}|layername={TILES_LAYER}" if path.lower().endswith(".gpkg") else path


@dataclass(frozen=True)
class EmbeddingSet:
    """One model's embeddings on a tile layer: column ``emb_<key>``, made by ``model``."""

    key: str
    model: str


def embedding_sets(layer: QgsMapLayer | None) -> list[EmbeddingSet]:
    """The embedding models of a tile layer (none for other layers)."""
    if layer is None or not is_tile_layer(layer):
        return []
    names = layer.fields().names()
    keys = [n[len("emb_"):-len("_dim")] for n in names if n.startswith("emb_") and n.endswith("_dim")]
    found = []
    for key in keys:
        model = key
        column = f"emb_{key}_model"
        if column in names:
            request = QgsFeatureRequest().setFilterExpression(f'"{column}" IS NOT NULL').setLimit(1)
            request.setSubsetOfAttributes([column], layer.fields()).setFlags(QgsFeatureRequest.NoGeometry)
            for feature in layer.getFeatures(request):
                model = str(feature[column]) or key
        found.append(EmbeddingSet(key, model))
    return found


def quote_list(values: Iterable[str]) -> str:
    """``'a', 'b'`` for an expression's IN (…)."""
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


def features_by_tile(layer: QgsVectorLayer, tile_ids: Iterable[str], geometry: bool = True) -> dict[str, QgsFeature]:
    """The features of ``tile_ids`` (one request), by tile id."""
    ids = list(tile_ids)
    if not ids:
        return {}
    request = QgsFeatureRequest().setFilterExpression(f'"tile_id" IN ({quote_list(ids)})')
    if not geometry:
        request.setFlags(QgsFeatureRequest.NoGeometry)
    return {str(f["tile_id"]): f for f in layer.getFeatures(request)}


def thumbnail(source: str, window: tuple[int, int, int, int], size: int = THUMBNAIL_PX) -> bytes | None:
    """``size`` x ``size`` RGB888 bytes of a tile's raster window (bands 1-3, or band 1 as grey),
    read with GDAL at reduced resolution; None when it cannot be read. Safe in worker threads."""
    try:
        from osgeo import gdal
    except ImportError:
        return None
    x_off, y_off, width, height = (int(v) for v in window)
    dataset = gdal.OpenEx(source, gdal.OF_RASTER | gdal.OF_READONLY | gdal.OF_VERBOSE_ERROR)
    if dataset is None or width <= 0 or height <= 0:
        return None
    try:
        x0, y0 = max(0, x_off), max(0, y_off)
        x1, y1 = min(dataset.RasterXSize, x_off + width), min(dataset.RasterYSize, y_off + height)
        if x1 <= x0 or y1 <= y0:
            return None
        bands = [1, 2, 3] if dataset.RasterCount >= 3 else [1, 1, 1]
        byte = all(dataset.GetRasterBand(b).DataType == gdal.GDT_Byte for b in set(bands))
        if byte:
            return dataset.ReadRaster(x0, y0, x1 - x0, y1 - y0, buf_xsize=size, buf_ysize=size, buf_type=gdal.GDT_Byte,
                                      band_list=bands, buf_pixel_space=3, buf_line_space=3 * size, buf_band_space=1)
        # other types: a 2-98 % stretch of the window
        planes = []
        for b in bands:
            data = dataset.GetRasterBand(b).ReadRaster(x0, y0, x1 - x0, y1 - y0, buf_xsize=size, buf_ysize=size,
                                                       buf_type=gdal.GDT_Float32)
            planes.append(np.frombuffer(data, dtype=np.float32).reshape(size, size))
        stack = np.stack(planes, axis=-1)
        finite = stack[np.isfinite(stack)]
        low, high = (np.percentile(finite, (2, 98)) if finite.size else (0.0, 1.0))
        scaled = np.clip((stack - low) / max(float(high - low), 1e-12) * 255.0, 0, 255)
        return np.nan_to_num(scaled).astype(np.uint8).tobytes()
    finally:
        dataset = None


def gpkg_tables(path: str) -> list[str] | None:
    """The feature tables of a GeoPackage (from ``gpkg_contents``); None when it cannot be read."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return [str(row[0]) for row in db.execute(
                "SELECT table_name FROM gpkg_contents WHERE data_type = 'features' ORDER BY table_name")]
    except sqlite3.Error:
        return None


def not_a_tile_layer(layer: QgsMapLayer | None) -> str:
    """Why ``layer`` cannot be used as a tile layer, in one line with what to do (for a layer that
    :func:`engine_layer_file` refused)."""
    name = layer.name() if layer is not None else "the layer"
    file, sublayer = layer_file(layer)
    if file and file.lower().endswith(".gpkg") and os.path.isfile(file):
        tables = gpkg_tables(file)
        if tables is not None and TILES_LAYER not in tables:
            return f"{file} has no tile layer: make one with the Processing algorithm {MAKE_TILE_LAYER}"
        if sublayer and sublayer != TILES_LAYER:
            return (f"{name} is the '{sublayer}' layer of {file}, not its tile layer: choose the layer "
                    f"'{TILES_LAYER}' of that file")
    return (f"{name} is not a tile layer file (GeoPackage, GeoParquet or FlatGeobuf); make one with the Processing "
            f"algorithm {MAKE_TILE_LAYER} first")


# -- how tile layers and results sit in the project -------------------------------------------
EMBEDDING_WIDGET = "Hidden"


def embedding_columns(layer: QgsVectorLayer) -> list[str]:
    """The binary columns of a layer (``emb_<key>`` embeddings: raw float vectors, unreadable as text)."""
    return [field.name() for field in layer.fields() if field.type() == QVariant.ByteArray]


def hide_embedding_columns(layer: QgsVectorLayer) -> list[str]:
    """Hide the embedding (binary) columns in the attribute table and forms (editor widget
    ``Hidden``, hidden table column); their dimension stays visible in ``emb_<key>_dim``. Returns
    the hidden names."""
    if not isinstance(layer, QgsVectorLayer):
        return []
    names = embedding_columns(layer)
    if not names:
        return []
    for name in names:
        layer.setEditorWidgetSetup(layer.fields().indexOf(name), QgsEditorWidgetSetup(EMBEDDING_WIDGET, {}))
    config = layer.attributeTableConfig()
    columns = config.columns()
    for column in columns:
        if column.name in names:
            column.hidden = True
    config.setColumns(columns)
    layer.setAttributeTableConfig(config)
    return names


def complete_crs(layer: QgsMapLayer) -> bool:
    """Give ``layer`` a CRS object made now, in this thread (call it from the main thread), from
    its definition (WKT; its authority code when the WKT is already lost). Returns True when set.

    QGIS 3.22 caches a CRS per definition together with the PROJ objects of the thread that first
    made it, and frees those when that thread ends: a layer read with that CRS after a worker
    thread (a search, a Processing algorithm) first read the same file keeps a CRS that names its
    code but has no definition once the thread is gone (an empty WKT): it cannot be transformed, so
    it draws nowhere in a project of another CRS, though map tips still find its features. The
    cache is emptied first, so the new object is made here and lives as long as the application.
    """
    crs = layer.crs()
    wkt = crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED) if crs.isValid() else ""
    authid = crs.authid()
    if not wkt and not authid:
        return False
    forget_crs_cache()
    fresh = QgsCoordinateReferenceSystem.fromWkt(wkt) if wkt else QgsCoordinateReferenceSystem(authid)
    if (not fresh.isValid() or not fresh.toWkt()) and authid:
        fresh = QgsCoordinateReferenceSystem(authid)
    if not fresh.isValid() or not fresh.toWkt():
        return False
    layer.setCrs(fresh)
    return True


def forget_crs_cache() -> None:
    """Empty QGIS's CRS cache (see :func:`complete_crs`): what a worker thread cached is made
    again by the next thread that needs it."""
    QgsCoordinateReferenceSystem.invalidateCache()


@contextmanager
def opened_in_worker(uri: str, name: str = "tiles") -> Iterator[QgsVectorLayer]:
    """The OGR layer ``uri`` for a worker thread; when the block ends, the CRS cache entries it may
    have made are dropped (they die with the thread: see :func:`complete_crs`), so layers read
    later in the main thread get a CRS of their own."""
    layer = QgsVectorLayer(uri, name, "ogr")
    try:
        yield layer
    finally:
        forget_crs_cache()


def place_above_imagery(layer: QgsMapLayer, project: QgsProject | None = None) -> bool:
    """Move a new vector layer that landed below a raster layer of the project (QGIS inserts new
    layers at the current layer's place) to just above the topmost raster, so it is drawn over the
    imagery. Returns True when it was moved."""
    root = (project or QgsProject.instance()).layerTreeRoot()
    node = root.findLayer(layer.id())
    if node is None:
        return False
    order = root.findLayers()  # top (drawn last) first
    mine = next(i for i, n in enumerate(order) if n is node)
    rasters = [i for i, n in enumerate(order[:mine])
               if n.layer() is not None and n.layer().type() == QgsMapLayerType.RasterLayer]
    if not rasters:
        return False
    target = order[rasters[0]]
    parent = target.parent()
    if not QgsLayerTree.isGroup(parent):
        return False
    assert isinstance(parent, QgsLayerTreeGroup)
    index = parent.children().index(target)
    old_parent = node.parent()
    clone = node.clone()
    parent.insertChildNode(index, clone)
    if isinstance(old_parent, QgsLayerTreeGroup):
        old_parent.removeChildNode(node)
    return True


def settle_new_layer(layer: QgsMapLayer, new: bool = True) -> None:
    """What every tile or result layer gets when it is added (main thread): embedding columns
    hidden, a CRS of its own that outlives worker threads (:func:`complete_crs`), and (a ``new``
    layer, not one read from a project) a place above the imagery."""
    if not isinstance(layer, QgsVectorLayer):
        return
    hide_embedding_columns(layer)
    if complete_crs(layer):
        layer.triggerRepaint()
    if new:
        place_above_imagery(layer)
