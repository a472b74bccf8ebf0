"""Reading tile pixels: :class:`TileReader` turns a :class:`~hqrs_geo.tiling.records.TileRecord`
into an ``(H, W, 3)`` uint8 RGB array and a validity mask, with the scene's one stretch."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.windows import Window

from ..errors import InputError
from ..raster.network import NetworkTimeout, busy
from ..raster.reading import SceneReading
from ..raster.scene import failure_reason, network_error, open_dataset, read_pixels
from ..raster.sources import is_network
from .records import TileRecord

T = TypeVar("T")


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
        """Close every raster this process opened (a network raster whose read is still under way,
        abandoned past its deadline or by Ctrl-C, is left to that read: it closes when it ends)."""
        for source, src in self._open.items():
            if not (is_network(source) and busy(source)):
                src.close()
        self._open.clear()

    def __enter__(self) -> TileReader:
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
            try:
                src = open_dataset(source)
            except RasterioError as exc:
                network = network_error(source, exc)
                if network is not None:
                    raise network from None
                raise InputError(f"{source}: cannot open ({failure_reason(source, exc)}); was it moved?") from None
            self._open[source] = src
        return src

    def _pixels(self, source: str, read: Callable[[], T]) -> T:
        """``read()`` through :func:`~hqrs_geo.raster.scene.read_pixels`; a network read past its
        deadline leaves its dataset to the abandoned read (the next read opens a fresh one)."""
        try:
            return read_pixels(source, read)
        except NetworkTimeout:
            self._open.pop(source, None)
            raise

    @staticmethod
    def _placement(rec: TileRecord, scene: SceneReading) -> tuple[Window, tuple[slice, slice]] | None:
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
        valid = self._pixels(rec.source, lambda: self._read_valid(src, scene, inner, shape))
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

        data, ok = self._pixels(rec.source, read_block)
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
