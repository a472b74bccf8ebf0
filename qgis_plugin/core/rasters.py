"""Any QGIS raster layer as a file the engine can read, limited to an extent.

* File rasters (GDAL provider) are read where they are; with an extent that cuts them, a small
  VRT of that pixel window is written next to the output (no pixels copied), so the tile layer's
  ``source`` keeps pointing at real pixels.
* Other rasters (WMS, XYZ, WCS, ArcGIS…) are written over the extent at a chosen ground
  resolution to a GeoTIFF with QGIS's raster writer (:class:`QgsRasterFileWriter`), in a metric
  CRS (:func:`metric_crs`).

:func:`plan` runs in the main thread (it clones the layer's data provider, as QGIS's own raster
algorithms do); :func:`materialise` runs in the algorithm's thread.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osgeo import gdal, osr
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsDistanceArea,
    QgsPointXY,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProviderRegistry,
    QgsRasterBlockFeedback,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRasterProjector,
    QgsRectangle,
    QgsUnitTypes,
)

MAX_SIDE_PX = 20000  # a web layer written larger than this per side is refused (zoom in or coarser)


@dataclass
class RasterPlan:
    """What to hand the engine for one raster parameter."""

    name: str
    path: str | None = None                   # a GDAL file (or data source) to read directly
    provider: Any = None                         # a clone of a non-file provider (QgsRasterDataProvider), to write
    crs: QgsCoordinateReferenceSystem | None = None
    raster_extent: QgsRectangle | None = None  # the layer's extent, in its CRS
    extent: QgsRectangle | None = None        # in the layer's CRS; None: all of it
    target_crs: QgsCoordinateReferenceSystem | None = None  # written web layers: a metric CRS
    width_px: int = 0                            # the layer's size (file rasters)
    height_px: int = 0
    transform_context: QgsCoordinateTransformContext | None = None

    @property
    def is_file(self) -> bool:
        """True for a raster the engine reads itself."""
        return self.path is not None


def slug(text: str, limit: int = 40) -> str:
    """A file-name-safe form of ``text``."""
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")[:limit] or "raster"


def gdal_source(layer: QgsRasterLayer) -> str | None:
    """The GDAL data source of a GDAL-provider layer (a file, /vsi… path or GDAL connection)."""
    if layer.providerType() != "gdal":
        return None
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    return str(parts.get("path") or layer.source())


def plan(layer: QgsRasterLayer, extent: QgsRectangle | None, extent_crs: QgsCoordinateReferenceSystem | None,
         transform_context: QgsCoordinateTransformContext) -> RasterPlan:
    """Main thread: what :func:`materialise` needs (the extent moved into the layer's CRS)."""
    if layer is None or not layer.isValid():
        raise QgsProcessingException("HQRS: the raster layer cannot be read")
    crs = layer.crs()
    limited = None
    if extent is not None and not extent.isNull() and not extent.isEmpty():
        limited = QgsRectangle(extent)
        if extent_crs is not None and extent_crs.isValid() and crs.isValid() and extent_crs != crs:
            limited = QgsCoordinateTransform(extent_crs, crs, transform_context).transformBoundingBox(limited)
        if not limited.intersects(layer.extent()):
            raise QgsProcessingException(
                f"HQRS: the extent does not overlap {layer.name()}: choose another extent (or pan the map to it)")
        limited = limited.intersect(layer.extent())
    source = gdal_source(layer)
    if source is not None:
        return RasterPlan(layer.name(), path=source, crs=crs, raster_extent=QgsRectangle(layer.extent()),
                          extent=limited, width_px=layer.width(), height_px=layer.height(),
                          transform_context=transform_context)
    if limited is None:
        raise QgsProcessingException(
            f"HQRS: {layer.name()} is a {layer.providerType()} layer without an end: give an extent (the map "
            "canvas by default) to write at the chosen ground resolution")
    return RasterPlan(layer.name(), provider=layer.dataProvider().clone(), crs=crs,
                      raster_extent=QgsRectangle(layer.extent()), extent=limited, transform_context=transform_context,
                      target_crs=metric_crs(crs, limited, transform_context))


WEB_CRS = ("EPSG:3857", "EPSG:900913", "EPSG:3395", "EPSG:102100")


def metric_crs(crs: QgsCoordinateReferenceSystem, extent: QgsRectangle,
               context: QgsCoordinateTransformContext) -> QgsCoordinateReferenceSystem:
    """The CRS a web layer is written in: its own when it is a local projected one, else the UTM
    zone of the extent's centre (web mercator metres are not ground metres: at 52° N a "metre" is
    0.62 m), so ground resolutions and tile sizes in metres mean what they say."""
    if crs.isValid() and not crs.isGeographic() and crs.authid() not in WEB_CRS:
        return crs
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    centre = QgsCoordinateTransform(crs, wgs84, context).transform(extent.center())
    zone = min(60, max(1, int((centre.x() + 180) // 6) + 1))
    return QgsCoordinateReferenceSystem(f"EPSG:{(32600 if centre.y() >= 0 else 32700) + zone}")


def pixel_window(plan_: RasterPlan) -> tuple | None:
    """(x_off, y_off, width, height) of the extent in a file raster; None for all of it."""
    full, extent = plan_.raster_extent, plan_.extent
    if extent is None or full is None or not plan_.width_px:
        return None
    px_w, px_h = full.width() / plan_.width_px, full.height() / plan_.height_px
    x0 = max(0, int(math.floor((extent.xMinimum() - full.xMinimum()) / px_w + 1e-6)))
    x1 = min(plan_.width_px, int(math.ceil((extent.xMaximum() - full.xMinimum()) / px_w - 1e-6)))
    y0 = max(0, int(math.floor((full.yMaximum() - extent.yMaximum()) / px_h + 1e-6)))
    y1 = min(plan_.height_px, int(math.ceil((full.yMaximum() - extent.yMinimum()) / px_h - 1e-6)))
    if x0 == 0 and y0 == 0 and x1 == plan_.width_px and y1 == plan_.height_px:
        return None
    if x1 <= x0 or y1 <= y0:
        raise QgsProcessingException(f"HQRS: the extent is smaller than one pixel of {plan_.name}")
    return x0, y0, x1 - x0, y1 - y0


def ground_size_m(extent: QgsRectangle, crs: QgsCoordinateReferenceSystem,
                  context: QgsCoordinateTransformContext) -> tuple:
    """Width and height of ``extent`` on the ground, in metres (along its middle lines)."""
    area = QgsDistanceArea()
    area.setSourceCrs(crs, context)
    area.setEllipsoid(crs.ellipsoidAcronym() or "EPSG:7030")
    mid_x, mid_y = extent.center().x(), extent.center().y()
    width = area.measureLine(QgsPointXY(extent.xMinimum(), mid_y), QgsPointXY(extent.xMaximum(), mid_y))
    height = area.measureLine(QgsPointXY(mid_x, extent.yMinimum()), QgsPointXY(mid_x, extent.yMaximum()))
    metres = QgsUnitTypes.DistanceMeters
    return area.convertLengthMeasurement(width, metres), area.convertLengthMeasurement(height, metres)


def materialise(plan_: RasterPlan, folder: str, resolution_m: float, feedback: QgsProcessingFeedback) -> str:
    """The raster file for the engine: the file itself, a VRT of its window, or a GeoTIFF written
    from a non-file layer at ``resolution_m`` metres per pixel, in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    if plan_.path is not None:  # a file raster (plan_.is_file)
        source = plan_.path
        window = pixel_window(plan_)
        if window is None:
            return source
        x, y, w, h = window
        vrt = Path(folder) / f"{slug(Path(source).stem)}_x{x}_y{y}_{w}x{h}.vrt"
        feedback.pushInfo(f"Only the extent: pixels {x},{y} to {x + w},{y + h} of {source} ({vrt.name})")
        if gdal.Translate(str(vrt), source, format="VRT", srcWin=[x, y, w, h]) is None:
            raise QgsProcessingException(f"HQRS: cannot write {vrt}: {gdal.GetLastErrorMsg()}")
        return str(vrt)
    if not resolution_m or resolution_m <= 0:
        raise QgsProcessingException("HQRS: give a ground resolution (metres per pixel) for a web or WMS layer")
    target, extent = plan_.target_crs or plan_.crs, plan_.extent
    assert target is not None and extent is not None, "plan() gives a web layer an extent and a CRS"
    if target != plan_.crs:
        extent = QgsCoordinateTransform(plan_.crs, target, plan_.transform_context).transformBoundingBox(extent)
    ground_w, ground_h = ground_size_m(extent, target, plan_.transform_context)
    cols, rows = max(1, round(ground_w / resolution_m)), max(1, round(ground_h / resolution_m))
    if max(cols, rows) > MAX_SIDE_PX:
        raise QgsProcessingException(
            f"HQRS: the extent at {resolution_m:g} m per pixel is {cols} x {rows} pixels, more than {MAX_SIDE_PX} "
            "a side: zoom in (a smaller extent) or choose a coarser ground resolution")
    identity = f"{plan_.provider.dataSourceUri()}|{extent.toString(6)}|{resolution_m}"
    digest = hashlib.sha1(identity.encode()).hexdigest()[:8]
    tif = Path(folder) / f"{slug(plan_.name)}_{resolution_m:g}m_{digest}.tif"
    feedback.pushInfo(f"Writing {plan_.name} over the extent at {resolution_m:g} m per pixel ({cols} x {rows} px, "
                      f"{target.authid()}) to {tif}")
    pipe = QgsRasterPipe()
    if not pipe.set(plan_.provider):
        raise QgsProcessingException(f"HQRS: cannot read {plan_.name}")
    if target != plan_.crs:
        projector = QgsRasterProjector()
        projector.setCrs(plan_.crs, target, plan_.transform_context)
        if not pipe.insert(2, projector):
            raise QgsProcessingException(f"HQRS: cannot reproject {plan_.name} to {target.authid()}")
    part = tif.with_name(tif.stem + ".part.tif")  # renamed once complete: never a half-written GeoTIFF
    writer = QgsRasterFileWriter(str(part))
    writer.setOutputFormat("GTiff")
    writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES"])
    block_feedback = QgsRasterBlockFeedback()
    feedback.canceled.connect(block_feedback.cancel)
    block_feedback.progressChanged.connect(feedback.setProgress)
    try:
        error = writer.writeRaster(pipe, cols, rows, extent, target, plan_.transform_context, block_feedback)
        if feedback.isCanceled():
            raise QgsProcessingException("cancelled: HQRS stopped while writing the raster; no tiles were made")
        if error != QgsRasterFileWriter.NoError or not part.is_file():
            raise QgsProcessingException(
                f"HQRS: writing {plan_.name} to {tif} failed (raster writer error {int(error)})")
        stamp_crs(str(part), target)
        os.replace(part, tif)
    finally:
        for leftover in (part, Path(str(part) + ".aux.xml")):
            if leftover.exists():
                leftover.unlink()
    return str(tif)


def complete_srs(crs: QgsCoordinateReferenceSystem) -> Any:
    """``crs`` as a GDAL ``osr.SpatialReference`` with its full definition: built from the EPSG
    database when it has an EPSG code (so its WKT carries the code), else from its WKT."""
    srs = osr.SpatialReference()
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    authority, _, code = crs.authid().partition(":")
    if authority.upper() == "EPSG" and code.isdigit() and srs.ImportFromEPSG(int(code)) == 0:
        return srs
    wkt = crs.toWkt(QgsCoordinateReferenceSystem.WKT_PREFERRED_GDAL)
    if not wkt or srs.SetFromUserInput(wkt) != 0:
        raise QgsProcessingException(f"HQRS: the CRS {crs.authid() or crs.description()} has no definition GDAL can "
                                     "write: choose a layer or extent in another CRS")
    return srs


def stamp_crs(path: str, crs: QgsCoordinateReferenceSystem) -> str:
    """Write the complete definition of ``crs`` (WKT with its EPSG code) into the GeoTIFF ``path``
    and check that it reads back with that code; returns the WKT. A GeoTIFF whose CRS reads as a
    code without a definition draws nowhere once it has to be reprojected (a project in another
    CRS), and neither do the tiles made from it."""
    srs = complete_srs(crs)
    wkt = srs.ExportToWkt()
    dataset = gdal.Open(path, gdal.GA_Update)
    if dataset is None or dataset.SetProjection(wkt) != 0:
        raise QgsProcessingException(f"HQRS: cannot write the CRS into {path}: {gdal.GetLastErrorMsg()}")
    dataset.FlushCache()
    dataset = None
    check = gdal.Open(path)
    written = check.GetSpatialRef() if check is not None else None
    code = srs.GetAuthorityCode(None)
    if written is None or not written.ExportToWkt() or (code and written.GetAuthorityCode(None) != code):
        raise QgsProcessingException(f"HQRS: {path} does not read back as {crs.authid() or 'its CRS'}; "
                                     "choose another extent or ground resolution and run again")
    return wkt
