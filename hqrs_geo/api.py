"""The Python API: each job as one function returning the tile layer as a GeoDataFrame.

    import hqrs_geo as hg
    tiles = hg.run("scene.tif", "tiles.gpkg", embed_models=["remoteclip-vit-b-32"], caption_model="rs-coca")

Inputs are rasters (tiled first) or one existing tile layer (updated in place, or copied to
``output`` first when given).
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
from .layer.io import TileLayer, check_writable, is_layer_path, open_layer
from .tiling.config import TileConfig
from .tiling.plan import tile_to_layer

PathOrPaths = str | os.PathLike | Sequence[str | os.PathLike]


def _as_list(inputs: PathOrPaths) -> list[str]:
    return [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]


def is_layer_input(inputs: PathOrPaths) -> bool:
    """True when ``inputs`` is a single tile-layer file (by extension)."""
    items = _as_list(inputs)
    return len(items) == 1 and is_layer_path(items[0])


def tile(inputs: PathOrPaths, output: str | os.PathLike, config: TileConfig | None = None,
         progress: Any = None) -> Any:
    """Tile rasters into the layer ``output``; returns the layer as written (GeoDataFrame)."""
    return tile_to_layer(_as_list(inputs), output, config, progress).layer


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
) -> Any:
    """Tile (when rasters are given), embed with every ``embed_models`` and caption with
    ``caption_model``, in one pass over the tiles. Returns the updated layer (GeoDataFrame).

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
