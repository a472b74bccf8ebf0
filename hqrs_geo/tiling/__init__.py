"""Tiling: which pixel windows of a scene become tiles, their footprints, and reading their pixels.

The flow: :mod:`.config` (the user's choices) -> :mod:`hqrs_geo.raster.grid` (windows, no pixels read) ->
:mod:`.plan` (scenes prepared once, valid fractions, records, footprints from
:mod:`.footprints`) -> :mod:`.reader` (pixels of one tile) -> :mod:`.dataset` (a map-style
dataset for DataLoaders) and :mod:`.chips` (tiles as image files).
"""
from ..raster.reading import SceneReading
from .config import TileConfig
from .dataset import TileDataset, collate_tiles
from .plan import tile_rasters
from .reader import TileReader
from .records import TileRecord

__all__ = ["SceneReading", "TileConfig", "TileDataset", "TileReader", "TileRecord", "collate_tiles", "tile_rasters"]
