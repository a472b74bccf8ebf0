"""Tiling: scenes -> tile records with footprints and valid fractions, and tile pixels as uint8 RGB.

The pieces, from outside in:

* :class:`TileConfig` – the user's choices (size, overlap, resolution, edge policy, bands…).
* :func:`prepare_scenes` – opens each raster once: facts, band choice, one stretch, the grid.
* :class:`TileReader` – reads one tile's pixels and validity; reopens rasters lazily in every
  process, so it can be pickled into DataLoader workers.
* :func:`plan_tiles` – streams tile records (with ``valid_fraction``) for all scenes.
* :func:`tile_rasters` – the whole job, returning a GeoDataFrame ready to be written.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from .errors import InputError, OptionError
from .footprints import window_polygons
from .grid import DEFAULT_EDGE, EDGE_POLICIES, SceneGrid, parse_tile_lengths, plan_grid
from .scene import (BandChoice, SceneInfo, choose_bands, describe, expand_inputs, limit_gdal_cache, open_raster,
                    scene_keys)
from .stretch import Scale, StretchSpec, scene_scale

log = logging.getLogger(__name__)

DEFAULT_MIN_VALID = 0.5
TILE_COLUMNS = (
    "tile_id", "source", "row", "col", "x_off", "y_off", "width", "height",
    "out_width", "out_height", "valid_fraction", "gsd",
)


@dataclass(frozen=True)
class TileConfig:
    """How scenes are cut into tiles. Every field has a documented default.

    tile_size: ``256`` (pixels of the output tile), ``"64m"`` (ground size).
    overlap: pixels, ground units or percent of the tile (``"25%"``).
    gsd: target ground resolution in metres (resampled on read; overviews used when coarser).
    edge: ``shift`` (default: last tile moved inward), ``pad`` (fill past the edge with
      nodata) or ``drop`` (partial tiles left out).
    min_valid: tiles whose valid fraction is below this are skipped (default 0.5).
    bands: 1-based band numbers for R, G, B (or one band, replicated); default from colour
      interpretation.
    stretch: ``auto`` | ``none`` | ``p2,98`` | ``0,3000`` (see :class:`StretchSpec`).
    crs: output CRS of the footprints (default: the first scene's CRS).
    resampling: GDAL resampling used when a target ``gsd`` changes the resolution.
    """

    tile_size: Union[int, str] = 256
    overlap: Union[int, str] = 0
    gsd: Optional[float] = None
    edge: str = DEFAULT_EDGE
    min_valid: float = DEFAULT_MIN_VALID
    bands: Optional[tuple[int, ...]] = None
    stretch: Union[str, StretchSpec] = "auto"
    crs: Optional[str] = None
    resampling: str = "bilinear"

    def validated(self) -> "TileConfig":
        """Return a copy with every option checked (raises :class:`OptionError`)."""
        parse_tile_lengths(self.tile_size, self.overlap)
        if self.edge not in EDGE_POLICIES:
            raise OptionError(f"invalid edge policy {self.edge!r}: use one of {', '.join(EDGE_POLICIES)}")
        if not 0.0 <= self.min_valid <= 1.0:
            raise OptionError(f"invalid minimum valid fraction {self.min_valid}: use a value in 0..1")
        try:
            Resampling[self.resampling]
        except KeyError:
            names = ", ".join(r.name for r in Resampling if r.value < 8)
            raise OptionError(f"invalid resampling {self.resampling!r}: use one of {names}") from None
        if self.crs is not None:
            from pyproj import CRS
            from pyproj.exceptions import CRSError

            try:
                CRS.from_user_input(self.crs)
            except CRSError:
                raise OptionError(f"invalid CRS {self.crs!r}: use e.g. EPSG:4326") from None
        stretch = StretchSpec.parse(self.stretch)
        bands = tuple(int(b) for b in self.bands) if self.bands else None
        return replace(self, stretch=str(stretch), bands=bands)

    def as_dict(self) -> dict:
        """JSON-friendly parameters (kept in the layer's run metadata)."""
        d = asdict(self)
        d["stretch"] = str(StretchSpec.parse(self.stretch))
        return d


@dataclass
class TileRecord:
    """One tile: where it is in its scene and how it is read. Picklable and cheap."""

    tile_id: str
    source: str
    row: int
    col: int
    x_off: int
    y_off: int
    width: int
    height: int
    out_width: int
    out_height: int
    valid_fraction: float = 1.0
    gsd: Optional[float] = None

    @property
    def window(self) -> Window:
        """The tile's pixel window in its scene (may run past the edge with ``edge='pad'``)."""
        return Window(self.x_off, self.y_off, self.width, self.height)


@dataclass
class SceneReading:
    """Everything needed to read tiles of one scene; serialisable to the run metadata."""

    source: str
    key: str
    bands: BandChoice
    scale: Scale
    resampling: str
    width: int
    height: int
    dtype: str
    all_valid: bool
    crs: Optional[str] = None
    transform: tuple[float, ...] = ()
    info: Optional[SceneInfo] = field(default=None, repr=False)
    grid: Optional[SceneGrid] = field(default=None, repr=False)

    def as_dict(self) -> dict:
        """JSON-friendly form."""
        return {
            "source": self.source, "key": self.key, "bands": list(self.bands.indexes),
            "palette": self.bands.palette, "scale": self.scale.as_dict(),
            "resampling": self.resampling, "width": self.width, "height": self.height,
            "dtype": self.dtype, "all_valid": self.all_valid, "crs": self.crs,
            "transform": list(self.transform),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SceneReading":
        """Inverse of :meth:`as_dict` (used to read tiles of an existing layer)."""
        return cls(
            source=d["source"], key=d["key"],
            bands=BandChoice(tuple(d["bands"]), bool(d.get("palette"))),
            scale=Scale.from_dict(d["scale"]), resampling=d["resampling"],
            width=d["width"], height=d["height"], dtype=d["dtype"], all_valid=d["all_valid"],
            crs=d.get("crs"), transform=tuple(d.get("transform") or ()),
        )


def prepare_scenes(inputs: Sequence[Union[str, os.PathLike]], config: TileConfig) -> list[SceneReading]:
    """Open every input once: check it, choose bands, compute its one stretch and its grid."""
    config = config.validated()
    tile_size, overlap = parse_tile_lengths(config.tile_size, config.overlap)
    stretch = StretchSpec.parse(config.stretch)
    paths = expand_inputs(inputs)
    keys = scene_keys(paths)
    scenes = []
    for path in paths:
        with open_raster(path) as src:
            info = describe(src)
            if info.crs is None and info.has_gcps:
                raise InputError(
                    f"{path}: is georeferenced by GCPs only; warp it first "
                    "(gdalwarp -r bilinear in.tif out.tif) and tile the result"
                )
            bands = choose_bands(info, config.bands)
            grid = plan_grid(info, tile_size, overlap, config.gsd, config.edge)
            scale = Scale() if bands.palette else _guarded(path, lambda: scene_scale(src, bands.indexes, stretch))
        scenes.append(SceneReading(
            source=path, key=keys[path], bands=bands, scale=scale, resampling=config.resampling,
            width=info.width, height=info.height, dtype=info.dtypes[bands.indexes[0] - 1],
            all_valid=info.all_valid and not info.is_float, crs=info.crs,
            transform=info.transform, info=info, grid=grid,
        ))
    return scenes


def _guarded(path: str, read: Callable):
    """Run a read, turning GDAL errors (corrupt blocks, truncated files) into one line."""
    try:
        return read()
    except RasterioError as exc:
        cause = exc.__cause__ if exc.__cause__ is not None and str(exc.__cause__) else exc
        reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise InputError(f"{path}: cannot read pixels ({reason}); the file may be corrupt or truncated") from None


class TileReader:
    """Reads tiles as (HxWx3 uint8 RGB, HxW bool valid mask) from the scenes it knows.

    Rasters are opened on first use in each process and kept open; pickling drops the open
    handles, so a reader can be sent to DataLoader worker processes.
    """

    def __init__(self, scenes: Iterable[SceneReading]):
        self.scenes = {s.source: s for s in scenes}
        self._open: dict[str, rasterio.DatasetReader] = {}
        self._luts: dict[tuple[str, int], np.ndarray] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def close(self) -> None:
        """Close every raster this process opened."""
        for src in self._open.values():
            src.close()
        self._open.clear()

    def __enter__(self) -> "TileReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _dataset(self, source: str) -> rasterio.DatasetReader:
        if self._pid != os.getpid():  # forked: handles of the parent must not be shared
            self._open, self._pid = {}, os.getpid()
        src = self._open.get(source)
        if src is None:
            if source not in self.scenes:
                raise InputError(f"{source}: not one of the scenes of this tile set")
            limit_gdal_cache()
            try:
                src = rasterio.open(source)
            except RasterioError as exc:
                raise InputError(f"{source}: cannot open ({str(exc).splitlines()[0]}); was it moved?") from None
            self._open[source] = src
        return src

    @staticmethod
    def _placement(rec: TileRecord, scene: SceneReading) -> Optional[tuple[Window, tuple[slice, slice]]]:
        """The part of the window inside the raster and where it lands in the output tile."""
        x0, y0 = max(rec.x_off, 0), max(rec.y_off, 0)
        x1, y1 = min(rec.x_off + rec.width, scene.width), min(rec.y_off + rec.height, scene.height)
        if x1 <= x0 or y1 <= y0:
            return None
        sx, sy = rec.out_width / rec.width, rec.out_height / rec.height
        c0, c1 = round((x0 - rec.x_off) * sx), round((x1 - rec.x_off) * sx)
        r0, r1 = round((y0 - rec.y_off) * sy), round((y1 - rec.y_off) * sy)
        if c1 <= c0 or r1 <= r0:
            return None
        return Window(x0, y0, x1 - x0, y1 - y0), (slice(r0, r1), slice(c0, c1))

    def _read_valid(self, src, scene: SceneReading, inner: Window, shape, data=None) -> np.ndarray:
        """Valid pixels of a window: a pixel counts when any selected band is unmasked (and not NaN).

        ``data``, when given, is the channel-last pixel block already read (for the NaN test).
        """
        bands = sorted(set(scene.bands.indexes))
        if scene.all_valid:
            return np.ones(shape, dtype=bool)
        masks = src.read_masks(bands, window=inner, out_shape=(len(bands), *shape), resampling=Resampling.nearest)
        valid = masks.astype(bool).any(axis=0)
        if np.dtype(scene.dtype).kind == "f":
            if data is None:
                data = src.read(bands, window=inner, out_shape=(len(bands), *shape), resampling=Resampling.nearest)
                valid &= ~np.isnan(data).any(axis=0)
            else:
                valid &= ~np.isnan(data).any(axis=-1)
        return valid

    def valid_fraction(self, rec: TileRecord) -> float:
        """Fraction of the tile's output pixels that are valid (inside the raster and unmasked)."""
        scene = self.scenes[rec.source]
        placed = self._placement(rec, scene)
        if placed is None:
            return 0.0
        inner, (rs, cs) = placed
        shape = (rs.stop - rs.start, cs.stop - cs.start)
        total = rec.out_width * rec.out_height
        if scene.all_valid:
            return shape[0] * shape[1] / total
        src = self._dataset(rec.source)
        valid = _guarded(rec.source, lambda: self._read_valid(src, scene, inner, shape))
        return float(np.count_nonzero(valid)) / total

    def read(self, rec: TileRecord) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of one tile as ``(rgb[H, W, 3] uint8, valid[H, W] bool)``; invalid pixels are 0.

        ``rgb`` is usually a channel-last *view* of a band-sequential block (``rgb.base`` is
        ``(3, H, W)``): copy-free here, and :func:`collate_tiles` stacks the blocks as they are.
        """
        scene = self.scenes[rec.source]
        full_shape = (rec.out_height, rec.out_width)
        placed = self._placement(rec, scene)
        if placed is None:
            return np.zeros((*full_shape, 3), np.uint8), np.zeros(full_shape, bool)
        inner, (rs, cs) = placed
        shape = (rs.stop - rs.start, cs.stop - cs.start)
        src = self._dataset(rec.source)
        indexes = list(scene.bands.indexes)
        resampling = Resampling[scene.resampling]

        def read_block():
            if scene.bands.palette:
                data = src.read(indexes[0], window=inner, out_shape=shape, resampling=Resampling.nearest)
                data = self._palette(src, indexes[0])[data]
            else:  # band-sequential read (GDAL's fast path), seen channel-last without a copy
                data = np.moveaxis(src.read(indexes, window=inner, out_shape=(3, *shape), resampling=resampling), 0, -1)
            return data, self._read_valid(src, scene, inner, shape, data)

        data, ok = _guarded(rec.source, read_block)
        tile = data if scene.bands.palette else scene.scale.apply(data)
        if not scene.all_valid:
            tile[~ok] = 0
        if shape == full_shape:
            return tile, ok
        rgb = np.zeros((*full_shape, 3), dtype=np.uint8)
        valid = np.zeros(full_shape, dtype=bool)
        rgb[rs, cs] = tile
        valid[rs, cs] = ok
        return rgb, valid

    def _palette(self, src, band: int) -> np.ndarray:
        """A 256 x 3 lookup table from the band's colour map (cached per process)."""
        key = (src.name, band)
        if key not in self._luts:
            lut = np.zeros((256, 3), dtype=np.uint8)
            for value, colour in src.colormap(band).items():
                if 0 <= value < 256:
                    lut[value] = colour[:3]
            self._luts[key] = lut
        return self._luts[key]


def scene_records(scene: SceneReading) -> Iterator[TileRecord]:
    """All tiles of a scene's grid as records (valid fraction not yet measured)."""
    grid = scene.grid
    assert grid is not None, "scene was not prepared with a grid"
    for row, col, win in grid.windows():
        yield TileRecord(
            tile_id=f"{scene.key}_r{row:04d}_c{col:04d}", source=scene.source, row=row, col=col,
            x_off=int(win.col_off), y_off=int(win.row_off), width=int(win.width), height=int(win.height),
            out_width=grid.out_size[0], out_height=grid.out_size[1], gsd=grid.gsd_m,
        )


def plan_tiles(
    scenes: Sequence[SceneReading],
    reader: TileReader,
    min_valid: float = DEFAULT_MIN_VALID,
    on_tile: Optional[Callable[[int], None]] = None,
) -> Iterator[TileRecord]:
    """Stream the records of every tile whose valid fraction reaches ``min_valid``.

    ``on_tile(1)`` is called for every grid cell examined (kept or skipped), for progress.
    """
    for scene in scenes:
        for rec in scene_records(scene):
            rec.valid_fraction = round(reader.valid_fraction(rec), 6)
            if on_tile:
                on_tile(1)
            if rec.valid_fraction > 0 and rec.valid_fraction >= min_valid:
                yield rec


def output_crs(scenes: Sequence[SceneReading], requested: Optional[str]) -> Optional[str]:
    """The layer's CRS: the requested one, else the first scene's; None for pixel-space layers."""
    with_crs = [s for s in scenes if s.crs]
    if with_crs and len(with_crs) != len(scenes):
        missing = next(s.source for s in scenes if not s.crs)
        raise InputError(f"{missing}: has no CRS while other inputs have one; tile it separately")
    if not with_crs:
        if requested:
            raise InputError(f"{scenes[0].source}: has no CRS, so it cannot be reprojected to {requested}")
        log.warning("%s: has no CRS; footprints are in pixel coordinates and the layer has no CRS",
                    scenes[0].source)
        return None
    return requested or with_crs[0].crs


def records_to_frame(records: Sequence[TileRecord], scenes: Sequence[SceneReading], crs: Optional[str]):
    """A GeoDataFrame of tile records with footprint polygons in ``crs``."""
    import geopandas as gpd
    import pandas as pd

    by_source: dict[str, list[TileRecord]] = {}
    for rec in records:
        by_source.setdefault(rec.source, []).append(rec)
    geoms = []
    for scene in scenes:
        recs = by_source.get(scene.source, [])
        if not recs:
            continue
        transform = Affine(*scene.transform)
        wins = [(r.x_off, r.y_off, r.width, r.height) for r in recs]
        geoms.append((recs, window_polygons(wins, transform, scene.crs, crs)))
    ordered = [r for recs, _ in geoms for r in recs]
    polys = np.concatenate([g for _, g in geoms]) if geoms else np.empty(0, dtype=object)
    frame = pd.DataFrame([asdict(r) for r in ordered], columns=list(TILE_COLUMNS))
    frame = frame.astype({c: "int64" for c in ("row", "col", "x_off", "y_off", "width", "height",
                                                 "out_width", "out_height")})
    frame = frame.astype({"valid_fraction": "float64", "gsd": "float64"})
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(polys, crs=crs), crs=crs)


def tile_rasters(
    inputs: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    config: Optional[TileConfig] = None,
    progress=None,
):
    """Tile one or more rasters; returns ``(GeoDataFrame of tiles, list of SceneReading)``.

    ``progress`` is an optional :class:`hqrs_geo.progress.Progress`.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    config = (config or TileConfig()).validated()
    scenes = prepare_scenes(list(inputs), config)
    crs = output_crs(scenes, config.crs)
    total = sum(len(s.grid) for s in scenes)
    if progress is not None:
        progress.start("tile", total)
    with TileReader(scenes) as reader:
        advance = progress.advance if progress is not None else None
        records = list(plan_tiles(scenes, reader, config.min_valid, on_tile=advance))
    return records_to_frame(records, scenes, crs), scenes
