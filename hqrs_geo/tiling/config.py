"""The user's tiling choices (:class:`TileConfig`), validated in one place."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from pyproj import CRS
from pyproj.exceptions import CRSError
from rasterio.enums import Resampling

from ..errors import OptionError
from ..raster.grid import DEFAULT_EDGE, EDGE_POLICIES, parse_tile_lengths
from ..raster.stretch import StretchSpec

DEFAULT_MIN_VALID = 0.5


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
    crs: output CRS of the footprints (default: the scenes' CRS when they share one, else EPSG:4326).
    resampling: GDAL resampling used when a target ``gsd`` changes the resolution.
    """

    tile_size: int | str = 256
    overlap: int | str = 0
    gsd: float | None = None
    edge: str = DEFAULT_EDGE
    min_valid: float = DEFAULT_MIN_VALID
    bands: tuple[int, ...] | None = None
    stretch: str | StretchSpec = "auto"
    crs: str | None = None
    resampling: str = "bilinear"

    def validated(self) -> TileConfig:
        """Return a copy with every option checked (raises :class:`OptionError`)."""
        parse_tile_lengths(self.tile_size, self.overlap)
        if self.edge not in EDGE_POLICIES:
            raise OptionError(f"{self.edge!r} is not an edge policy; use one of {', '.join(EDGE_POLICIES)}",
                              option="edge")
        if not _number(self.min_valid) or not 0.0 <= self.min_valid <= 1.0:
            raise OptionError(f"{self.min_valid!r} is not a fraction; use a value in 0..1", option="min_valid")
        if self.gsd is not None and (not _number(self.gsd) or not math.isfinite(self.gsd) or self.gsd <= 0):
            raise OptionError(f"{self.gsd!r} is not a ground resolution; give a positive number of metres",
                              option="gsd")
        try:
            Resampling[str(self.resampling)]
        except KeyError:
            names = ", ".join(r.name for r in Resampling if r.value < 8)
            raise OptionError(f"{self.resampling!r} is not a resampling method; use one of {names}",
                              option="resampling") from None
        if self.crs is not None:
            try:
                CRS.from_user_input(self.crs)
            except (CRSError, TypeError, ValueError):
                raise OptionError(f"{str(self.crs)[:60]!r} is not a CRS; use e.g. EPSG:4326", option="crs") from None
        stretch = StretchSpec.parse(self.stretch)
        bands = tuple(int(b) for b in self.bands) if self.bands else None
        return replace(self, stretch=str(stretch), bands=bands)

    def as_dict(self) -> dict:
        """JSON-friendly parameters (kept in the layer's run metadata)."""
        d = asdict(self)
        d["stretch"] = str(StretchSpec.parse(self.stretch))
        return d


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
