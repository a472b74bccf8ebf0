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
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .engine.options import RunOptions
from .engine.run import run_models
from .errors import Cancelled, OptionError
from .layer.dataset import is_dataset
from .layer.io import TileLayer, check_writable, is_layer_path, open_layer
from .tiling.config import TileConfig
from .tiling.plan import tile_to_layer

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]


def _as_list(inputs: Any) -> list:
    from .raster.catalog import SourceEntry

    if isinstance(inputs, (str, os.PathLike, SourceEntry)):
        inputs = [inputs]
    return [i if isinstance(i, SourceEntry) else str(i) for i in inputs]


def _wants_dataset(items: list, output: Any, scale: Any) -> bool:
    """True when a job writes a partitioned dataset (a folder output, or the Ray engine)."""
    from .engine.partitioned import ScaleOptions
    from .layer.dataset import is_dataset_output

    engine = (scale or ScaleOptions()).engine
    if output is None or is_layer_input(items):
        if engine != "local":
            raise OptionError("the Ray engine tiles rasters into a dataset folder: give rasters and a folder as "
                              "«output» (model jobs on an existing dataset run in this process)", option="engine")
        return False
    if is_dataset_output(output):
        return True
    if engine != "local":
        raise OptionError(f"{output}: the Ray engine writes a partitioned dataset: give a folder (e.g. tiles/), "
                          "then merge it into one GeoPackage", option="output")
    return False


def is_layer_input(inputs: PathOrPaths) -> bool:
    """True when ``inputs`` is a single tile-layer file (by extension) or dataset folder."""
    items = _as_list(inputs)
    return len(items) == 1 and isinstance(items[0], str) and is_layer_path(items[0])


def tile(inputs: PathOrPaths, output: str | os.PathLike, config: TileConfig | None = None,
         progress: Any = None, source_filter: Any = None, scale: Any = None,
         like: str | os.PathLike | None = None) -> Any:
    """Tile rasters into the layer ``output``; returns the layer as written (GeoDataFrame), or
    for a dataset folder ``output`` the :class:`~hqrs_geo.engine.partitioned.DatasetReport`.

    ``like``: a tile layer (an earlier date) whose grid the tiles follow: same tile ids and
    footprints, read from ``inputs`` resampled onto its scenes' pixel grids
    (:func:`hqrs_geo.tiling.coregister.tile_like`); a dataset ``like`` makes a dataset ``output``
    (its new tiles are returned without footprints)."""
    items = _as_list(inputs)
    if like is not None:
        from .tiling.coregister import tile_like

        if scale is not None and getattr(scale, "engine", "local") != "local":
            raise OptionError("tiling like a reference layer runs in this process; leave out «engine»",
                              option="engine")
        if source_filter is not None:
            from .raster.catalog import resolve_sources

            items = resolve_sources(items, source_filter)
        return tile_like(like, items, output, config, progress).layer
    if _wants_dataset(items, output, scale):
        from .engine.partitioned import run_dataset

        return run_dataset(items, output, None, config, scale=scale, progress=progress, command="tile",
                           source_filter=source_filter)
    if source_filter is not None:
        from .raster.catalog import resolve_sources

        items = resolve_sources(items, source_filter)
    return tile_to_layer(items, output, config, progress).layer


def prepare_layer(inputs: PathOrPaths, output: str | os.PathLike | None = None,
                  tiling: TileConfig | None = None, progress: Any = None) -> TileLayer:
    """The tile layer a model job works on, read once: the given layer (or its copy at
    ``output``), or a new layer at ``output`` made from rasters."""
    items = _as_list(inputs)
    if is_layer_input(items):
        layer = items[0]
        if output is None or Path(output).resolve() == Path(layer).resolve():
            return open_layer(layer)
        open_layer(layer)  # one-line error now if it is not a tile layer
        check_writable(output)
        copy_layer(layer, output)
        return open_layer(output)
    if output is None:
        raise OptionError("rasters were given: name the tile layer to write", option="output")
    return tile_to_layer(items, output, tiling, progress).written


def copy_layer(layer: str | os.PathLike, output: str | os.PathLike) -> None:
    """Copy a tile layer file (and a FlatGeobuf's run-record sidecar) atomically and verified."""
    from .atomic import atomic_path
    from .layer.runs import sidecar_path

    with atomic_path(output) as tmp:
        shutil.copyfile(layer, tmp)
    if sidecar_path(layer).exists():
        with atomic_path(sidecar_path(output)) as tmp:
            shutil.copyfile(sidecar_path(layer), tmp)


def _load(names: Sequence[str], checkpoints: Sequence[str | None], arch: Sequence[str | None], device: str,
          trust: bool) -> list:
    from .models.loader import load_model

    if len(checkpoints) > len(names) or len(arch) > len(names):
        raise OptionError("more checkpoints or architectures than models: give one per model, in order",
                          option="checkpoint")
    checkpoints = list(checkpoints) + [None] * (len(names) - len(checkpoints))
    arch = list(arch) + [None] * (len(names) - len(arch))
    return [load_model(n, checkpoint=c, arch=a, device=device, trust_checkpoint=trust)
            for n, c, a in zip(names, checkpoints, arch)]


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
    if not embed_models and not caption_model:
        from .models.registry import default_caption_model, default_embed_model

        if command != "caption":
            embed_models = [default_embed_model()]
        if command != "embed":
            caption_model = default_caption_model()
    items = _as_list(inputs)
    if _wants_dataset(items, output, scale) or (is_layer_input(items) and is_dataset(items[0])):
        from .engine.partitioned import ModelPlan, run_dataset, update_dataset

        plan = ModelPlan(list(embed_models), list(embed_checkpoints), list(embed_arch), caption_model,
                         caption_checkpoint, caption_arch, decoding, device, trust_checkpoint)
        if is_layer_input(items):
            if output is not None and Path(output).resolve() != Path(items[0]).resolve():
                raise OptionError(f"{items[0]}: a dataset is updated in place; leave out «output» (merge it into a "
                                  "GeoPackage to get a copy)", option="output")
            return update_dataset(items[0], plan, options, progress, command)
        assert output is not None
        return run_dataset(items, output, plan, tiling, options, scale, progress, command, source_filter)
    if source_filter is not None and not is_layer_input(items):
        from .raster.catalog import resolve_sources

        inputs = resolve_sources(items, source_filter)  # type: ignore[assignment]
    embedders = _load(list(embed_models), list(embed_checkpoints), list(embed_arch), device, trust_checkpoint)
    captioner = None
    if caption_model:
        captioner = _load([caption_model], [caption_checkpoint], [caption_arch], device, trust_checkpoint)[0]
    layer = prepare_layer(inputs, output, tiling, progress)
    try:
        return run_models(layer, embedders, captioner, decoding, options, progress, command=command)
    except KeyboardInterrupt:
        if is_layer_input(inputs):
            raise
        raise Cancelled(f"cancelled; {layer.path} holds the new tiles, without this run's model results yet; "
                        "run the same command again to compute them (finished batches are kept and skipped)") \
            from None


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
