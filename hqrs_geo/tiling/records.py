"""What a tile is (:class:`TileRecord`): where it is in its scene and how it is read.

Small and picklable; how the tile's scene is read is a
:class:`~hqrs_geo.raster.reading.SceneReading`.
"""
from __future__ import annotations

from dataclasses import dataclass

from rasterio.windows import Window

TILE_ID_FORMAT = "{key}_r{row:04d}_c{col:04d}"


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
    gsd: float | None = None

    @property
    def window(self) -> Window:
        """The tile's pixel window in its scene (may run past the edge with ``edge='pad'``)."""
        return Window(self.x_off, self.y_off, self.width, self.height)
