"""Tile footprints: pixel windows to polygons through the affine transform, optionally reprojected.

Corners go through the full affine transform, so rotated and sheared rasters give the true
quadrilateral. When reprojecting, every edge is densified so curved edges stay accurate.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from affine import Affine
from pyproj import Transformer

DENSIFY = 8  # points per edge when reprojecting


def _ring_fractions(densify: int) -> np.ndarray:
    """Unit-square ring (x, y) walked corner to corner, ``densify`` steps per edge, closed."""
    t = np.linspace(0.0, 1.0, densify, endpoint=False)
    one, zero = np.ones_like(t), np.zeros_like(t)
    xs = np.concatenate([t, one, 1 - t, zero, [0.0]])
    ys = np.concatenate([zero, t, one, 1 - t, [0.0]])
    return np.stack([xs, ys], axis=1)


def window_polygons(
    windows: Sequence[tuple[int, int, int, int]],
    transform: Affine,
    src_crs: str | None = None,
    dst_crs: str | None = None,
) -> np.ndarray:
    """Polygons for pixel windows ``(col_off, row_off, width, height)``, as a shapely array.

    Without reprojection each polygon has exactly the four transformed corners. With
    ``dst_crs`` differing from ``src_crs`` the ring is densified and transformed by pyproj.
    """
    if len(windows) == 0:
        return np.empty(0, dtype=object)
    wins = np.asarray(windows, dtype=np.float64)
    reproject = dst_crs is not None and src_crs is not None and dst_crs != src_crs
    ring = _ring_fractions(DENSIFY if reproject else 1)
    cols = wins[:, None, 0] + ring[None, :, 0] * wins[:, None, 2]
    rows = wins[:, None, 1] + ring[None, :, 1] * wins[:, None, 3]
    t = transform
    xs = t.a * cols + t.b * rows + t.c
    ys = t.d * cols + t.e * rows + t.f
    if reproject:
        transformer = Transformer.from_crs(src_crs, dst_crs, always_xy=True)
        xs, ys = transformer.transform(xs.ravel(), ys.ravel())
        xs, ys = np.asarray(xs).reshape(cols.shape), np.asarray(ys).reshape(cols.shape)
    coords = np.stack([xs, ys], axis=-1)
    return shapely.polygons(coords)
