"""Is a raster's pixel data there? A quick check made when a scene is tiled.

Tiling a raster with no nodata or mask reads no pixels, so a truncated or damaged GeoTIFF
would tile "fine" and fail only later (embed, export). :func:`check_pixel_data` finds that out
at tiling time without decoding every block:

* GeoTIFF: every block's offset and byte count (GDAL's ``TIFF`` metadata, no pixels decoded)
  must lie inside the file; rasters with very many blocks have a spread sample checked plus
  all blocks near the end of the file, where a truncation shows;
* any format: a few blocks spread over the raster (corners, centre) are read and decoded, so
  a damaged compressed stream is caught too.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any

from rasterio.windows import Window

from ..errors import InputError
from .scene import read_pixels
from .sources import is_gdal_virtual

#: Most block offsets looked up per band (the first, the last and a spread sample between).
MAX_BLOCKS_CHECKED = 200_000
#: Blocks decoded per scene (all of them for small rasters; else spread evenly, first and last included).
SAMPLE_BLOCKS = 16


def _block_grid(src: Any, band: int) -> tuple[int, int, int, int]:
    by, bx = src.block_shapes[band - 1]
    bx, by = max(1, int(bx)), max(1, int(by))
    return bx, by, -(-src.width // bx), -(-src.height // by)


def _block_indexes(nx: int, ny: int) -> list[int]:
    total = nx * ny
    if total <= MAX_BLOCKS_CHECKED:
        return list(range(total))
    tail = MAX_BLOCKS_CHECKED // 4
    step = max(1, (total - tail) // (MAX_BLOCKS_CHECKED - tail))
    return sorted(set(range(0, total - tail, step)) | set(range(total - tail, total)))


def _tiff_blocks_inside(src: Any, path: str) -> None:
    size = os.path.getsize(path)
    separate = (src.interleaving is not None and src.interleaving.name.lower() == "band") and src.count > 1
    for band in (range(1, src.count + 1) if separate else (1,)):
        bx, by, nx, ny = _block_grid(src, band)
        for index in _block_indexes(nx, ny):
            x, y = index % nx, index // nx
            offset = src.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=band)
            if offset is None:  # GDAL does not expose it (or a sparse block): nothing to check
                continue
            count = src.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=band)
            try:
                start, length = int(offset), int(count or 0)
            except ValueError:
                continue
            if length and (start < 0 or start + length > size):
                raise InputError(
                    f"{path}: block {x},{y} of band {band} lies beyond the end of the file ({size:,} bytes): the "
                    "file is truncated or damaged; copy or download it again")


def _sample_windows(src: Any) -> list[Window]:
    bx, by, nx, ny = _block_grid(src, 1)
    total = nx * ny
    if total <= SAMPLE_BLOCKS:
        picks = list(range(total))
    else:  # evenly spread, first and last block included, offset so rows and columns vary
        picks = sorted({round(i * (total - 1) / (SAMPLE_BLOCKS - 1)) for i in range(SAMPLE_BLOCKS)})
    windows = []
    for index in picks:
        x, y = index % nx, index // nx
        col, row = x * bx, y * by
        windows.append(Window(col, row, min(bx, src.width - col), min(by, src.height - row)))
    return windows


def check_pixel_data(src: Any, path: str) -> None:
    """Raise a one-line :class:`InputError` when ``src`` (an open rasterio dataset of ``path``)
    points at pixel data its file does not hold, or a sample of its blocks cannot be decoded."""
    local = not is_gdal_virtual(path) and os.path.isfile(path)
    if local and src.driver == "GTiff":
        _tiff_blocks_inside(src, path)
    bands = list(range(1, src.count + 1))
    for window in _sample_windows(src):
        # a block as large as the raster (one strip) is only decoded when it is small
        if window.width * window.height * len(bands) > 64_000_000:
            continue
        read_pixels(path, partial(src.read, bands, window=window))


__all__ = ["check_pixel_data"]
