"""``hqrs-geo tile`` (rasters to a tile layer) and ``hqrs-geo export-chips`` (tiles as images)."""
from __future__ import annotations

import argparse
from typing import Any

from ..engine.jobs import tile_job
from ..errors import OptionError
from ..layer.dataset import is_dataset_output
from ..raster.catalog import SourceFilter
from ..tiling.chips import export_chips
from ..tiling.coregister import tile_like
from ..tiling.inputs import Rasters, as_list
from ..tiling.plan import tile_to_layer
from .dataset import add_scale_options, add_source_options, finish_dataset, scale_options, source_filter
from .options import add_progress_options, add_tiling_options, finish, number, tile_config


def register(sub: Any) -> None:
    """Add the ``tile`` and ``export-chips`` commands."""
    tile = sub.add_parser("tile", help="cut rasters into a tile layer (GeoPackage, GeoParquet or FlatGeobuf)")
    tile.add_argument("rasters", nargs="+", help="rasters, globs (quoted), folders, lists, URLs or STAC JSON")
    tile.add_argument("-o", "--output", required=True, help="tile layer: .gpkg (default format), .parquet or .fgb; "
                                                           "a folder (DATASET/) makes a partitioned GeoParquet dataset")
    tile.add_argument("--like", metavar="REFERENCE", default=None,
                      help="tile on the grid of this tile layer (an earlier date): the same tiles (ids, footprints), "
                           "read from the rasters resampled onto its scenes' pixel grids")
    add_scale_options(tile, workers=True)
    add_source_options(tile)
    add_tiling_options(tile)
    add_progress_options(tile)
    tile.set_defaults(func=run_tile)

    chips = sub.add_parser("export-chips", help="write tiles as PNG/JPEG files with a CSV and GeoPackage index")
    chips.add_argument("inputs", nargs="+", help="rasters (tiled with the options below) or one tile layer")
    chips.add_argument("-o", "--output", required=True, help="output folder")
    chips.add_argument("--format", choices=("png", "jpg"), default="png", help="image format (default png)")
    chips.add_argument("--quality", type=number(int, 1, 100), default=95, help="JPEG quality 1-100 (default 95)")
    add_tiling_options(chips)
    add_progress_options(chips)
    chips.set_defaults(func=run_export_chips, option_flags={"image_format": "--format"})


def rasters(args: argparse.Namespace) -> Rasters:
    """The rasters of ``hqrs-geo tile``, with the STAC filter of its source options when one is given."""
    filters = source_filter(args)
    return Rasters(as_list(args.rasters), filters if filters != SourceFilter() else None)


def run_tile(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo tile``: rasters to a tile layer (or a partitioned dataset)."""
    config = tile_config(args)
    inputs = rasters(args)
    scale = scale_options(args)
    if args.like is not None:
        return _run_tile_like(args, progress, config, inputs, scale)
    if is_dataset_output(args.output) or scale.engine != "local":
        report = tile_job(inputs, args.output, config, progress=progress, scale=scale)
        return finish_dataset(args, progress, report)
    report = tile_to_layer(inputs.scenes(), args.output, config, progress=progress)
    new, held = len(report.tiles), len(report.layer)
    summary = (f"{new} tile(s) from {len(report.scenes)} scene(s) written to {args.output} "
               f"({report.examined - new} skipped below valid fraction {config.min_valid}; layer holds {held})")
    if new == 0:
        summary = (f"no tile reached valid fraction {config.min_valid} (scene without valid pixels?); "
                   f"{args.output} holds an empty tile layer")
    return finish(args, progress, summary, tiles=new, output=str(args.output))


def _run_tile_like(args: argparse.Namespace, progress: Any, config: Any, inputs: Rasters, scale: Any) -> int:
    """``hqrs-geo tile --like REFERENCE``: rasters of a later date on the grid of a tile layer."""
    if scale.engine != "local":
        raise OptionError("tiling like a reference layer runs in this process; leave out «engine»", option="engine")
    report = tile_like(args.like, inputs.scenes(), args.output, config, progress=progress)
    new, held = len(report.tiles), len(report.layer)
    runs = report.written.runs
    min_valid = ((runs[-1].get("params") or {}).get("tiling") or {}).get("min_valid") if runs else None
    summary = (f"{new} tile(s) like {args.like} from {len(report.scenes)} scene(s) written to {args.output} "
               f"({report.examined - new} of its tiles left out below valid fraction {min_valid}; "
               f"layer holds {held})")
    return finish(args, progress, summary, tiles=new, output=str(args.output))


def run_export_chips(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo export-chips``: tiles as image files plus an index."""
    frame = export_chips(args.inputs, args.output, tile_config(args), args.format, args.quality, progress=progress)
    summary = f"{len(frame)} chip(s) in {args.output} (index.csv, index.gpkg)"
    return finish(args, progress, summary, tiles=len(frame), output=str(args.output))
