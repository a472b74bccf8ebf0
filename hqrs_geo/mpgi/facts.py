"""Tile facts for MpGI captions (rule-guided relay): size, place, date, spectral cover and map features.

:func:`compute_facts` turns a tile layer (``hqrs_geo.layer.io.read_tiles``) into one
:class:`TileFacts` per tile; :mod:`hqrs_geo.mpgi.rules` turns those facts into sentences.

Measurements are made in metres: in the tile layer's CRS when it is projected in metres,
otherwise in the UTM zone of the tiles' centroid. Cover facts (vegetation and water fractions)
come from a near-infrared band when the source raster has one (NDVI / NDWI): the band given as
``nir_band``, a band whose colour interpretation or description says NIR / near infrared, or --
for rasters with exactly four bands and no alpha band, such as NAIP -- band 4, with the bands
assumed to be in R, G, B, NIR order. Without one, they are estimated from the red, green and blue
bands (:func:`rgb_cover_masks`, recorded as ``rgb_exg`` / ``rgb_water``), so a reader of the facts
knows which kind of estimate each share is.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
from pyproj import CRS, Transformer
from rasterio.windows import Window

from ..errors import InputError, OptionError
from ..raster.scene import describe, open_raster, read_pixels

log = logging.getLogger(__name__)

REGIONS = (
    "north-west", "north", "north-east",
    "west", "centre", "east",
    "south-west", "south", "south-east",
)
KINDS = ("polygon", "line", "point")
UNKNOWN_CLASS = "unknown"
TILE_COLUMNS = ("tile_id", "source", "x_off", "y_off", "width", "height")
CHUNK = 256  # tiles handled per vectorised batch (and per progress step)

_DIMENSION = {"point": 0, "line": 1, "polygon": 2}
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
_DATE = re.compile(r"^\s*(\d{4})[-:/]?(\d{2})[-:/]?(\d{2})")
_DATE_TAGS = (  # (metadata domain, key), most specific first; TIFFTAG_DATETIME is often the file's date
    ("IMAGERY", "ACQUISITIONDATETIME"), ("IMAGERY", "ACQUISITION_DATE"),
    (None, "ACQUISITIONDATETIME"), (None, "ACQUISITION_DATE"), (None, "TIFFTAG_DATETIME"),
)
_NIR_WORDS = re.compile(r"\bnir\b|near[- _]?infra[- _]?red", re.IGNORECASE)


# --------------------------------------------------------------------------- vector sources

@dataclass
class VectorSource:
    """A vector layer whose features are described in each tile.

    ``label`` names the features in sentences (default: the layer name, ``_`` read as a space);
    ``class_field`` is the attribute whose values are the feature classes (``highway``).
    """

    path: str
    layer: str | None = None
    label: str = ""
    class_field: str | None = None

    def __post_init__(self) -> None:
        self.path = str(self.path)
        if not self.label and self.layer:
            self.label = _default_label(self.layer)


def _default_label(layer: str) -> str:
    return layer.replace("_", " ").strip()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _short_list(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … ({len(names)} in all)" if len(names) > limit else "")


def parse_vector_spec(spec: str) -> VectorSource:
    """Parse a CLI vector spec ``PATH[:LAYER[:CLASS_FIELD]]`` and check it (see :func:`check_vector_source`)."""
    text = str(spec).strip()
    drive = text[:2] if _DRIVE.match(text) else ""  # keep Windows drive letters out of the split
    parts = text[len(drive):].split(":")
    if len(parts) > 3 or not parts[0]:
        raise InputError(f"invalid vector spec {spec!r}: use PATH[:LAYER[:CLASS_FIELD]], e.g. osm.gpkg:roads:highway")
    layer = parts[1] or None if len(parts) > 1 else None
    class_field = parts[2] or None if len(parts) > 2 else None
    return check_vector_source(VectorSource(drive + parts[0], layer, class_field=class_field))


def check_vector_source(source: VectorSource) -> VectorSource:
    """Check the file, layer and class field exist; returns the source with its layer and label filled in.

    A file with a single layer needs no layer name. Problems raise one-line :class:`InputError`.
    """
    path = source.path
    if not os.path.exists(path):
        raise InputError(f"{path}: vector file not found; check the path (PATH[:LAYER[:CLASS_FIELD]])")
    try:
        layers = [str(name) for name, _ in pyogrio.list_layers(path)]
    except Exception as exc:  # pyogrio raises several types for foreign files
        raise InputError(f"{path}: cannot read as a vector file ({_first_line(exc)}); give a GeoPackage, "
                         "Shapefile or GeoJSON") from None
    layer = source.layer
    if not layers:
        raise InputError(f"{path}: has no vector layers; give a file with features")
    if layer is None:
        if len(layers) != 1:
            raise InputError(f"{path}: has {len(layers)} layers ({_short_list(layers)}); name one as {path}:LAYER")
        layer = layers[0]
    elif layer not in layers:
        raise InputError(f"{path}: has no layer {layer!r}; use one of {_short_list(layers)}")
    if source.class_field:
        fields = [str(f) for f in pyogrio.read_info(path, layer=layer)["fields"]]
        if source.class_field not in fields:
            raise InputError(f"{path}: layer {layer!r} has no field {source.class_field!r}; "
                             f"use one of {_short_list(fields)}")
    return VectorSource(path, layer, source.label or _default_label(layer), source.class_field)


# --------------------------------------------------------------------------- fact records

@dataclass
class VectorFacts:
    """What one vector layer shows inside one tile.

    ``count``: features with a non-empty part in the tile (polygons: positive area; lines:
    positive length). ``area_fraction`` (polygons): area of the union of the clipped features
    over the tile area. ``length_m`` / ``length_per_km2`` (lines): clipped length and density.
    ``classes``: ``(value, share)`` pairs, largest share first, shares by clipped area
    (polygons), clipped length (lines) or count (points). ``regions``: share of that measure
    in each cell of a 3 x 3 grid over the tile bounds; ``main_region`` the largest.
    """

    label: str
    kind: str
    count: int = 0
    area_fraction: float | None = None
    length_m: float | None = None
    length_per_km2: float | None = None
    classes: list[tuple[str, float]] = field(default_factory=list)
    regions: dict[str, float] = field(default_factory=lambda: dict.fromkeys(REGIONS, 0.0))
    main_region: str | None = None


@dataclass
class TileFacts:
    """Facts about one tile: ground size, place, date, spectral cover and vector features.

    ``vegetation_fraction`` / ``water_fraction`` are the fractions of valid pixels that are
    vegetation / water, measured as ``vegetation_source`` / ``water_source`` say: ``"ndvi"`` (NDVI
    above ``ndvi_threshold``) and ``"ndwi"`` (NDWI (green - NIR) / (green + NIR) above
    ``ndwi_threshold``) with a NIR band; ``"rgb_exg"`` and ``"rgb_water"`` (the RGB rules of
    :func:`rgb_cover_masks`, ``exg_threshold``) without one; None (and no source) when the raster
    has neither NIR nor three colour bands, or the tile no valid pixel.
    """

    tile_id: str
    width_m: float
    height_m: float
    gsd_m: float | None
    centre_lat: float
    centre_lon: float
    acquired: str | None = None
    vegetation_fraction: float | None = None
    water_fraction: float | None = None
    vectors: list[VectorFacts] = field(default_factory=list)
    ndvi_threshold: float = 0.3
    ndwi_threshold: float = 0.0
    vegetation_source: str | None = None
    water_source: str | None = None
    exg_threshold: float = 0.05

    def as_dict(self) -> dict:
        """JSON-friendly dictionary (class pairs become two-item lists)."""
        d = asdict(self)
        for v in d["vectors"]:
            v["classes"] = [[name, share] for name, share in v["classes"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TileFacts:
        """Inverse of :meth:`as_dict` (for facts kept in a cache)."""
        values = dict(d)
        vectors = []
        for v in values.pop("vectors", []):
            v = dict(v)
            v["classes"] = [(str(name), float(share)) for name, share in v.get("classes", [])]
            vectors.append(VectorFacts(**v))
        return cls(vectors=vectors, **values)


# --------------------------------------------------------------------------- geometry helpers

def metric_crs(tiles):
    """The CRS measurements are made in: the layer's when projected in metres, else the UTM zone of its centroid."""
    crs = CRS.from_user_input(tiles.crs)
    axes = crs.axis_info[:2]
    if crs.is_projected and axes and all(a.unit_name in ("metre", "meter") for a in axes):
        return crs
    return tiles.estimate_utm_crs()


