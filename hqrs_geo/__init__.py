"""hqrs_geo: remote-sensing vision-language models (HQRS-CLIP, RS-CoCa, MpGI) on georeferenced tiles.

The data flow, one subpackage per step: :mod:`.raster` (scenes) -> :mod:`.tiling` (tiles and
their pixels) -> :mod:`.engine` (batches through :mod:`.models`) -> :mod:`.layer` (results as
attributes of tile layers) -> :mod:`.search`; :mod:`.compare` scores the change between two dates,
:mod:`.mpgi` makes rich captions, :mod:`.training` and :mod:`.evaluation` make and measure
models, :mod:`.cli` is the command line.

Names that need torch (the model engine, search, training) are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .errors import HqrsError, InputError, OptionError, OutputError
from .layer.columns import read_embeddings
from .layer.io import open_layer, read_runs, read_tiles, write_tiles
from .tiling.config import TileConfig
from .tiling.dataset import TileDataset, collate_tiles
from .tiling.plan import tile_rasters
from .tiling.reader import TileReader
from .tiling.records import TileRecord

_LAZY = {
    "tile": ".api", "run": ".api", "embed": ".api", "caption": ".api",
    "RunOptions": ".engine.options",
    "ScaleOptions": ".engine.partitioned", "DatasetReport": ".engine.partitioned",
    "SourceFilter": ".raster.catalog", "merge_dataset": ".layer.dataset",
    "DecodingConfig": ".models.decoding_options",
    "load_model": ".models.loader",
    "search_text": ".search.api", "search_similar": ".search.api", "classify": ".search.api",
    "detect": ".search.api", "change": ".compare",
    "SearchSession": ".search.session",
    "SpatialFilter": ".search.spatial",
    "finetune": ".training", "FinetuneConfig": ".training",
    "run_mpgi": ".mpgi.pipeline", "export_dataset": ".mpgi.export", "load_recipe": ".mpgi.recipe",
}

__all__ = [
    "DatasetReport", "DecodingConfig", "FinetuneConfig", "HqrsError", "InputError", "OptionError", "OutputError",
    "RunOptions", "ScaleOptions", "SearchSession", "SourceFilter", "SpatialFilter", "TileConfig", "TileDataset",
    "TileReader", "TileRecord", "__version__", "caption", "change", "classify", "collate_tiles", "detect", "embed",
    "export_dataset",
    "finetune", "load_model", "load_recipe", "merge_dataset", "open_layer", "read_embeddings", "read_runs",
    "read_tiles", "run", "run_mpgi", "search_similar", "search_text", "tile", "tile_rasters", "write_tiles",
]


def __getattr__(name: str) -> Any:
    """Model-engine names are imported on first use (they pull in torch)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hqrs_geo' has no attribute {name!r}")
