"""Spatial filters combined with any query: a bounding box (any CRS), a polygon layer, or a
distance from a point. Each gives a boolean mask over the rows of a tile layer.

A tile passes a box or polygon filter when its footprint *intersects* the area; it passes
``near`` when its footprint comes within the distance (metres, measured in an azimuthal
equidistant projection centred on the point, so it is exact whatever the layer's CRS).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import shapely
from pyproj import CRS, Transformer

from ..errors import InputError, OptionError
from ..layer.crs import parse_crs, validate_box


def to_layer_crs(geom, src_crs: str | None, layer_crs):
    """``geom`` given in ``src_crs`` moved into ``layer_crs`` (edges densified first, so a box
    stays the area it was); as it is when either CRS is unknown or they are the same."""
    if src_crs is None or layer_crs is None:
        return geom
    src, dst = parse_crs(src_crs, "bbox_crs"), CRS.from_user_input(layer_crs)
    if src == dst:
        return geom
    transformer = Transformer.from_crs(src, dst, always_xy=True)
    dense = shapely.segmentize(geom, max_segment_length=_segment(geom))
    return shapely.transform(dense, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))


def _segment(geom) -> float:
    minx, miny, maxx, maxy = geom.bounds
    return max(maxx - minx, maxy - miny, 1e-9) / 32


@dataclass(frozen=True)
class SpatialFilter:
    """Optional box, polygon-layer and near-point filters (all given ones must pass)."""

    bbox: tuple[float, float, float, float] | None = None
    bbox_crs: str | None = None  # default: the layer's CRS
    within: str | None = None  # polygon layer path, optionally "path|layername=NAME"
    near: tuple[float, float] | None = None
    near_crs: str = "EPSG:4326"
    distance: float | None = None  # metres

    def __post_init__(self) -> None:
        validate_box(self.bbox, self.bbox_crs)

    @property
    def active(self) -> bool:
        """True when any filter is set."""
        return self.bbox is not None or self.within is not None or self.near is not None

    def mask(self, frame) -> np.ndarray:
        """Boolean mask of the rows of ``frame`` that pass every filter."""
        keep = np.ones(len(frame), dtype=bool)
        geoms = frame.geometry.values
        if self.bbox is not None:
            keep &= bbox_mask(geoms, frame.crs, self.bbox, self.bbox_crs)
        if self.within is not None:
            keep &= within_mask(geoms, frame.crs, self.within)
        if self.near is not None:
            if self.distance is None:
                raise OptionError("a point to search near needs a «distance» in metres", option="near")
            keep &= near_mask(geoms, frame.crs, self.near, self.distance, self.near_crs)
        return keep


def bbox_mask(geoms, layer_crs, bbox: Sequence[float], crs: str | None = None) -> np.ndarray:
    """Tiles intersecting the box ``(minx, miny, maxx, maxy)`` given in ``crs`` (default: layer CRS)."""
    validate_box(bbox, crs)
    area = to_layer_crs(shapely.box(*bbox), crs, layer_crs)
    return np.asarray(shapely.intersects(geoms, area), dtype=bool)


def within_mask(geoms, layer_crs, source: str) -> np.ndarray:
    """Tiles intersecting any polygon of a vector layer (``path`` or ``path|layername=NAME``)."""
    path, _, layer = source.partition("|layername=")
    try:
        polygons = gpd.read_file(path, layer=layer or None)
    except Exception as exc:
        raise InputError(f"{path}: cannot read polygons ({str(exc).splitlines()[0]}); give a vector layer") from None
    polygons = polygons[polygons.geometry.notna()]
    polygons = polygons[polygons.geom_type.isin(["Polygon", "MultiPolygon"])]
    if polygons.empty:
        raise InputError(f"{source}: has no polygons to filter with")
    if polygons.crs is not None and layer_crs is not None:
        polygons = polygons.to_crs(layer_crs)
    area = shapely.union_all(polygons.geometry.values)
    shapely.prepare(area)
    return np.asarray(shapely.intersects(area, geoms), dtype=bool)


def near_mask(geoms, layer_crs, point: Sequence[float], distance_m: float, crs: str = "EPSG:4326") -> np.ndarray:
    """Tiles whose footprint is within ``distance_m`` metres of ``point`` (x, y in ``crs``)."""
    if not np.isfinite(distance_m) or distance_m < 0:
        raise OptionError(f"{distance_m!r} is not a distance; give metres >= 0", option="distance")
    if layer_crs is None:
        raise InputError("the layer has no CRS, so distances in metres cannot be measured; filter with a box instead")
    x, y = float(point[0]), float(point[1])
    lon, lat = Transformer.from_crs(parse_crs(crs, "near_crs"), "EPSG:4326", always_xy=True).transform(x, y)
    if not (np.isfinite(lon) and np.isfinite(lat) and -180 <= lon <= 180 and -90 <= lat <= 90):
        raise OptionError(f"{x:g},{y:g} is not a point on the earth in {crs}; check the coordinates and «near_crs»",
                          option="near")
    local = CRS.from_proj4(f"+proj=aeqd +lat_0={lat} +lon_0={lon} +datum=WGS84 +units=m")
    to_local = Transformer.from_crs(CRS.from_user_input(layer_crs), local, always_xy=True)
    local_geoms = shapely.transform(
        shapely.segmentize(geoms, max_segment_length=max(_segment(g) for g in geoms[:1]) if len(geoms) else 1.0),
        lambda xy: np.column_stack(to_local.transform(xy[:, 0], xy[:, 1])),
    )
    return np.asarray(shapely.distance(local_geoms, shapely.Point(0, 0)) <= distance_m, dtype=bool)
