"""``hqrs-geo mpgi`` (the MpGI captioning pipeline) and ``hqrs-geo export-dataset``."""
from __future__ import annotations

import argparse
from typing import Any

from ..mpgi.export import export_dataset
from ..mpgi.pipeline import run_mpgi as pipeline
from .options import add_progress_options, finish, number


def register(sub: Any) -> None:
    """Add the ``mpgi`` and ``export-dataset`` commands."""
    mpgi = sub.add_parser("mpgi", help="MpGI captions: VLM perspectives + rule-guided relay + caption model, "
                                       "merged by an LLM")
    mpgi.add_argument("layer", help="tile layer (from 'hqrs-geo tile')")
    mpgi.add_argument("-o", "--output", default=None, help="layer to write (default: update LAYER)")
    mpgi.add_argument("--recipe", default=None, help="recipe TOML (default: the shipped default recipe)")
    mpgi.add_argument("--vectors", action="append", default=[], metavar="PATH[:LAYER[:CLASS_FIELD]]",
                      help="vector layer for the facts, e.g. osm.gpkg:buildings:building; repeatable")
    mpgi.add_argument("--limit", type=number(int, 1, 10**9), default=None, help="only the first N tiles")
    mpgi.add_argument("--device", default="auto", help="device of local models")
    add_progress_options(mpgi)
    mpgi.set_defaults(func=run_mpgi)

    export = sub.add_parser("export-dataset", help="captioned tiles as chips + open_clip CSV + Karpathy JSON")
    export.add_argument("layer")
    export.add_argument("-o", "--output", required=True, help="dataset folder")
    export.add_argument("--captions", choices=("mpgi", "caption", "labels"), default="mpgi",
                        help="mpgi: detailed + short MpGI captions (default); caption: the caption column; labels: "
                             "the few-shot labels saved with the layer (class positive/negative)")
    export.add_argument("--format", choices=("jpg", "png"), default="jpg")
    export.add_argument("--val-fraction", type=number(float, 0, 1, high_open=True), default=0.1,
                        help="share of tiles in the val split")
    add_progress_options(export)
    export.set_defaults(func=run_export_dataset, option_flags={"image_format": "--format"})


def run_mpgi(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo mpgi``: the MpGI pipeline on a tile layer."""
    frame = pipeline(args.layer, args.recipe, args.vectors, args.output, args.limit, progress, device=args.device)
    output = str(args.output or args.layer)
    summary = f"{output}: MpGI captions on {frame['mpgi_caption'].notna().sum()} tile(s)"
    return finish(args, progress, summary, output=output)


def run_export_dataset(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo export-dataset``: chips + captions.csv + dataset.json."""
    counts = export_dataset(args.layer, args.output, args.captions, args.format, args.val_fraction, progress)
    summary = (f"{counts['images']} images, {counts['captions']} captions ({counts['train']} train, "
               f"{counts['val']} val) in {counts['folder']}")
    return finish(args, progress, summary, **counts)
