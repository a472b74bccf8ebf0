"""Coordinate reference systems and boxes of tile layers: comparing CRS, the short text a
manifest stores, checking a box filter before any work, and a box moved into another CRS.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError

from ..errors import OptionError


def parse_crs(value: Any, option: str) -> CRS:
    """A pyproj CRS from user input; a one-line :class:`OptionError` naming ``option`` otherwise."""
    try:
        return CRS.from_user_input(value)
    except (CRSError, TypeError, ValueError):
        raise OptionError(f"{str(value)[:60]!r} is not a CRS; use e.g. EPSG:4326", option=option) from None


def validate_box(bbox: Sequence[float] | None, bbox_crs: str | None = None) -> None:
    """Check a box filter before any work: ``bbox`` is four finite numbers ``minx, miny, maxx,
    maxy`` with min < max, ``bbox_crs`` a CRS pyproj knows and given only with a box (one-line
    :class:`OptionError` otherwise)."""
    if bbox_crs is not None:
        if bbox is None:
            raise OptionError("a CRS for the box was given without a box: add «bbox», or leave «bbox_crs» out",
                              option="bbox_crs")
        parse_crs(bbox_crs, "bbox_crs")
    if bbox is None:
        return
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4 or not all(np.isfinite(values)) or not (values[0] < values[2] and values[1] < values[3]):
        raise OptionError(f"{list(bbox) if isinstance(bbox, (list, tuple)) else bbox!r} is not a box; use "
                          "minx,miny,maxx,maxy with min < max", option="bbox")


def crs_text(value: Any) -> str | None:
    """A CRS (pyproj, PROJJSON, text) as the short text a manifest stores (``EPSG:3857``)."""
    if value is None:
        return None
    crs = CRS.from_user_input(value)
    found = crs.to_authority()
    return f"{found[0]}:{found[1]}" if found else crs.to_wkt()


def same_crs(a: Any, b: Any) -> bool:
    """True when two CRS (any form pyproj reads; None: none) are the same."""
    if a is None or b is None:
        return a is None and b is None
    return bool(CRS.from_user_input(a).equals(CRS.from_user_input(b), ignore_axis_order=True))


def box_in(bbox: Sequence[float], bbox_crs: Any, crs: Any) -> tuple[float, ...]:
    """``bbox`` (in ``bbox_crs``; None: already in ``crs``) as bounds in ``crs`` (None: kept as given)."""
    if bbox_crs is None or crs is None or same_crs(bbox_crs, crs):
        return tuple(float(v) for v in bbox)
    transformer = Transformer.from_crs(bbox_crs, crs, always_xy=True)
    return tuple(float(v) for v in transformer.transform_bounds(bbox[0], bbox[1], bbox[2], bbox[3], densify_pts=21))


__all__ = ["box_in", "crs_text", "parse_crs", "same_crs", "validate_box"]
