"""Tile grids: which pixel windows of a scene become tiles (no pixels are read here).

A grid is defined in the scene's native pixels, so tiles are always aligned to the pixel
grid; a target ground resolution only changes how many output pixels a window is read into.
Windows are produced lazily (row-major), so a grid over a huge scene costs no memory.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from rasterio.windows import Window

from ..errors import InputError, OptionError
from ..raster.scene import SceneInfo
from ..raster.units import Length, parse_length

EDGE_POLICIES = ("shift", "pad", "drop")
DEFAULT_EDGE = "shift"


def axis_offsets(size: int, window: int, stride: int, edge: str) -> list[int]:
    """Window start offsets along one axis of ``size`` pixels.

    ``shift``: regular steps, then a last window shifted inward to end exactly at the edge;
    ``pad``: regular steps until the edge is covered (the last window may run past it);
    ``drop``: regular steps that fit entirely.
    """
    if edge not in EDGE_POLICIES:
        raise OptionError(f"invalid edge policy {edge!r}: use one of {', '.join(EDGE_POLICIES)}")
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
    if gsd is not None and gsd <= 0:
        raise OptionError(f"invalid ground resolution {gsd}: must be a positive number of metres", option="gsd")
    res_m: tuple[float | None, float | None] = info.pixel_size_m or (None, None)
    scale = [1.0, 1.0] if gsd is None or info.pixel_size_m is None else \
        [gsd / info.pixel_size_m[0], gsd / info.pixel_size_m[1]]
    window, out, stride = [], [], []
    for axis in (0, 1):
        native = _native_pixels(tile_size, res_m[axis], scale[axis], "tile size", info.path)
        win = max(1, round(native))
        out_px = tile_size.value if tile_size.unit == "px" else max(1, round(win / scale[axis]))
        if overlap.unit == "%":
            ov = round(win * overlap.value / 100.0)
        else:
            ov = round(_native_pixels(overlap, res_m[axis], scale[axis], "overlap", info.path))
        if ov >= win:
            raise OptionError(f"overlap {overlap} is not smaller than the tile size {tile_size}")
        window.append(win)
        out.append(int(out_px))
        stride.append(win - ov)
    if (window[0] > info.width or window[1] > info.height) and edge != "pad":
        raise InputError(
            f"{info.path}: tile of {window[0]}x{window[1]} px is larger than the raster "
            f"({info.width}x{info.height} px); use a smaller tile size, or pad the edges («edge» pad)"
        )
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
    size = parse_length(tile_size, "tile size")
    if size.value <= 0:
        raise OptionError(f"invalid tile size {tile_size!r}: must be positive")
    return size, parse_length(overlap, "overlap", allow_percent=True)
