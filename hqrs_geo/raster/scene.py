"""Opening rasters and describing them: the facts tiling needs about one scene.

All rasterio/GDAL failures on opening (:func:`open_raster`) and on reading pixels
(:func:`read_pixels`) are turned into one-line :class:`~hqrs_geo.errors.InputError` messages.
"""
from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import rasterio
from pyproj import CRS, Geod, Transformer
from rasterio.enums import ColorInterp
from rasterio.env import set_gdal_config
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from ..errors import InputError
from ..redact import public_url, redact, reveal
from .network import NetworkTimeout, apply_gdal_options, bounded, busy, network_reason
from .sources import is_gdal_virtual, is_network

T = TypeVar("T")

GDAL_CACHE_MB = 256  # GDAL's default (5 % of RAM) would let the block cache grow with the scene



def limit_gdal_cache() -> None:
    """Cap GDAL's block cache (unless the user set GDAL_CACHEMAX) so memory stays flat."""
    if "GDAL_CACHEMAX" not in os.environ:
        set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_MB)


def open_dataset(path: str) -> rasterio.DatasetReader:
    """``rasterio.open`` with the block cache capped. A network path is opened

    * with the credentials :mod:`hqrs_geo.redact` keeps in memory for it (``path`` itself is the
      public form, the one stored and shown);
    * within the network limits (:mod:`hqrs_geo.raster.network`: connect and read timeouts, a
      deadline; interruptible by Ctrl-C/SIGTERM);
    * without GDAL's directory listing (one request per COG instead of a listing per folder)
      unless the user set ``GDAL_DISABLE_READDIR_ON_OPEN``.

    Raises rasterio's errors (and :class:`~hqrs_geo.raster.network.NetworkTimeout`);
    :func:`open_raster` words them."""
    limit_gdal_cache()
    if not is_network(path):
        return rasterio.open(path)

    apply_gdal_options()
    real = reveal(path)

    def open_remote() -> rasterio.DatasetReader:
        if "GDAL_DISABLE_READDIR_ON_OPEN" not in os.environ:
            with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"):
                return rasterio.open(real)
        return rasterio.open(real)

    return bounded(open_remote, path)


