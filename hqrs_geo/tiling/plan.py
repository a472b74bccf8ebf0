"""Tile plans: scenes -> tile records with footprints and valid fractions.

* :func:`prepare_scenes` – opens each raster once: facts, band choice, one stretch, the grid.
* :func:`plan_tiles` – streams tile records (with ``valid_fraction``) for all scenes.
* :func:`tile_rasters` – the whole plan as a GeoDataFrame ready to be written.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
from affine import Affine

from ..errors import InputError
from ..layer.columns import SOURCE, SOURCE_URL, STAC_ITEM, TILE_COLUMNS
from ..layer.io import check_writable, write_layer
from ..layer.runs import new_run
from ..raster.catalog import resolve_sources, suited_crs
from ..raster.grid import MAX_TILES_ENV, max_tiles, parse_tile_lengths, plan_grid
from ..raster.integrity import check_pixel_data
from ..raster.reading import SceneReading
from ..raster.scene import choose_bands, describe, open_raster, read_pixels
from ..raster.stretch import Scale, StretchSpec, scene_scale
from .config import DEFAULT_MIN_VALID, TileConfig
from .footprints import window_polygons
from .reader import TileReader
from .records import TILE_ID_FORMAT, TileRecord

log = logging.getLogger(__name__)

def prepare_scenes(inputs: Sequence[Any], config: TileConfig) -> list[SceneReading]:
    """Open every input once: check it, choose bands, compute its one stretch and its grid.

    ``inputs``: paths, globs, folders, lists, URLs, STAC documents (see
    :func:`~hqrs_geo.raster.catalog.resolve_sources`) or entries it resolved. Refused with one
    line: more tiles than :func:`~hqrs_geo.raster.grid.max_tiles` over all scenes (counted
    before any tile exists), and rasters whose pixel data is missing or damaged
    (:func:`~hqrs_geo.raster.integrity.check_pixel_data`).
    """
    config = config.validated()
    tile_size, overlap = parse_tile_lengths(config.tile_size, config.overlap)
    stretch = StretchSpec.parse(config.stretch)
    scenes = []
    planned = 0
    for entry in resolve_sources(inputs):
        path = entry.path
        with open_raster(path) as src:
            info = describe(src)
            if info.crs is None and info.has_gcps:
                raise InputError(
                    f"{path}: is georeferenced by GCPs only; warp it first "
                    "(gdalwarp -r bilinear in.tif out.tif) and tile the result"
                )
            bands = choose_bands(info, config.bands)
            grid = plan_grid(info, tile_size, overlap, config.gsd, config.edge)
            planned += len(grid)
            if planned > max_tiles():
                raise InputError(f"{path}: the scenes so far make {planned:,} tiles, more than {max_tiles():,} per "
                                 f"job; tile fewer scenes at a time, use a larger tile size, or raise ${MAX_TILES_ENV}")
            check_pixel_data(src, path)
            scale = Scale() if bands.palette else read_pixels(path, lambda: scene_scale(src, bands.indexes, stretch))
        scenes.append(SceneReading(
            source=path, key=entry.key, bands=bands, scale=scale, resampling=config.resampling,
            width=info.width, height=info.height, dtype=info.dtypes[bands.indexes[0] - 1],
            all_valid=info.all_valid and not info.is_float, crs=info.crs,
            transform=info.transform, info=info, grid=grid,
            url=entry.url if entry.url != path else None, item=entry.item,
        ))
    return scenes


def scene_records(scene: SceneReading) -> Iterator[TileRecord]:
    """All tiles of a scene's grid as records (valid fraction not yet measured)."""
    grid = scene.grid
    assert grid is not None, "scene was not prepared with a grid"
    for row, col, win in grid.windows():
        yield TileRecord(
            tile_id=TILE_ID_FORMAT.format(key=scene.key, row=row, col=col), source=scene.source, row=row, col=col,
            x_off=int(win.col_off), y_off=int(win.row_off), width=int(win.width), height=int(win.height),
            out_width=grid.out_size[0], out_height=grid.out_size[1], gsd=grid.gsd_m,
        )


def plan_tiles(
    scenes: Sequence[SceneReading],
    reader: TileReader,
    min_valid: float = DEFAULT_MIN_VALID,
    on_tile: Callable[[int], None] | None = None,
    rows: tuple[int, int] | None = None,
) -> Iterator[TileRecord]:
    """Stream the records of every tile whose valid fraction reaches ``min_valid``.

    ``on_tile(1)`` is called for every grid cell examined (kept or skipped), for progress;
    ``rows``: only the grid rows ``[first, last)`` (a block of a large scene).
    """
    for scene in scenes:
        for rec in scene_records(scene):
            if rows is not None and not rows[0] <= rec.row < rows[1]:
                continue
            rec.valid_fraction = round(reader.valid_fraction(rec), 6)
            if on_tile:
                on_tile(1)
            if rec.valid_fraction > 0 and rec.valid_fraction >= min_valid:
                yield rec


def output_crs(scenes: Sequence[SceneReading], requested: str | None) -> str | None:
    """The layer's CRS: the requested one, else the scenes' when they share one, else EPSG:4326
    (scenes in several UTM zones: no zone distorts the others' footprints; a warning says so);
    None for pixel-space layers."""
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
    if requested:
        return requested

    return suited_crs(s.crs for s in with_crs if s.crs)


def records_to_frame(records: Sequence[TileRecord], scenes: Sequence[SceneReading], crs: str | None):
    """A GeoDataFrame of tile records with footprint polygons in ``crs``."""
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
    if any(s.url or s.item for s in scenes):  # scenes found by URL or in a STAC catalog: say where
        found = {s.source: (s.url or s.source, s.item) for s in scenes}
        frame[SOURCE_URL] = frame[SOURCE].map(lambda src: found[src][0]).astype(object)
        frame[STAC_ITEM] = frame[SOURCE].map(lambda src: found[src][1]).astype(object)
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(polys, crs=crs), crs=crs)


def tile_rasters(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    config: TileConfig | None = None,
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
    total = sum(len(s.grid) for s in scenes if s.grid is not None)
    if progress is not None:
        progress.start("tile", total)
    with TileReader(scenes) as reader:
        advance = progress.advance if progress is not None else None
        records = list(plan_tiles(scenes, reader, config.min_valid, on_tile=advance))
    return records_to_frame(records, scenes, crs), scenes


@dataclass
class TilingReport:
    """What :func:`tile_to_layer` did: the new tiles, the layer as written, the scenes, and how
    many grid cells were examined (kept or skipped)."""

    tiles: Any
    written: Any  # the TileLayer as written, ready for the next step
    scenes: list
    examined: int

    @property
    def layer(self) -> Any:
        """The layer as written (GeoDataFrame)."""
        return self.written.frame


def tile_to_layer(inputs: str | os.PathLike | Sequence[str | os.PathLike], output: str | os.PathLike,
                  config: TileConfig | None = None, progress: Any = None) -> TilingReport:
    """Tile rasters into the tile layer ``output`` (created, or updated scene by scene) with a run
    record holding the tiling and every scene's reading."""
    config = (config or TileConfig()).validated()
    check_writable(output)
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    tiles, scenes = tile_rasters(items, config, progress=progress)
    params = {"tiling": config.as_dict(), "scenes": [s.as_dict() for s in scenes]}
    written = write_layer(output, tiles, new_run("tile", "tiles", params), replace_sources=[s.source for s in scenes])
    return TilingReport(tiles, written, scenes, sum(len(s.grid) for s in scenes if s.grid is not None))
