"""``hqrs-geo embed``, ``caption`` and ``run``: the model engine over the tiles of a layer."""
from __future__ import annotations

import argparse
from typing import Any

from ..engine.jobs import model_job, model_plan
from ..engine.options import RunOptions
from ..engine.partitioned import DatasetReport
from ..tiling.inputs import resolve_input
from .dataset import add_scale_options, add_source_options, finish_dataset, scale_options, source_filter
from .options import (
    add_decoding_options,
    add_engine_options,
    add_progress_options,
    add_tiling_options,
    decoding_config,
    finish,
    tile_config,
)

HELP = {
    "embed": "image embeddings of tiles (rasters or a tile layer)",
    "caption": "captions of tiles with a CoCa model (rasters or a tile layer)",
    "run": "tile + embed + caption in one pass",
}


def register(sub: Any) -> None:
    """Add the ``embed``, ``caption`` and ``run`` commands."""
    for name, helptext in HELP.items():
        job = sub.add_parser(name, help=helptext)
        job.add_argument("inputs", nargs="+", help="one tile layer or dataset folder, or rasters/globs/folders/lists/"
                                                    "URLs/STAC JSON (then -o is required)")
        job.add_argument("-o", "--output", default=None,
                         help="tile layer to write (default: update the input layer); a folder (DATASET/) makes a "
                              "partitioned GeoParquet dataset")
        group = job.add_argument_group("models")
        flags: dict[str, str] = {}
        if name in ("embed", "run"):
            prefix = "" if name == "embed" else "embed-"
            group.add_argument(f"--{prefix}model", dest="embed_models",
                               action="append", default=[],
                               help="embedding model (registry name or open_clip architecture); repeatable; "
                                    "default $HQRS_GEO_EMBED_MODEL or the shipped demo model hqrs-mini-clip")
            group.add_argument(f"--{prefix}checkpoint", dest="embed_checkpoints", action="append", default=[],
                               help="checkpoint file for the model of the same position")
            group.add_argument(f"--{prefix}arch", dest="embed_arch", action="append", default=[],
                               help="open_clip architecture of that checkpoint")
            flags.update(model=f"--{prefix}model", checkpoint=f"--{prefix}checkpoint", arch=f"--{prefix}arch")
        if name in ("caption", "run"):
            prefix = "" if name == "caption" else "caption-"
            group.add_argument(f"--{prefix}model", dest="caption_model", default=None,
                               help="CoCa caption model (registry name or architecture); default "
                                    "$HQRS_GEO_CAPTION_MODEL or the shipped demo model hqrs-mini-coca")
            group.add_argument(f"--{prefix}checkpoint", dest="caption_checkpoint", default=None,
                               help="checkpoint of the caption model")
            group.add_argument(f"--{prefix}arch", dest="caption_arch", default=None,
                               help="open_clip architecture of that checkpoint")
            if name == "caption":
                flags.update(model="--model", checkpoint="--checkpoint", arch="--arch")
            add_decoding_options(job)
        group.add_argument("--trust-checkpoint", action="store_true",
                           help="allow checkpoints that need pickle code execution (only from trusted sources)")
        add_engine_options(job)
        add_scale_options(job)
        add_source_options(job)
        add_tiling_options(job)
        add_progress_options(job)
        job.set_defaults(func=run_job, job=name, option_flags=flags)


def run_job(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo embed|caption|run``: model inference over tiles, results on the layer."""
    decoding = decoding_config(args) if args.job in ("caption", "run") else None
    scale = scale_options(args)
    options = RunOptions(batch_size=args.batch_size, precision=args.precision,
                         workers=None if scale.engine == "ray" else args.workers,
                         embedding_dtype=args.embedding_dtype, overwrite=args.overwrite, views=args.views).validated()
    plan = model_plan(
        args.job, embed_models=getattr(args, "embed_models", []), caption_model=getattr(args, "caption_model", None),
        embed_checkpoints=getattr(args, "embed_checkpoints", []), embed_arch=getattr(args, "embed_arch", []),
        caption_checkpoint=getattr(args, "caption_checkpoint", None), caption_arch=getattr(args, "caption_arch", None),
        decoding=decoding, device=args.device, trust_checkpoint=args.trust_checkpoint,
    )
    source = resolve_input(args.inputs, source_filter(args))
    frame = model_job(source, args.output, plan, tile_config(args), options, progress, scale, args.job)
    if isinstance(frame, DatasetReport):
        return finish_dataset(args, progress, frame)
    output = args.output or args.inputs[0]
    summary = f"{len(frame)} tile(s) in {output} now carry the results of {args.job}"
    return finish(args, progress, summary, tiles=len(frame), output=str(output))
