"""The Python API: each CLI job as one function returning a GeoDataFrame.

    import hqrs_geo as hg
    tiles = hg.run("scene.tif", "tiles.gpkg", embed_models=["remoteclip-vit-b-32"], caption_model="rs-coca")

Inputs are rasters (tiled first with ``tiling``) or one existing tile layer (updated in
place, or copied to ``output`` first when given).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import OptionError
from .inference import RunOptions, run_models
from .layers import FORMATS, check_writable, new_run, write_tiles
from .tiling import TileConfig, tile_rasters

PathOrPaths = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def _as_list(inputs: PathOrPaths) -> list[str]:
    return [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]


def is_layer_input(inputs: PathOrPaths) -> bool:
    """True when ``inputs`` is a single tile-layer file (by extension)."""
    items = _as_list(inputs)
    return len(items) == 1 and Path(items[0]).suffix.lower() in FORMATS


def tile(inputs: PathOrPaths, output: Union[str, os.PathLike], config: Optional[TileConfig] = None, progress=None):
    """Tile rasters into the layer ``output``; returns ``(new tiles, layer as written, scenes)``."""
    config = (config or TileConfig()).validated()
    check_writable(output)
    tiles, scenes = tile_rasters(_as_list(inputs), config, progress=progress)
    params = {"tiling": config.as_dict(), "scenes": [s.as_dict() for s in scenes]}
    merged = write_tiles(output, tiles, new_run("tile", "tiles", params), replace_sources=[s.source for s in scenes])
    return tiles, merged, scenes


def prepare_layer(inputs: PathOrPaths, output=None, tiling: Optional[TileConfig] = None, progress=None) -> str:
    """The tile layer a model job works on: the given layer (or its copy at ``output``), or
    a new layer at ``output`` made from rasters."""
    items = _as_list(inputs)
    if is_layer_input(items):
        layer = items[0]
        if output is None or Path(output).resolve() == Path(layer).resolve():
            from .layers import read_tiles

            read_tiles(layer)  # one-line error now if it is not a tile layer
            return layer
        check_writable(output)
        shutil.copy2(layer, output)
        return str(output)
    if output is None:
        raise OptionError("rasters were given: name the tile layer to write with -o/--output")
    tile(items, output, tiling, progress)
    return str(output)


def _load(names: Sequence[str], checkpoints: Sequence[Optional[str]], arch: Sequence[Optional[str]], device: str,
          trust: bool):
    from .models.loader import load_model

    if len(checkpoints) > len(names) or len(arch) > len(names):
        raise OptionError("more --checkpoint/--arch values than models: give one per --model, in order")
    checkpoints = list(checkpoints) + [None] * (len(names) - len(checkpoints))
    arch = list(arch) + [None] * (len(names) - len(arch))
    return [load_model(n, checkpoint=c, arch=a, device=device, trust_checkpoint=trust)
            for n, c, a in zip(names, checkpoints, arch)]


def run(
    inputs: PathOrPaths,
    output=None,
    embed_models: Sequence[str] = (),
    caption_model: Optional[str] = None,
    embed_checkpoints: Sequence[Optional[str]] = (),
    embed_arch: Sequence[Optional[str]] = (),
    caption_checkpoint: Optional[str] = None,
    caption_arch: Optional[str] = None,
    decoding=None,
    device: str = "auto",
    trust_checkpoint: bool = False,
    tiling: Optional[TileConfig] = None,
    options: Optional[RunOptions] = None,
    progress=None,
    command: str = "run",
):
    """Tile (when rasters are given), embed with every ``embed_models`` and caption with
    ``caption_model``, in one pass over the tiles. Returns the updated layer.

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
    return run_models(layer, embedders, captioner, decoding, options, progress, command=command)


def embed(inputs: PathOrPaths, output=None, model: Union[str, Sequence[str]] = (), checkpoint=None, arch=None, **kw):
    """Image embeddings of every tile with one or more models (see :func:`run`)."""
    models = [model] if isinstance(model, str) else list(model)
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint or [])
    arches = [arch] if isinstance(arch, str) else list(arch or [])
    return run(inputs, output, embed_models=models, embed_checkpoints=checkpoints, embed_arch=arches,
               command="embed", **kw)


def caption(inputs: PathOrPaths, output=None, model: Optional[str] = None, checkpoint=None, arch=None, **kw):
    """Captions of every tile with a CoCa model (see :func:`run`)."""
    return run(inputs, output, caption_model=model, caption_checkpoint=checkpoint, caption_arch=arch,
               command="caption", **kw)