def failure_reason(path: str, exc: BaseException) -> str:
    """The first line of a rasterio/GDAL error of ``path``, without credentials."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    real = reveal(path)
    if real != path:
        text = text.replace(real, path)
    return redact(text.replace(public_url(real), public_url(path)))


def network_error(path: str, exc: BaseException) -> InputError | None:
    """For a network raster ``path``: a one-line error that fits a failed read (an HTTP status, a
    timeout, a refused connection); None otherwise."""
    if not is_network(path):
        return None

    reason = network_reason(path, failure_reason(path, exc))
    return InputError(reason) if reason else None


#: Seconds a network raster that failed to open (HTTP error, timeout) fails again at once with the
#: same error instead of being asked again (GDAL keeps the failure too and would only say
#: "not recognized as being in a supported file format").
FAILURE_MEMORY = 300.0
_failures: dict[str, tuple[float, InputError]] = {}


def _failure_key(path: str) -> str:
    """What a failure is remembered by: the path with its credentials (new credentials: a new try)."""
    return hashlib.sha256(reveal(path).encode()).hexdigest()


def _remembered_failure(path: str) -> InputError | None:
    key = _failure_key(path)
    seen = _failures.get(key)
    if seen is None or time.monotonic() - seen[0] > FAILURE_MEMORY:
        _failures.pop(key, None)
        return None
    return seen[1]


def _remember_failure(path: str, error: InputError) -> InputError:
    _failures[_failure_key(path)] = (time.monotonic(), error)
    return error


@contextmanager
def open_raster(path: str) -> Iterator[rasterio.DatasetReader]:
    """Open ``path`` with rasterio, turning every opening failure into a one-line InputError.
    A network raster whose read is still under way when the block ends (a read past its
    deadline, Ctrl-C) is left to that read instead of being closed under it."""
    if not is_gdal_virtual(path) and not os.path.exists(path):
        raise InputError(f"{path}: file not found; check the path")
    shown = public_url(path)
    known = _remembered_failure(path) if is_network(path) else None
    if known is not None:
        raise InputError(str(known))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = open_dataset(path)
    except NetworkTimeout as exc:
        raise _remember_failure(path, exc) from None
    except RasterioError as exc:
        reason = failure_reason(path, exc)
        network = network_error(path, exc)
        if network is not None:
            raise _remember_failure(path, network) from None
        if "not recognized as" in reason or "not a supported file format" in reason:
            raise InputError(f"{shown}: not a raster GDAL can read; give a GeoTIFF, COG or VRT") from None
        if is_network(path):
            raise InputError(f"{shown}: cannot open as a raster ({reason}); check the URL") from None
        raise InputError(f"{shown}: cannot open as a raster ({reason}); check the file is complete") from None
    try:
        if src.count == 0:
            raise InputError(f"{shown}: has no raster bands (is it a vector file?); give a raster")
        yield src
    finally:
        if not (is_network(path) and _busy(path)):
            src.close()


def _busy(path: str) -> bool:
    return busy(path)


def read_pixels(path: str, read: Callable[[], T]) -> T:
    """Run ``read()`` (a pixel read of the raster ``path``), turning GDAL errors (corrupt
    blocks, truncated files; for network rasters: HTTP errors, timeouts) into one line. A
    network read runs within the network limits (:func:`hqrs_geo.raster.network.bounded`)."""
    try:
        if is_network(path):
            return bounded(read, path)
        return read()
    except RasterioError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None and str(exc.__cause__) else exc
        network = network_error(path, cause)
        if network is not None:
            raise network from None
        reason = failure_reason(path, cause)

        raise InputError(f"{public_url(path)}: cannot read pixels ({reason}); the file may be corrupt or truncated") \
            from None


@dataclass(frozen=True)
class SceneInfo:
    """What hqrs_geo knows about one raster; built once per scene by :func:`describe`."""

    path: str
    driver: str
    width: int
    height: int
    count: int
    dtypes: tuple[str, ...]
    crs: str | None
    transform: tuple[float, ...]
    pixel_size: tuple[float, float]
    pixel_size_m: tuple[float, float] | None
    nodata: float | None
    colorinterp: tuple[str, ...]
    mask_flags: tuple[tuple[str, ...], ...]
    overviews: tuple[int, ...]
    block_shapes: tuple[tuple[int, int], ...]
    compression: str | None
    has_gcps: bool
    has_palette: bool
    bounds: tuple[float, float, float, float]
    tags: dict = field(default_factory=dict)

    @property
    def all_valid(self) -> bool:
        """True when GDAL reports no nodata, alpha or mask on any band."""
        return all(flags == ("all_valid",) for flags in self.mask_flags)

    @property
    def is_float(self) -> bool:
        """True for floating-point rasters (NaN counts as invalid)."""
        return any(d.startswith("float") for d in self.dtypes)

    def as_dict(self) -> dict:
        """JSON-friendly dictionary of the facts (used by ``hqrs-geo info --json``)."""
        return asdict(self)


#: Projections whose scale at the scene centre is within this of 1 (UTM, national grids) measure
#: ground sizes in map units; others (Web Mercator: 1 / cos(latitude)) on the ellipsoid.
SCALE_TOLERANCE = 0.01


def _pixel_size_m(src: rasterio.DatasetReader) -> tuple[float, float] | None:
    """Ground size in metres of one pixel step along x and along y, at the scene centre.

    Geographic CRSs and projections that distort distances by more than :data:`SCALE_TOLERANCE`
    at the centre (e.g. Web Mercator) are measured on the WGS84 ellipsoid; other projected CRSs
    in their own (metre-converted) units.
    """
    if src.crs is None:
        return None

    crs = CRS.from_wkt(src.crs.to_wkt())
    t = src.transform
    cx, cy = src.width / 2, src.height / 2
    x, y = t.c + t.a * cx + t.b * cy, t.f + t.d * cx + t.e * cy
    geod = Geod(ellps="WGS84")
    if crs.is_geographic:
        _, _, dx = geod.inv(x, y, x + t.a, y + t.d)
        _, _, dy = geod.inv(x, y, x + t.b, y + t.e)
        return float(dx), float(dy)
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    map_size = (float(((t.a**2 + t.d**2) ** 0.5) * factor), float(((t.b**2 + t.e**2) ** 0.5) * factor))
    try:
        to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        lon, lat = to_lonlat.transform(x, y)
        lon_x, lat_x = to_lonlat.transform(x + t.a, y + t.d)
        lon_y, lat_y = to_lonlat.transform(x + t.b, y + t.e)
        ground = (float(geod.inv(lon, lat, lon_x, lat_x)[2]), float(geod.inv(lon, lat, lon_y, lat_y)[2]))
    except Exception:  # pyproj raises several types for CRSs it cannot invert
        return map_size
    if not all(g > 0 and abs(g / m - 1) <= SCALE_TOLERANCE for g, m in zip(ground, map_size) if m > 0):
        return ground
    return map_size


def _public_name(name: str) -> str:
    return public_url(name)


def describe(src: rasterio.DatasetReader) -> SceneInfo:
    """Collect the facts of an open dataset into a :class:`SceneInfo`."""
    t = src.transform
    gcps, _ = src.gcps
    has_palette = False
    try:
        src.colormap(1)
        has_palette = True
    except ValueError:
        pass
    flags = tuple(tuple(f.name for f in band_flags) for band_flags in src.mask_flag_enums)
    return SceneInfo(
        path=_public_name(src.name),
        driver=src.driver,
        width=src.width,
        height=src.height,
        count=src.count,
        dtypes=tuple(src.dtypes),
        crs=src.crs.to_string() if src.crs else None,
        transform=tuple(t)[:6],
        pixel_size=(float((t.a**2 + t.d**2) ** 0.5), float((t.b**2 + t.e**2) ** 0.5)),
        pixel_size_m=_pixel_size_m(src),
        nodata=src.nodata,
        colorinterp=tuple(ci.name for ci in src.colorinterp),
        mask_flags=flags,
        overviews=tuple(src.overviews(1)),
        block_shapes=tuple(tuple(b) for b in src.block_shapes),
        compression=src.compression.name if src.compression else None,
        has_gcps=bool(gcps),
        has_palette=has_palette,
        bounds=tuple(src.bounds),
        tags=dict(src.tags()),
    )


@dataclass(frozen=True)
class BandChoice:
    """Which 1-based bands make the R, G and B channels (``palette`` for colour-mapped rasters)."""

    indexes: tuple[int, int, int]
    palette: bool = False


def choose_bands(info: SceneInfo, requested: Sequence[int] | None = None) -> BandChoice:
    """Pick the bands to show as RGB.

    Default: red/green/blue by colour interpretation; else the first three non-alpha bands
    (so 4-band RGBN gives RGB); a single band is replicated (or expanded through its palette).
    ``requested`` (one or three 1-based band numbers) overrides the default.
    """
    if requested:
        bands = [int(b) for b in requested]
        if len(bands) not in (1, 3):
            raise InputError(f"give one or three band numbers, not {len(bands)}", option="bands")
        bad = [b for b in bands if not 1 <= b <= info.count]
        if bad:
            raise InputError(f"{info.path}: has {info.count} band(s); band {bad[0]} does not exist "
                             f"(use 1..{info.count})", option="bands")
        return BandChoice(tuple(bands * 3) if len(bands) == 1 else tuple(bands))  # type: ignore[arg-type]
    interp = [c.lower() for c in info.colorinterp]
    if all(c in interp for c in ("red", "green", "blue")):
        return BandChoice((interp.index("red") + 1, interp.index("green") + 1, interp.index("blue") + 1))
    if info.count >= 1 and interp[0] == "palette" and info.has_palette:
        return BandChoice((1, 1, 1), palette=True)
    usable = [i + 1 for i, c in enumerate(interp) if c != ColorInterp.alpha.name]
    if len(usable) >= 3:
        return BandChoice((usable[0], usable[1], usable[2]))
    if len(usable) == 1:
        return BandChoice((usable[0], usable[0], usable[0]))
    raise InputError(
        f"{info.path}: cannot choose RGB from {info.count} band(s) ({', '.join(info.colorinterp)}); "
        "choose the bands (R,G,B or a single band)", option="bands")
