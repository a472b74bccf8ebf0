"""hqrs_geo: remote-sensing vision-language models (HQRS-CLIP, RS-CoCa, MpGI) on georeferenced tiles."""
from __future__ import annotations

__version__ = "0.1.0"

from .dataset import TileDataset, collate_tiles
from .embeddings import read_embeddings
from .errors import HqrsError
from .layers import read_runs, read_tiles, write_tiles
from .tiling import TileConfig, TileReader, TileRecord, tile_rasters

__all__ = [
    "__version__", "DecodingConfig", "FinetuneConfig", "HqrsError", "RunOptions", "SearchSession", "SpatialFilter",
    "TileConfig", "TileDataset", "TileReader", "TileRecord", "caption", "classify", "collate_tiles", "embed",
    "export_dataset", "finetune", "load_model", "load_recipe", "read_embeddings", "read_runs", "read_tiles", "run",
    "run_mpgi", "search_similar", "search_text", "tile", "tile_rasters", "write_tiles",
]


def __getattr__(name: str):
    """Model-engine names are imported on first use (they pull in torch)."""
    if name in ("embed", "caption", "run", "tile"):
        from . import api

        return getattr(api, name)
    if name == "RunOptions":
        from .inference import RunOptions

        return RunOptions
    if name == "DecodingConfig":
        from .models.decoding import DecodingConfig

        return DecodingConfig
    if name in ("search_text", "search_similar", "classify"):
        from .search import api as search_api

        return getattr(search_api, name)
    if name == "SearchSession":
        from .search.session import SearchSession

        return SearchSession
    if name == "SpatialFilter":
        from .search.spatial import SpatialFilter

        return SpatialFilter
    if name == "load_model":
        from .models.loader import load_model

        return load_model
    if name in ("finetune", "FinetuneConfig"):
        from . import training

        return getattr(training, name)
    if name in ("run_mpgi", "export_dataset", "load_recipe"):
        from .mpgi import export, pipeline, recipe

        return {"run_mpgi": pipeline.run_mpgi, "export_dataset": export.export_dataset,
                "load_recipe": recipe.load_recipe}[name]
    raise AttributeError(f"module 'hqrs_geo' has no attribute {name!r}")
