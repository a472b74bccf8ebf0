"""Tile grids: which pixel windows of a scene become tiles (no pixels are read here).

A grid is defined in the scene's native pixels, so tiles are always aligned to the pixel
grid; a target ground resolution only changes how many output pixels a window is read into.
Windows are produced lazily (row-major), so a grid over a huge scene costs no memory.

Limits, whatever a raster declares (a 139-byte file can declare 1,000,000 x 1,000,000 px):

* at most :func:`max_tiles` tiles per job (default 500,000; ``$HQRS_GEO_MAX_TILES`` changes
  it): the count is computed before any tile exists, and a larger grid is refused;
* a tile at most :data:`MAX_TILE_SIDE` output pixels a side;
* a target ground resolution at most :data:`MAX_UPSAMPLING` times finer than the raster's.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

from rasterio.windows import Window

from ..errors import InputError, OptionError
from .scene import SceneInfo
from .units import Length, parse_length

EDGE_POLICIES = ("shift", "pad", "drop")
DEFAULT_EDGE = "shift"
DEFAULT_MAX_TILES = 500_000  # about 1.4 GB of tile records and footprints
MAX_TILES_ENV = "HQRS_GEO_MAX_TILES"
#: Largest tile side in output pixels (a 16384 x 16384 RGB tile is 768 MB).
MAX_TILE_SIDE = 16384
#: Largest upsampling factor of a target ground resolution (native pixel size / gsd).
MAX_UPSAMPLING = 16.0


def max_tiles() -> int:
    """The most tiles one job may plan: ``$HQRS_GEO_MAX_TILES`` or 500,000."""
    try:
        value = int(os.environ.get(MAX_TILES_ENV, DEFAULT_MAX_TILES))
    except ValueError:
        raise OptionError(f"${MAX_TILES_ENV} must be a whole number of tiles, not "
                          f"{os.environ.get(MAX_TILES_ENV)!r}; fix or unset it") from None
    return max(1, value)


def axis_count(size: int, window: int, stride: int, edge: str) -> int:
    """How many windows :func:`axis_offsets` yields along one axis (computed, not listed)."""
    if window > size:
        return 1 if edge == "pad" else 0
    count = (size - window) // stride + 1
    last = (count - 1) * stride
    if last + window < size and edge in ("shift", "pad"):
        count += 1
    return count


def axis_offsets(size: int, window: int, stride: int, edge: str) -> list[int]:
    """Window start offsets along one axis of ``size`` pixels.

    ``shift``: regular steps, then a last window shifted inward to end exactly at the edge;
    ``pad``: regular steps until the edge is covered (the last window may run past it);
    ``drop``: regular steps that fit entirely.
    """
    if edge not in EDGE_POLICIES:
        raise OptionError(f"{edge!r} is not an edge policy; use one of {', '.join(EDGE_POLICIES)}", option="edge")
    if window > size:
        return [0] if edge == "pad" else []
    offsets = list(range(0, size - window + 1, stride))
    if offsets[-1] + window < size:
        if edge == "shift":
            offsets.append(size - window)
        elif edge == "pad":
            offsets.append(offsets[-1] + stride)
    return offsets


@dataclass(frozen=True)
class SceneGrid:
    """The tile windows of one scene: sizes in native pixels, output size in tile pixels."""

    width: int
    height: int
    window: tuple[int, int]
    stride: tuple[int, int]
    out_size: tuple[int, int]
    col_offsets: tuple[int, ...]
    row_offsets: tuple[int, ...]
    gsd_m: float | None

    def __len__(self) -> int:
        return len(self.col_offsets) * len(self.row_offsets)

    def windows(self) -> Iterator[tuple[int, int, Window]]:
        """Yield ``(row, col, Window)`` in row-major order."""
        w, h = self.window
        for row, y in enumerate(self.row_offsets):
            for col, x in enumerate(self.col_offsets):
                yield row, col, Window(x, y, w, h)


def _native_pixels(length: Length, pixel_m: float | None, scale: float, what: str, path: str) -> float:
    """A length in native pixels; ``scale`` is native pixels per output pixel."""
    if length.unit == "px":
        return length.value * scale
    if pixel_m is None:
        raise InputError(f"{path}: has no CRS, so {what} {length} cannot be used; give it in pixels")
    return length.value / pixel_m


def plan_grid(
    info: SceneInfo,
    tile_size: Length,
    overlap: Length,
    gsd: float | None,
    edge: str,
) -> SceneGrid:
    """Compute the tile grid of a scene; raises a one-line error when the tile cannot fit."""
    if gsd is not None and info.pixel_size_m is None:
        raise InputError(f"{info.path}: has no CRS, so a target ground resolution cannot be applied; leave it out",
                         option="gsd")
    if gsd is not None and (not math.isfinite(gsd) or gsd <= 0):
        raise OptionError(f"{gsd!r} is not a ground resolution; give a positive number of metres", option="gsd")
    if gsd is not None and info.pixel_size_m is not None:
        finest = min(info.pixel_size_m)
        if finest / gsd > MAX_UPSAMPLING:
            raise OptionError(
                f"{gsd:g} m is {finest / gsd:.3g} times finer than the pixels of {info.path} ({finest:.4g} m); "
                f"at most {MAX_UPSAMPLING:g} times finer is allowed: give a coarser resolution", option="gsd")
    res_m: tuple[float | None, float | None] = info.pixel_size_m or (None, None)
    scale = [1.0, 1.0] if gsd is None or info.pixel_size_m is None else \
        [gsd / info.pixel_size_m[0], gsd / info.pixel_size_m[1]]
    window, out, stride = [], [], []
    for axis in (0, 1):
        native = _native_pixels(tile_size, res_m[axis], scale[axis], "tile size", info.path)
        if tile_size.unit != "px" and native < 1:
            raise OptionError(f"a tile of {tile_size} is smaller than one pixel of {info.path} "
                              f"({res_m[axis]:.4g} m); give a larger tile size", option="tile_size")
        win = max(1, round(native))
        out_px = tile_size.value if tile_size.unit == "px" else max(1, round(win / scale[axis]))
        if overlap.unit == "%":
            ov = round(win * overlap.value / 100.0)
        else:
            ov = round(_native_pixels(overlap, res_m[axis], scale[axis], "overlap", info.path))
        if ov >= win:
            raise OptionError(f"{overlap} is not smaller than the tile size {tile_size}; give a smaller overlap",
                              option="overlap")
        if out_px > MAX_TILE_SIDE:
            raise OptionError(f"a tile of {int(out_px)} px a side is larger than {MAX_TILE_SIDE} px; give a smaller "
                              "tile size (or a coarser «gsd»)", option="tile_size")
        window.append(win)
        out.append(int(out_px))
        stride.append(win - ov)
    if (window[0] > info.width or window[1] > info.height) and edge != "pad":
        raise InputError(
            f"{info.path}: tile of {window[0]}x{window[1]} px is larger than the raster "
            f"({info.width}x{info.height} px); use a smaller tile size, or pad the edges («edge» pad)"
        )
    count = axis_count(info.width, window[0], stride[0], edge) * axis_count(info.height, window[1], stride[1], edge)
    limit = max_tiles()
    if count > limit:
        raise InputError(
            f"{info.path}: {info.width} x {info.height} px in tiles of {window[0]} x {window[1]} px makes "
            f"{count:,} tiles, more than {limit:,} per job; use a larger tile size, tile a part of the raster "
            f"(gdal_translate -srcwin), or raise ${MAX_TILES_ENV}")
    cols = axis_offsets(info.width, window[0], stride[0], edge)
    rows = axis_offsets(info.height, window[1], stride[1], edge)
    gsd_m = None
    if info.pixel_size_m is not None:
        px, py = info.pixel_size_m
        gsd_m = math.sqrt(window[0] * px / out[0] * window[1] * py / out[1])
    return SceneGrid(
        width=info.width,
        height=info.height,
        window=(window[0], window[1]),
        stride=(stride[0], stride[1]),
        out_size=(out[0], out[1]),
        col_offsets=tuple(cols),
        row_offsets=tuple(rows),
        gsd_m=gsd_m,
    )


def parse_tile_lengths(tile_size, overlap) -> tuple[Length, Length]:
    """Validate the tile size and overlap options."""
    size = parse_length(tile_size, "tile size", option="tile_size")
    if size.value <= 0:
        raise OptionError(f"{tile_size!r} is not a tile size; give a positive size such as 256 or 64m",
                          option="tile_size")
    return size, parse_length(overlap, "overlap", allow_percent=True, option="overlap")