def _tile_sizes(footprints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground width and height of each footprint: the sides of its minimum rotated rectangle.

    The side closer to the x axis is the width.
    """
    rects = shapely.oriented_envelope(footprints)
    if len(rects) and np.all(shapely.get_num_coordinates(rects) == 5):
        corners = shapely.get_coordinates(rects).reshape(len(rects), 5, 2)
        first, second = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 1]
        along_x = np.abs(first[:, 0]) >= np.abs(first[:, 1])
        len1, len2 = np.hypot(*first.T), np.hypot(*second.T)
        return np.where(along_x, len1, len2), np.where(along_x, len2, len1)
    b = shapely.bounds(footprints)  # degenerate footprints: fall back to the bounding boxes
    return b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]


def _centres_lonlat(footprints: np.ndarray, crs) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude (EPSG:4326) of each footprint's centroid."""
    xy = shapely.get_coordinates(shapely.centroid(footprints))
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(xy[:, 0], xy[:, 1])
    return np.asarray(lon, dtype=float), np.asarray(lat, dtype=float)


def _region_boxes(bounds: np.ndarray) -> np.ndarray:
    """The 3 x 3 grid cells (in :data:`REGIONS` order, north row first) over each tile's bounds, shape (n, 9)."""
    xmin, ymin, xmax, ymax = (bounds[:, i, None] for i in range(4))
    steps = np.arange(4) / 3.0
    xs = xmin + (xmax - xmin) * steps  # west to east edges, (n, 4)
    ys = ymax - (ymax - ymin) * steps  # north to south edges
    cells = [shapely.box(xs[:, c], ys[:, r + 1], xs[:, c + 1], ys[:, r]) for r in range(3) for c in range(3)]
    return np.stack(cells, axis=1)


def _region_index(points: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Index in :data:`REGIONS` of the grid cell holding each point (``bounds`` one row per point)."""
    xy = shapely.get_coordinates(points)
    width = np.where(bounds[:, 2] > bounds[:, 0], bounds[:, 2] - bounds[:, 0], 1.0)
    height = np.where(bounds[:, 3] > bounds[:, 1], bounds[:, 3] - bounds[:, 1], 1.0)
    col = np.clip(np.floor((xy[:, 0] - bounds[:, 0]) / width * 3), 0, 2).astype(int)
    row = np.clip(np.floor((bounds[:, 3] - xy[:, 1]) / height * 3), 0, 2).astype(int)
    return row * 3 + col


# --------------------------------------------------------------------------- raster facts

def acquisition_date(src) -> str | None:
    """The acquisition date (ISO ``YYYY-MM-DD``) from an open raster's metadata tags, or None.

    Looks at ``ACQUISITIONDATETIME`` / ``ACQUISITION_DATE`` (IMAGERY domain, then default) and
    ``TIFFTAG_DATETIME`` (``YYYY:MM:DD HH:MM:SS``).
    """
    for domain, key in _DATE_TAGS:
        try:
            tags = src.tags(ns=domain) if domain else src.tags()
        except Exception:  # a driver without that metadata domain
            continue
        parsed = _parse_date(tags.get(key))
        if parsed:
            return parsed
    return None


def _parse_date(value: str | None) -> str | None:
    match = _DATE.match(value or "")
    if not match:
        return None
    try:
        return date(*(int(g) for g in match.groups())).isoformat()
    except ValueError:
        return None


def spectral_bands(src, nir_band: int | None = None) -> tuple[int, int, int] | None:
    """1-based (red, green, NIR) band numbers of an open raster, or None when it has no NIR band.

    NIR is ``nir_band`` if given, else a band interpreted or described as NIR / near infrared,
    else band 4 of a four-band raster without alpha (assumed R, G, B, NIR -- NAIP's order).
    Red and green come from colour interpretation or description, else the first two other bands.
    """
    interp = [ci.name.lower() for ci in src.colorinterp]
    names = [(d or "").strip().lower() for d in src.descriptions]
    if nir_band is not None:
        if not 1 <= int(nir_band) <= src.count:
            raise OptionError(f"invalid NIR band {nir_band}: {src.name} has bands 1..{src.count}")
        nir: int | None = int(nir_band)
    else:
        nir = next((i + 1 for i in range(src.count) if interp[i] == "nir" or _NIR_WORDS.search(names[i])), None)
        if nir is None and src.count == 4 and "alpha" not in interp:
            nir = 4
    if nir is None:
        return None
    others = [i + 1 for i in range(src.count) if i + 1 != nir and interp[i] != "alpha"]

    def find(word: str, taken: tuple) -> int | None:
        named = [b for b in others if interp[b - 1] == word or names[b - 1] in (word, word[0])]
        spare = [b for b in others if b not in taken]
        found = named or spare
        return found[0] if found else None

    red = find("red", ())
    green = find("green", (red,))
    if red is None or green is None or red == green:
        if nir_band is not None:
            raise InputError(f"{src.name}: needs red and green bands besides NIR band {nir}; "
                             f"it has {src.count} band(s)")
        return None
    return red, green, nir


def _normalised_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a - b) / (a + b), 0 where the sum is 0."""
    total = a + b
    out = np.zeros_like(total)
    np.divide(a - b, total, out=out, where=total != 0)
    return out


def _window_values(src, bands: tuple[int, int, int], window: tuple[int, int, int, int]
                   ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The three bands of a window ``(x_off, y_off, width, height)`` clipped to the raster, as
    float64 ``(values, valid, n_valid)``: pixels masked (nodata, alpha, per-dataset mask) or
    non-finite in any band are not valid. ``None`` when the window holds no valid pixel."""
    x_off, y_off, width, height = window
    x0, y0 = max(int(x_off), 0), max(int(y_off), 0)
    x1, y1 = min(int(x_off + width), src.width), min(int(y_off + height), src.height)
    if x1 <= x0 or y1 <= y0:
        return None
    data = src.read(list(bands), window=Window(x0, y0, x1 - x0, y1 - y0), masked=True)
    values = np.ma.getdata(data).astype(np.float64)
    with np.errstate(invalid="ignore"):
        valid = np.asarray(~np.ma.getmaskarray(data).any(axis=0) & np.isfinite(values).all(axis=0))
    n_valid = int(np.count_nonzero(valid))
    return (values, valid, n_valid) if n_valid else None


def spectral_fractions(
    src, bands: tuple[int, int, int], window: tuple[int, int, int, int],
    ndvi_threshold: float = 0.3, ndwi_threshold: float = 0.0,
) -> tuple[float | None, float | None]:
    """Fractions of the valid pixels of a window ``(x_off, y_off, width, height)`` above the NDVI / NDWI thresholds.

    Masked (nodata, alpha, per-dataset mask) and non-finite pixels in any of the three bands are
    left out; the part of the window outside the raster is ignored. ``(None, None)`` without valid pixels.
    """
    read = _window_values(src, bands, window)
    if read is None:
        return None, None
    values, valid, n_valid = read
    with np.errstate(invalid="ignore", over="ignore"):
        red, green, nir = values
        ndvi = _normalised_difference(nir, red)
        ndwi = _normalised_difference(green, nir)
        vegetation = np.count_nonzero(valid & (ndvi > ndvi_threshold)) / n_valid
        water = np.count_nonzero(valid & (ndwi > ndwi_threshold)) / n_valid
    return float(vegetation), float(water)


# RGB cover rules, used when the raster has no NIR band (fractions of the tile's valid pixels).
#: Vegetation: excess green on chromatic coordinates, ExG = 2g - r - b with r = R / (R + G + B)
#: etc., above this, with green the largest of the three (Woebbecke et al. 1995; 0.05 keeps the
#: dark green of tree crowns and leaves grey roofs and roads, about 0, out).
EXG_THRESHOLD = 0.05
#: Water: dark (mean of R, G, B below this, on a 0..1 scale) ...
WATER_MAX_BRIGHTNESS = 0.4
#: ... smooth (standard deviation of that brightness in a TEXTURE_WINDOW-pixel square below this) ...
WATER_MAX_TEXTURE = 0.012
TEXTURE_WINDOW = 5
#: ... and blue-dominant (blue above red, and at least green minus this): calm water reflects the
#: sky. Green, algae-rich water looks like a field in RGB and is missed; dark smooth bluish
#: shadows and dark flat roofs can pass; a NIR band is always preferred.
WATER_BLUE_MARGIN = 0.005


def _box_mean(values: np.ndarray, size: int) -> np.ndarray:
    """Mean over a ``size`` x ``size`` square around each pixel (edges mirrored), by an integral image."""
    pad = size // 2
    padded = np.pad(values, pad, mode="reflect" if min(values.shape) > pad else "edge")
    total = np.pad(padded.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
    h, w = values.shape
    sums = (total[size:size + h, size:size + w] - total[:h, size:size + w]
            - total[size:size + h, :w] + total[:h, :w])
    return sums / (size * size)


def rgb_cover_masks(rgb: np.ndarray, exg_threshold: float = EXG_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """``(vegetation, water)`` boolean masks of a ``(3, H, W)`` red, green, blue array scaled to 0..1.

    Water: dark (mean brightness < :data:`WATER_MAX_BRIGHTNESS`), smooth (local standard deviation
    of the brightness < :data:`WATER_MAX_TEXTURE` over :data:`TEXTURE_WINDOW` pixels) and
    blue-dominant (chromatic blue > red and >= green - :data:`WATER_BLUE_MARGIN`). Vegetation: not
    water, green the largest chromatic coordinate and excess green 2g - r - b > ``exg_threshold``.
    These are estimates from colour and texture (see the constants' notes for what they miss).
    """
    red, green, blue = (np.asarray(band, dtype=np.float64) for band in rgb)
    total = red + green + blue
    safe = np.where(total > 0, total, 1.0)
    r, g, b = red / safe, green / safe, blue / safe
    brightness = total / 3.0
    mean = _box_mean(brightness, TEXTURE_WINDOW)
    texture = np.sqrt(np.maximum(_box_mean(brightness ** 2, TEXTURE_WINDOW) - mean ** 2, 0.0))
    water = (brightness < WATER_MAX_BRIGHTNESS) & (texture < WATER_MAX_TEXTURE) & (b > r) \
        & (b >= g - WATER_BLUE_MARGIN) & (total > 0)
    vegetation = ~water & (g > r) & (g > b) & (2 * g - r - b > exg_threshold)
    return vegetation, water


def rgb_bands(src) -> tuple[int, int, int] | None:
    """1-based (red, green, blue) band numbers of an open raster: by colour interpretation, else
    its first three bands that are not alpha; None with fewer than three such bands."""
    interp = [ci.name.lower() for ci in src.colorinterp]
    named = [next((i + 1 for i, c in enumerate(interp) if c == colour), 0) for colour in ("red", "green", "blue")]
    if all(named):
        return named[0], named[1], named[2]
    others = [i + 1 for i, c in enumerate(interp) if c != "alpha"]
    return (others[0], others[1], others[2]) if len(others) >= 3 else None


def rgb_scale(src, bands: tuple[int, int, int]) -> float:
    """The value read as full brightness: 255 for 8-bit rasters, else the 99.5th percentile of the
    bands' valid values in a reduced read of the whole raster (one value per raster, so a dark tile
    stays dark)."""
    if all(np.dtype(src.dtypes[b - 1]) == np.uint8 for b in bands):
        return 255.0
    step = max(1, int(np.ceil(max(src.width, src.height) / 512)))
    small = src.read(list(bands), out_shape=(3, max(1, src.height // step), max(1, src.width // step)), masked=True)
    values = np.ma.compressed(small).astype(np.float64)
    values = values[np.isfinite(values)]
    top = float(np.percentile(values, 99.5)) if values.size else 0.0
    return top if top > 0 else 1.0


def rgb_fractions(src, bands: tuple[int, int, int], window: tuple[int, int, int, int], scale: float = 255.0,
                  exg_threshold: float = EXG_THRESHOLD) -> tuple[float | None, float | None]:
    """Vegetation and water fractions of the valid pixels of a window by the RGB rules of
    :func:`rgb_cover_masks` (values divided by ``scale``); ``(None, None)`` without valid pixels."""
    read = _window_values(src, bands, window)
    if read is None:
        return None, None
    values, valid, n_valid = read
    with np.errstate(invalid="ignore", over="ignore"):
        vegetation, water = rgb_cover_masks(np.where(valid, np.clip(values / scale, 0.0, 1.0), 0.0), exg_threshold)
    return float(np.count_nonzero(vegetation & valid) / n_valid), float(np.count_nonzero(water & valid) / n_valid)


@dataclass
class _RasterFacts:
    """Per-tile facts read from the source rasters."""

    acquired: list[str | None]
    pixel_size_m: np.ndarray
    vegetation: list[float | None]
    water: list[float | None]
    source: list[tuple[str | None, str | None]]  # (vegetation source, water source) per tile


def _raster_facts(tiles, nir_band, ndvi_threshold, ndwi_threshold, progress, rgb_cover: bool = True,
                  exg_threshold: float = EXG_THRESHOLD) -> _RasterFacts:
    """Open each source raster once: its date, pixel size and each tile's cover fractions (NIR
    indices, else the RGB rules when ``rgb_cover``)."""
    n = len(tiles)
    facts = _RasterFacts([None] * n, np.full(n, np.nan), [None] * n, [None] * n, [(None, None)] * n)
    rows_by_source: dict[str, list[int]] = {}
    for i, source in enumerate(tiles["source"].astype(str)):
        rows_by_source.setdefault(source, []).append(i)
    windows = tiles[["x_off", "y_off", "width", "height"]].to_numpy(dtype=np.int64)
    if progress is not None:
        progress.start("rasters", n, "dates, vegetation and water fractions")
    for source, rows in rows_by_source.items():
        with open_raster(source) as src:
            info = describe(src)
            acquired = acquisition_date(src)
            size = float(np.sqrt(np.prod(info.pixel_size_m))) if info.pixel_size_m else np.nan
            bands = spectral_bands(src, nir_band)
            colours = rgb_bands(src) if bands is None and rgb_cover else None
            scale = read_pixels(source, lambda: rgb_scale(src, colours)) if colours else 255.0
            for i in rows:
                facts.acquired[i] = acquired
                facts.pixel_size_m[i] = size
            if bands is None and colours is None:
                if progress is not None:
                    progress.advance(len(rows))
                continue
            for i in rows:
                window = tuple(windows[i])
                if bands is not None:
                    facts.vegetation[i], facts.water[i] = read_pixels(
                        source, lambda: spectral_fractions(src, bands, window, ndvi_threshold, ndwi_threshold))
                    names = ("ndvi", "ndwi")
                else:
                    assert colours is not None
                    rgb = colours
                    facts.vegetation[i], facts.water[i] = read_pixels(
                        source, lambda: rgb_fractions(src, rgb, window, scale, exg_threshold))
                    names = ("rgb_exg", "rgb_water")
                facts.source[i] = (names[0] if facts.vegetation[i] is not None else None,
                                   names[1] if facts.water[i] is not None else None)
                if progress is not None:
                    progress.advance()
    return facts


# --------------------------------------------------------------------------- vector facts

@dataclass
class _Features:
    """One vector layer read for a tile set: geometries in the metric CRS, with classes and an index."""

    kind: str
    geoms: np.ndarray  # shapely geometries in the metric CRS
    classes: np.ndarray | None
    index: Any = None  # the GeoSeries spatial index over ``geoms``


def _kind(geometry_type: str, dims: np.ndarray) -> str:
    """Polygon / line / point from the layer's declared geometry type, else from its features."""
    declared = (geometry_type or "").lower()
    for word, kind in (("polygon", "polygon"), ("line", "line"), ("point", "point")):
        if word in declared:
            return kind
    if len(dims):
        return {0: "point", 1: "line"}.get(int(np.bincount(dims).argmax()), "polygon")
    return "polygon"


def _class_values(values) -> np.ndarray:
    """Attribute values as class names; missing or blank values become :data:`UNKNOWN_CLASS`."""
    def name(v) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            return UNKNOWN_CLASS
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        text = str(v).strip()
        return text or UNKNOWN_CLASS

    return np.array([name(v) for v in values], dtype=object)


def _valid_polygons(geoms: np.ndarray) -> np.ndarray:
    """Invalid polygons made valid, keeping only their polygonal parts."""
    geoms = geoms.copy()
    bad = np.flatnonzero(~shapely.is_valid(geoms))
    for i, fixed in zip(bad, shapely.make_valid(geoms[bad])):
        parts = shapely.get_parts(fixed)
        geoms[i] = shapely.union_all(parts[shapely.get_dimensions(parts) == 2])
    return geoms


def _read_features(source: VectorSource, tiles, crs) -> _Features:
    """Read the layer once (only the tiles' bounding box), drop empty rows and reproject to ``crs``."""
    try:
        info = pyogrio.read_info(source.path, layer=source.layer)
        layer_crs = info.get("crs") or tiles.crs
        if not info.get("crs"):
            log.warning("%s: layer %s has no CRS; assuming the tiles' CRS", source.path, source.layer)
        minx, miny, maxx, maxy = (float(v) for v in tiles.total_bounds)
        bbox = Transformer.from_crs(tiles.crs, layer_crs, always_xy=True).transform_bounds(
            minx, miny, maxx, maxy, densify_pts=21)
        columns = [source.class_field] if source.class_field else []
        frame = pyogrio.read_dataframe(source.path, layer=source.layer, columns=columns, bbox=tuple(bbox))
    except Exception as exc:  # pyogrio / pyproj raise many types
        raise InputError(f"{source.path}: cannot read layer {source.layer!r} ({_first_line(exc)})") from None
    if frame.crs is None:
        frame = frame.set_crs(layer_crs)
    frame = frame[~(frame.geometry.isna() | frame.geometry.is_empty)]
    geoms = np.asarray(frame.geometry.to_crs(crs).array, dtype=object)
    dims = shapely.get_dimensions(geoms)
    kind = _kind(info.get("geometry_type", ""), dims)
    keep = dims == _DIMENSION[kind]
    geoms = geoms[keep]
    if kind == "polygon":
        geoms = _valid_polygons(geoms)
    classes = _class_values(frame[source.class_field].to_numpy()[keep]) if source.class_field else None
    return _Features(kind, geoms, classes, gpd.GeoSeries(geoms, crs=crs).sindex)


def _measure(geoms: np.ndarray, kind: str) -> np.ndarray:
    """Area (polygons), length (lines) or 1 per non-empty geometry (points)."""
    if kind == "polygon":
        return shapely.area(geoms)
    if kind == "line":
        return shapely.length(geoms)
    return (~shapely.is_empty(geoms)).astype(float)


def _group_union(geoms: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    """Union of ``geoms`` per group index 0..n-1 (None for empty groups)."""
    unions = np.full(n, None, dtype=object)
    order = np.argsort(groups, kind="stable")
    keys, starts = np.unique(groups[order], return_index=True)
    for key, members in zip(keys, np.split(order, starts[1:])):
        unions[key] = geoms[members[0]] if len(members) == 1 else shapely.union_all(geoms[members])
    return unions


def _region_measures(kind: str, clipped: np.ndarray, tile_idx: np.ndarray, bounds: np.ndarray,
                     unions: np.ndarray | None = None) -> np.ndarray:
    """Measure (area / length / count) of the clipped features in each grid cell of each tile, shape (n, 9).

    Polygons are measured through ``unions`` (one per tile), so overlaps are not counted twice.
    """
    regions = np.zeros((len(bounds), len(REGIONS)))
    if not len(clipped):
        return regions
    if kind == "point":
        cells = _region_index(shapely.centroid(clipped), bounds[tile_idx])
        np.add.at(regions, (tile_idx, cells), 1.0)
        return regions
    boxes = _region_boxes(bounds)
    if kind == "polygon":
        assert unions is not None, "polygon measures need the per-tile unions"
        return np.nan_to_num(shapely.area(shapely.intersection(unions[:, None], boxes)))
    np.add.at(regions, tile_idx, shapely.length(shapely.intersection(clipped[:, None], boxes[tile_idx])))
    return regions


def _class_shares(classes: np.ndarray, measure: np.ndarray, tile_idx: np.ndarray, n: int) -> list[list]:
    """Per tile, ``(class, share of the measure)`` sorted by share (then name)."""
    totals: list[dict[str, float]] = [{} for _ in range(n)]
    for t, name, m in zip(tile_idx, classes, measure):
        totals[t][name] = totals[t].get(name, 0.0) + float(m)
    shares = []
    for sums in totals:
        whole = sum(sums.values())
        pairs = [(name, m / whole) for name, m in sums.items()] if whole > 0 else []
        shares.append(sorted(pairs, key=lambda p: (-p[1], p[0])))
    return shares


def _chunk_facts(features: _Features, label: str, footprints, areas, bounds) -> list[VectorFacts]:
    """Vector facts of one layer for a batch of tiles (vectorised clipping and measuring)."""
    n, kind = len(footprints), features.kind
    if len(features.geoms):
        tile_idx, feat_idx = features.index.query(footprints, predicate="intersects")
    else:
        tile_idx = feat_idx = np.zeros(0, dtype=np.int64)
    clipped = shapely.intersection(features.geoms[feat_idx], footprints[tile_idx])
    measure = _measure(clipped, kind)
    keep = measure > 0
    tile_idx, feat_idx, clipped, measure = tile_idx[keep], feat_idx[keep], clipped[keep], measure[keep]

    counts = np.bincount(tile_idx, minlength=n)
    unions = _group_union(clipped, tile_idx, n) if kind == "polygon" else None
    regions = _region_measures(kind, clipped, tile_idx, bounds, unions)
    region_totals = regions.sum(axis=1)
    covered = np.nan_to_num(shapely.area(unions)) if unions is not None else None
    totals = np.bincount(tile_idx, weights=measure, minlength=n)
    classes = (_class_shares(features.classes[feat_idx], measure, tile_idx, n)
               if features.classes is not None else [[] for _ in range(n)])

    out = []
    for t in range(n):
        facts = VectorFacts(label=label, kind=kind, count=int(counts[t]), classes=classes[t])
        if kind == "polygon" and covered is not None:
            facts.area_fraction = float(min(1.0, covered[t] / areas[t])) if areas[t] > 0 else 0.0
        elif kind == "line":
            facts.length_m = float(totals[t])
            facts.length_per_km2 = float(totals[t] / (areas[t] / 1e6)) if areas[t] > 0 else 0.0
        if region_totals[t] > 0:
            shares = regions[t] / region_totals[t]
            facts.regions = {name: float(s) for name, s in zip(REGIONS, shares)}
            facts.main_region = REGIONS[int(np.argmax(shares))]
        out.append(facts)
    return out


def _layer_facts(source: VectorSource, tiles, footprints, areas, bounds, crs, progress) -> list[VectorFacts]:
    """Vector facts of one layer for every tile, in batches of :data:`CHUNK` tiles."""
    features = _read_features(source, tiles, crs)
    out: list[VectorFacts] = []
    for start in range(0, len(footprints), CHUNK):
        stop = min(start + CHUNK, len(footprints))
        out.extend(_chunk_facts(features, source.label, footprints[start:stop], areas[start:stop],
                                bounds[start:stop]))
        if progress is not None:
            progress.advance(stop - start)
    return out


# --------------------------------------------------------------------------- the whole job

def _check_tiles(tiles) -> None:
    """One-line errors for frames that are not georeferenced tile layers."""
    missing = [c for c in TILE_COLUMNS if c not in tiles.columns]
    if missing:
        raise InputError(f"tile layer lacks column(s) {', '.join(missing)}; tile a raster into a layer first")
    if tiles.crs is None:
        raise InputError("tile layer has no CRS (pixel-space footprints); facts need georeferenced tiles")
    if tiles.geometry.isna().any() or tiles.geometry.is_empty.any():
        raise InputError("tile layer has tiles without footprints; tile the raster again")
    if tiles["tile_id"].duplicated().any():
        dup = tiles["tile_id"][tiles["tile_id"].duplicated()].iloc[0]
        raise InputError(f"tile layer has duplicate tile_id {dup!r}; tile ids must be unique")


def _check_thresholds(ndvi_threshold: float, ndwi_threshold: float) -> None:
    for name, value in (("NDVI", ndvi_threshold), ("NDWI", ndwi_threshold)):
        if not -1.0 <= float(value) <= 1.0:
            raise OptionError(f"invalid {name} threshold {value}: use a value in -1..1")


def _gsd(tiles, pixel_size_m: np.ndarray, width_m: np.ndarray) -> np.ndarray:
    """Ground sample distance per tile: the layer's ``gsd`` (resolution of the tile as read), else
    the source's pixel size in metres, else the tile width in metres over its width in pixels."""
    gsd = np.full(len(tiles), np.nan)
    if "gsd" in tiles.columns:
        gsd = tiles["gsd"].to_numpy(dtype=float, na_value=np.nan)
    gsd = np.where(np.isfinite(gsd) & (gsd > 0), gsd, pixel_size_m)
    per_pixel = width_m / np.maximum(tiles["width"].to_numpy(dtype=float), 1.0)
    return np.where(np.isfinite(gsd) & (gsd > 0), gsd, per_pixel)


def compute_facts(
    tiles,
    vectors: Sequence[VectorSource] = (),
    ndvi_threshold: float = 0.3,
    ndwi_threshold: float = 0.0,
    nir_band: int | None = None,
    progress=None,
    rgb_cover: bool = True,
    exg_threshold: float = EXG_THRESHOLD,
) -> dict[str, TileFacts]:
    """Facts for every tile of a tile layer (GeoDataFrame from ``read_tiles`` / ``tile_rasters``), keyed by tile_id.

    Sizes, lengths and areas are in metres (see :func:`metric_crs`); each vector layer is read
    once. Cover fractions come from NIR indices, else (``rgb_cover``) from the RGB rules of
    :func:`rgb_cover_masks` with ``exg_threshold``. ``progress`` (a
    :class:`hqrs_geo.progress.Progress`) gets the stages ``rasters`` (one step per tile) and
    ``vectors`` (one step per tile and layer).
    """
    _check_tiles(tiles)
    _check_thresholds(ndvi_threshold, ndwi_threshold)
    sources = [check_vector_source(v) for v in vectors]
    if len(tiles) == 0:
        return {}
    crs = metric_crs(tiles)
    footprints = np.asarray(tiles.geometry.to_crs(crs).array, dtype=object)
    areas, bounds = shapely.area(footprints), shapely.bounds(footprints)
    width_m, height_m = _tile_sizes(footprints)
    lon, lat = _centres_lonlat(footprints, crs)
    if not -1.0 <= float(exg_threshold) <= 1.0:
        raise OptionError(f"invalid excess-green threshold {exg_threshold}: use a value in -1..1")
    raster = _raster_facts(tiles, nir_band, ndvi_threshold, ndwi_threshold, progress, rgb_cover, exg_threshold)
    gsd = _gsd(tiles, raster.pixel_size_m, width_m)

    if progress is not None and sources:
        progress.start("vectors", len(tiles) * len(sources), ", ".join(s.label for s in sources))
    per_layer = [_layer_facts(s, tiles, footprints, areas, bounds, crs, progress) for s in sources]

    facts = {}
    for i, tile_id in enumerate(tiles["tile_id"].astype(str)):
        facts[tile_id] = TileFacts(
            tile_id=tile_id, width_m=float(width_m[i]), height_m=float(height_m[i]), gsd_m=float(gsd[i]),
            centre_lat=float(lat[i]), centre_lon=float(lon[i]), acquired=raster.acquired[i],
            vegetation_fraction=raster.vegetation[i], water_fraction=raster.water[i],
            vectors=[layer[i] for layer in per_layer],
            ndvi_threshold=float(ndvi_threshold), ndwi_threshold=float(ndwi_threshold),
            vegetation_source=raster.source[i][0], water_source=raster.source[i][1],
            exg_threshold=float(exg_threshold),
        )
    return facts
