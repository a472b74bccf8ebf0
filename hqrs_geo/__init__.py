"""hqrs_geo: remote-sensing vision-language models (HQRS-CLIP, RS-CoCa, MpGI) on georeferenced tiles."""
from __future__ import annotations

__version__ = "0.1.0"

from .dataset import TileDataset, collate_tiles
from .errors import HqrsError
from .layers import read_runs, read_tiles, write_tiles
from .tiling import TileConfig, TileReader, TileRecord, tile_rasters

__all__ = [
    "__version__", "HqrsError", "TileConfig", "TileDataset", "TileReader", "TileRecord",
    "collate_tiles", "read_runs", "read_tiles", "tile_rasters", "write_tiles",
]
