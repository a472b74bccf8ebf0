"""Pairing the tiles of two dates: each BEFORE tile with the AFTER tile of the same footprint.

Layers made with :func:`hqrs_geo.tiling.coregister.tile_like` share their tiles' footprints
exactly (and their ids); layers tiled on their own grids pair where a footprint of one matches a
footprint of the other within :data:`TOLERANCE` of the tile's side. Ids alone never pair two
tiles: two scenes tiled separately may give different places the same id (``scene_r0000_c0000``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely

from ..layer.columns import TILE_ID
from ..layer.dataset import same_crs

#: Largest difference between two footprints' bounds, as a share of the tile's side, that pairs them.
TOLERANCE = 0.01


@dataclass
class Pairing:
    """For every BEFORE row the AFTER row of the same footprint (``-1``: none)."""

    after_row: np.ndarray  # (n_before,) int64

    @property
    def paired(self) -> np.ndarray:
        """Rows of BEFORE that found a partner."""
        return self.after_row >= 0


def footprints_in(frame: Any, crs: Any) -> Any:
    """The footprints of ``frame`` in ``crs`` (as they are when either has no CRS)."""
    if crs is None or frame.crs is None or same_crs(frame.crs, crs):
        return frame.geometry.values
    return frame.geometry.to_crs(crs).values


def pair_tiles(before: Any, after: Any, tolerance: float = TOLERANCE) -> Pairing:
    """Pair the tiles of ``before`` with those of ``after`` (GeoDataFrames; ``after`` is
    reprojected to ``before``'s CRS when they differ): a pair is two footprints whose bounds
    differ by at most ``tolerance`` x the BEFORE tile's shorter side; of several candidates the
    one with the same ``tile_id``, then the closest, wins."""
    n = len(before)
    out = np.full(n, -1, dtype=np.int64)
    if n == 0 or len(after) == 0:
        return Pairing(out)
    a_geoms = footprints_in(after, before.crs)
    b_bounds = shapely.bounds(before.geometry.values)
    a_bounds = shapely.bounds(a_geoms)
    side = np.minimum(b_bounds[:, 2] - b_bounds[:, 0], b_bounds[:, 3] - b_bounds[:, 1])
    tol = tolerance * np.where(np.isfinite(side) & (side > 0), side, 0.0)
    tree = shapely.STRtree(a_geoms)
    centres = shapely.points((b_bounds[:, 0] + b_bounds[:, 2]) / 2, (b_bounds[:, 1] + b_bounds[:, 3]) / 2)
    bi, ai = tree.query(centres, predicate="intersects")
    if len(bi) == 0:
        return Pairing(out)
    gap = np.abs(b_bounds[bi] - a_bounds[ai]).max(axis=1)
    ok = gap <= tol[bi] + 1e-12 * np.abs(b_bounds[bi]).max(axis=1)
    bi, ai, gap = bi[ok], ai[ok], gap[ok]
    b_ids = before[TILE_ID].astype(str).to_numpy()
    a_ids = after[TILE_ID].astype(str).to_numpy()
    other = (b_ids[bi] != a_ids[ai]).astype(np.int8)
    order = np.lexsort((ai, gap, other, bi))  # per BEFORE row: same id first, then the closest
    bi, ai = bi[order], ai[order]
    first = np.ones(len(bi), dtype=bool)
    first[1:] = bi[1:] != bi[:-1]
    out[bi[first]] = ai[first]
    return Pairing(out)


__all__ = ["TOLERANCE", "Pairing", "footprints_in", "pair_tiles"]
