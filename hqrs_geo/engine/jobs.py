"""The jobs below the API, on inputs resolved once at the entry (:mod:`hqrs_geo.tiling.inputs`).

:func:`tile_job` tiles :class:`~hqrs_geo.tiling.inputs.Rasters` into a tile layer file, or into a
dataset folder with the partitioned engine (:mod:`hqrs_geo.engine.partitioned`, in this process
or on a Ray cluster). :func:`model_job` runs a :class:`~hqrs_geo.engine.partitioned.ModelPlan`
on rasters (tiled first) or on one tile layer (a file, updated in place or copied first; a
dataset folder, updated part by part). This module is the entry's dispatch: the one place below
the API that chooses between a file and a dataset, by the kind of the input and of ``output``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import Cancelled, OptionError
from ..layer.dataset import is_dataset_output
from ..layer.io import check_writable, open_layer
from ..layer.source import TileSource, copy_layer
from ..models.registry import default_caption_model, default_embed_model
from ..tiling.config import TileConfig
from ..tiling.coregister import tile_like
from ..tiling.inputs import Rasters, names_layer
from ..tiling.plan import tile_to_layer
from .options import RunOptions
from .partitioned import DatasetReport, ModelPlan, ScaleOptions, run_dataset, update_dataset
from .run import run_models

RAY_NEEDS_RASTERS = ("the Ray engine tiles rasters into a dataset folder: give rasters and a folder as «output» "
                     "(model jobs on an existing dataset run in this process)")


def model_plan(command: str = "run", embed_models: Sequence[str] = (), caption_model: str | None = None,
               embed_checkpoints: Sequence[str | None] = (), embed_arch: Sequence[str | None] = (),
               caption_checkpoint: str | None = None, caption_arch: str | None = None, decoding: Any = None,
               device: str = "auto", trust_checkpoint: bool = False) -> ModelPlan:
    """The models of a job. With no model named, the defaults (``$HQRS_GEO_EMBED_MODEL`` /
    ``$HQRS_GEO_CAPTION_MODEL``, else the shipped demo models): the embedding model for
    ``command="embed"``, the caption model for ``"caption"``, both for ``"run"``."""
    if not embed_models and not caption_model:
        if command != "caption":
            embed_models = [default_embed_model()]
        if command != "embed":
            caption_model = default_caption_model()
    return ModelPlan(list(embed_models), list(embed_checkpoints), list(embed_arch), caption_model,
                     caption_checkpoint, caption_arch, decoding, device, trust_checkpoint)


def _engine(scale: ScaleOptions | None) -> str:
    return (scale or ScaleOptions()).engine


def _writes_dataset(output: str | os.PathLike, scale: ScaleOptions | None) -> bool:
    """True when a job on rasters writes a partitioned dataset (a folder ``output``); the Ray
    engine writes nothing else (one-line OptionError)."""
    if is_dataset_output(output):
        return True
    if _engine(scale) != "local":
        raise OptionError(f"{output}: the Ray engine writes a partitioned dataset: give a folder (e.g. tiles/), "
                          "then merge it into one GeoPackage", option="output")
    return False


def tile_job(rasters: Rasters, output: str | os.PathLike, config: TileConfig | None = None, progress: Any = None,
             scale: ScaleOptions | None = None, like: str | os.PathLike | None = None) -> Any:
    """Tile ``rasters`` into the layer ``output``: returns the layer as written (GeoDataFrame), or
    for a dataset folder ``output`` the :class:`~hqrs_geo.engine.partitioned.DatasetReport`.
    ``like``: the tile layer (an earlier date) whose grid the tiles follow
    (:func:`~hqrs_geo.tiling.coregister.tile_like`, in this process)."""
    if like is not None:
        if _engine(scale) != "local":
            raise OptionError("tiling like a reference layer runs in this process; leave out «engine»",
                              option="engine")
        return tile_like(like, rasters.scenes(), output, config, progress).layer
    if _engine(scale) != "local" and names_layer(rasters.items):
        raise OptionError(RAY_NEEDS_RASTERS, option="engine")
    if _writes_dataset(output, scale):
        return run_dataset(rasters.items, output, None, config, scale=scale, progress=progress, command="tile",
                           source_filter=rasters.source_filter)
    return tile_to_layer(rasters.scenes(), output, config, progress).layer


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _layer_job(source: TileSource, output: str | os.PathLike | None, plan: ModelPlan, options: RunOptions | None,
               progress: Any, command: str) -> Any:
    """Models over one tile layer: a dataset updated in place, part by part; a file updated in
    place, or copied to ``output`` first."""
    if source.partitioned:
        if output is not None and not _same_path(output, source.path):
            raise OptionError(f"{source.path}: a dataset is updated in place; leave out «output» (merge it into a "
                              "GeoPackage to get a copy)", option="output")
        return update_dataset(source.path, plan, options, progress, command)
    embedders, captioner = plan.load()
    layer = open_layer(source.path)  # a one-line error now (before any copy) if it is not a tile layer
    if output is not None and not _same_path(output, source.path):
        check_writable(output)
        copy_layer(source.path, output)
        layer = open_layer(output)
    return run_models(layer, embedders, captioner, plan.decoding, options, progress, command=command)


def _rasters_job(rasters: Rasters, output: str | os.PathLike | None, plan: ModelPlan, tiling: TileConfig | None,
                 options: RunOptions | None, progress: Any, scale: ScaleOptions | None, command: str) -> Any:
    """Rasters tiled, then the models over their tiles: into a dataset folder by the partitioned
    engine, or into one tile layer file in one pass."""
    if output is None:
        if _engine(scale) != "local":
            raise OptionError(RAY_NEEDS_RASTERS, option="engine")
        raise OptionError("rasters were given: name the tile layer to write", option="output")
    if _writes_dataset(output, scale):
        return run_dataset(rasters.items, output, plan, tiling, options, scale, progress, command,
                           rasters.source_filter)
    scenes = rasters.scenes()
    embedders, captioner = plan.load()
    layer = tile_to_layer(scenes, output, tiling, progress).written
    try:
        return run_models(layer, embedders, captioner, plan.decoding, options, progress, command=command)
    except KeyboardInterrupt:
        raise Cancelled(f"cancelled; {layer.path} holds the new tiles, without this run's model results yet; "
                        "run the same command again to compute them (finished batches are kept and skipped)") \
            from None


def model_job(source: Rasters | TileSource, output: str | os.PathLike | None, plan: ModelPlan,
              tiling: TileConfig | None = None, options: RunOptions | None = None, progress: Any = None,
              scale: ScaleOptions | None = None, command: str = "run") -> Any:
    """Run ``plan``'s models (embeddings and captions in one pass over the tiles) on ``source``:
    rasters are tiled first into ``output`` (required); a tile layer file is updated in place, or
    copied to ``output`` first; a dataset folder is updated in place, part by part. Returns the
    updated layer (GeoDataFrame; for a dataset input its tiles), or for a dataset folder
    ``output`` the :class:`~hqrs_geo.engine.partitioned.DatasetReport`."""
    if isinstance(source, Rasters):
        return _rasters_job(source, output, plan, tiling, options, progress, scale, command)
    if _engine(scale) != "local":
        raise OptionError(RAY_NEEDS_RASTERS, option="engine")
    return _layer_job(source, output, plan, options, progress, command)


__all__ = ["DatasetReport", "model_job", "model_plan", "tile_job"]
