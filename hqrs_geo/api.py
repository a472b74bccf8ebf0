"""The Python API: each job as one function returning the tile layer as a GeoDataFrame.

    import hqrs_geo as hg
    tiles = hg.run("scene.tif", "tiles.gpkg", embed_models=["remoteclip-vit-b-32"], caption_model="rs-coca")

Inputs are rasters (tiled first) or one existing tile layer (updated in place, or copied to
``output`` first when given). Rasters may be named by paths, globs, folders, lists, URLs and STAC
documents (:mod:`hqrs_geo.raster.catalog`; ``source_filter`` picks the STAC asset and filters
items). An ``output`` folder (a name ending in ``/`` or without extension) is a partitioned
dataset (:mod:`hqrs_geo.layer.dataset`) made by the partitioned engine, in this process or on a
Ray cluster (``scale=ScaleOptions(engine="ray")``, :mod:`hqrs_geo.engine.partitioned`): those
calls return a :class:`~hqrs_geo.engine.partitioned.DatasetReport` instead of the tiles.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .engine.jobs import model_job, model_plan, tile_job
from .engine.options import RunOptions
from .engine.partitioned import ScaleOptions
from .raster.catalog import SourceFilter
from .tiling.config import TileConfig
from .tiling.inputs import Rasters, as_list, resolve_input

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]


def tile(inputs: PathOrPaths, output: str | os.PathLike, config: TileConfig | None = None,
         progress: Any = None, source_filter: SourceFilter | None = None, scale: ScaleOptions | None = None,
         like: str | os.PathLike | None = None) -> Any:
    """Tile rasters into the layer ``output``; returns the layer as written (GeoDataFrame), or
    for a dataset folder ``output`` the :class:`~hqrs_geo.engine.partitioned.DatasetReport`.

    ``like``: a tile layer (an earlier date) whose grid the tiles follow: same tile ids and
    footprints, read from ``inputs`` resampled onto its scenes' pixel grids
    (:func:`hqrs_geo.tiling.coregister.tile_like`); a dataset ``like`` makes a dataset ``output``
    (its new tiles are returned without footprints)."""
    return tile_job(Rasters(as_list(inputs), source_filter), output, config, progress, scale, like)


def run(
    inputs: PathOrPaths,
    output: str | os.PathLike | None = None,
    embed_models: Sequence[str] = (),
    caption_model: str | None = None,
    embed_checkpoints: Sequence[str | None] = (),
    embed_arch: Sequence[str | None] = (),
    caption_checkpoint: str | None = None,
    caption_arch: str | None = None,
    decoding: Any = None,
    device: str = "auto",
    trust_checkpoint: bool = False,
    tiling: TileConfig | None = None,
    options: RunOptions | None = None,
    progress: Any = None,
    command: str = "run",
    source_filter: Any = None,
    scale: Any = None,
) -> Any:
    """Tile (when rasters are given), embed with every ``embed_models`` and caption with
    ``caption_model``, in one pass over the tiles. Returns the updated layer (GeoDataFrame), or
    for a dataset folder ``output`` (``scale``: :class:`~hqrs_geo.engine.partitioned.ScaleOptions`,
    e.g. the Ray engine) the :class:`~hqrs_geo.engine.partitioned.DatasetReport`; a dataset given
    as input is updated in place, part by part, and its tiles are returned.

    With no model named, the defaults are used (``$HQRS_GEO_EMBED_MODEL`` /
    ``$HQRS_GEO_CAPTION_MODEL``, else the shipped demo models hqrs-mini-clip / hqrs-mini-coca):
    the embedding model for ``command="embed"``, the caption model for ``"caption"``, both for ``"run"``.
    """
    plan = model_plan(command, embed_models, caption_model, embed_checkpoints, embed_arch, caption_checkpoint,
                      caption_arch, decoding, device, trust_checkpoint)
    source = resolve_input(inputs, source_filter)
    return model_job(source, output, plan, tiling, options, progress, scale, command)


def embed(inputs: PathOrPaths, output: str | os.PathLike | None = None,
          model: str | Sequence[str] = (), checkpoint: Any = None, arch: Any = None, **kw: Any) -> Any:
    """Image embeddings of every tile with one or more models (see :func:`run`)."""
    models = [model] if isinstance(model, str) else list(model)
    checkpoints = [str(checkpoint)] if isinstance(checkpoint, (str, os.PathLike)) else \
        [str(c) if c is not None else None for c in (checkpoint or [])]
    arches = [arch] if isinstance(arch, str) else list(arch or [])
    return run(inputs, output, embed_models=models, embed_checkpoints=checkpoints, embed_arch=arches,
               command="embed", **kw)


def caption(inputs: PathOrPaths, output: str | os.PathLike | None = None, model: str | None = None,
            checkpoint: str | None = None, arch: str | None = None, **kw: Any) -> Any:
    """Captions of every tile with a CoCa model (see :func:`run`)."""
    return run(inputs, output, caption_model=model, caption_checkpoint=checkpoint, caption_arch=arch,
               command="caption", **kw)
