"""The ``hqrs-geo`` command line.

Every user error ends in one line on stderr (``hqrs-geo: error: …``) and a non-zero exit
status; tracebacks are shown only with ``--debug``. Ctrl-C and SIGTERM cancel cleanly
(exit 130) and leave outputs as they were before the run.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import warnings
from typing import Optional, Sequence

from . import __version__
from .errors import Cancelled, HqrsError, OptionError
from .grid import DEFAULT_EDGE, EDGE_POLICIES
from .progress import MODES, Progress
from .tiling import DEFAULT_MIN_VALID, TileConfig

log = logging.getLogger("hqrs_geo")


def _bands(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid band list {text!r}: use e.g. 4,3,2 or 1") from None


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output and progress")
    group.add_argument("--progress", choices=MODES, default="auto",
                       help="progress display: bar on a terminal (auto), json lines on stdout, or none")
    group.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    group.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def _tiling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tiling")
    group.add_argument("--tile-size", default="256",
                       help="tile size: pixels (256) or ground units (64m, 0.5km); default 256")
    group.add_argument("--overlap", default="0", help="overlap: pixels, ground units or percent (25%%); default 0")
    group.add_argument("--gsd", type=float, default=None,
                       help="target ground resolution in metres per pixel (resampled on read)")
    group.add_argument("--edge", choices=EDGE_POLICIES, default=DEFAULT_EDGE,
                       help="partial tiles at the right/bottom edge: shift inward (default), pad with nodata, drop")
    group.add_argument("--min-valid", type=float, default=DEFAULT_MIN_VALID,
                       help=f"skip tiles with a smaller valid fraction (default {DEFAULT_MIN_VALID})")
    group.add_argument("--bands", type=_bands, default=None,
                       help="bands for R,G,B (e.g. 1,2,3 or 4,3,2) or one band to replicate; default from colour interpretation")
    group.add_argument("--stretch", default="auto",
                       help="to 8 bits: auto (uint8 as is, else per-scene 2-98%% percentiles), none, p1,99 or 0,3000")
    group.add_argument("--crs", default=None, help="CRS of the footprints, e.g. EPSG:4326 (default: the raster's)")
    group.add_argument("--resampling", default="bilinear", help="resampling when --gsd is given (default bilinear)")


def _config(args: argparse.Namespace) -> TileConfig:
    return TileConfig(
        tile_size=args.tile_size, overlap=args.overlap, gsd=args.gsd, edge=args.edge,
        min_valid=args.min_valid, bands=args.bands, stretch=args.stretch, crs=args.crs,
        resampling=args.resampling,
    ).validated()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hqrs-geo`` (one sub-command per job)."""
    parser = argparse.ArgumentParser(
        prog="hqrs-geo",
        description="Remote-sensing vision-language models on georeferenced tiles.",
    )
    parser.add_argument("--version", action="version", version=f"hqrs-geo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    info = sub.add_parser("info", help="describe a raster (size, CRS, bands, resolution, masks, overviews)")
    info.add_argument("raster")
    info.add_argument("--json", action="store_true", help="print JSON")
    _common(info)
    info.set_defaults(func=cmd_info)

    tile = sub.add_parser("tile", help="cut rasters into a tile layer (GeoPackage, GeoParquet or FlatGeobuf)")
    tile.add_argument("rasters", nargs="+", help="rasters, globs (quoted) or folders")
    tile.add_argument("-o", "--output", required=True, help="tile layer: .gpkg (default format), .parquet or .fgb")
    _tiling_options(tile)
    _common(tile)
    tile.set_defaults(func=cmd_tile)

    chips = sub.add_parser("export-chips", help="write tiles as PNG/JPEG files with a CSV and GeoPackage index")
    chips.add_argument("inputs", nargs="+", help="rasters (tiled with the options below) or one tile layer")
    chips.add_argument("-o", "--output", required=True, help="output folder")
    chips.add_argument("--format", choices=("png", "jpg"), default="png", help="image format (default png)")
    chips.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    _tiling_options(chips)
    _common(chips)
    chips.set_defaults(func=cmd_export_chips)
    return parser


def cmd_info(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo info``: print the facts of one raster."""
    from .scene import describe, open_raster

    with open_raster(args.raster) as src:
        info = describe(src)
    if args.json:
        print(json.dumps(info.as_dict(), indent=2, default=str))
        return 0
    res = info.pixel_size
    lines = [
        f"file:        {info.path} ({info.driver})",
        f"size:        {info.width} x {info.height} px, {info.count} band(s), {', '.join(sorted(set(info.dtypes)))}",
        f"crs:         {info.crs or 'none (pixel coordinates only)'}",
        f"resolution:  {res[0]:.6g} x {res[1]:.6g} CRS units"
        + (f" ({info.pixel_size_m[0]:.4g} x {info.pixel_size_m[1]:.4g} m)" if info.pixel_size_m else ""),
        f"bounds:      {', '.join(f'{b:.6f}' for b in info.bounds)}",
        f"bands:       {', '.join(info.colorinterp)}",
        f"nodata/mask: nodata={info.nodata}; flags "
        + "; ".join(f"b{i + 1}:{'+'.join(f)}" for i, f in enumerate(info.mask_flags)),
        f"overviews:   {', '.join(map(str, info.overviews)) or 'none'}",
        f"blocks:      {info.block_shapes[0][1]} x {info.block_shapes[0][0]}, compression {info.compression or 'none'}",
    ]
    if info.has_gcps and not info.crs:
        lines.append("note:        georeferenced by GCPs only; warp it (gdalwarp) before tiling")
    print("\n".join(lines))
    return 0


def cmd_tile(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo tile``: rasters to a tile layer."""
    from .layers import check_writable, new_run, write_tiles
    from .tiling import tile_rasters

    config = _config(args)
    check_writable(args.output)
    tiles, scenes = tile_rasters(args.rasters, config, progress=progress)
    params = {"tiling": config.as_dict(), "scenes": [s.as_dict() for s in scenes]}
    merged = write_tiles(args.output, tiles, new_run("tile", "tiles", params),
                         replace_sources=[s.source for s in scenes])
    examined = sum(len(s.grid) for s in scenes)
    summary = (f"{len(tiles)} tile(s) from {len(scenes)} scene(s) written to {args.output} "
               f"({examined - len(tiles)} skipped below valid fraction {config.min_valid}; layer holds {len(merged)})")
    if len(tiles) == 0:
        summary = (f"no tile reached valid fraction {config.min_valid} (scene without valid pixels?); "
                   f"{args.output} holds an empty tile layer")
    progress.finish(summary, tiles=len(tiles), output=str(args.output))
    if not args.quiet and progress.mode != "json":
        print(summary, file=sys.stderr)
    return 0


def cmd_export_chips(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo export-chips``: tiles as image files plus an index."""
    from .chips import export_chips

    config = _config(args)
    frame = export_chips(args.inputs, args.output, config, args.format, args.quality, progress=progress)
    summary = f"{len(frame)} chip(s) in {args.output} (index.csv, index.gpkg)"
    progress.finish(summary, tiles=len(frame), output=str(args.output))
    if not args.quiet and progress.mode != "json":
        print(summary, file=sys.stderr)
    return 0


def _configure_logging(quiet: bool, debug: bool) -> None:
    """Our warnings as one line each; GDAL's own chatter only with --debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("hqrs-geo: warning: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.ERROR if quiet else logging.WARNING)
    if debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    else:
        logging.getLogger("rasterio").setLevel(logging.CRITICAL)
        warnings.simplefilter("ignore")


def _raise_cancel(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = Progress("none" if args.quiet else args.progress)
    _configure_logging(args.quiet, args.debug)
    previous = signal.signal(signal.SIGTERM, _raise_cancel)
    try:
        import rasterio

        with rasterio.Env():  # GDAL messages go through Python logging, not straight to stderr
            return args.func(args, progress)
    except KeyboardInterrupt:
        err: HqrsError = Cancelled("cancelled; outputs were left as they were before this run")
    except HqrsError as exc:
        err = exc
    except Exception as exc:  # an internal bug: one line unless --debug
        if args.debug:
            raise
        err = HqrsError(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug and report it)")
        err.exit_code = 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.debug and not isinstance(err, Cancelled) and err.__cause__:
        raise err
    message = str(err).replace("\n", " ")
    progress.fail(message)
    print(f"hqrs-geo: error: {message}", file=sys.stderr)
    return err.exit_code


__all__ = ["main", "build_parser", "OptionError"]
