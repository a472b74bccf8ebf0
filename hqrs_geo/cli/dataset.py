"""Partitioned datasets on the command line: the scale-out and catalog options of ``tile``,
``run``, ``embed`` and ``caption``, their summaries, and ``hqrs-geo merge`` (a dataset as one
GeoPackage for QGIS)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..engine.partitioned import ScaleOptions
from ..layer.dataset import merge_dataset
from ..raster.catalog import SourceFilter
from ..raster.network import set_limits
from .options import add_progress_options, finish, number, numbers

#: Exit status of a partitioned job that finished with failed scenes (the others are in the dataset).
EXIT_FAILED_SCENES = 3


def register(sub: Any) -> None:
    """Add the ``merge`` command."""
    merge = sub.add_parser("merge", help="write the tiles of a partitioned dataset as one layer (e.g. for QGIS)")
    merge.add_argument("dataset", help="dataset folder (written by tile/run with a folder as output)")
    merge.add_argument("-o", "--output", required=True, help="layer to write: .gpkg (QGIS), .parquet or .fgb")
    merge.add_argument("--bbox", type=numbers(4), default=None,
                       help="only tiles intersecting minx,miny,maxx,maxy (in --bbox-crs); parts outside are not read")
    merge.add_argument("--bbox-crs", default=None, help="CRS of --bbox (default: the dataset's)")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace the tile layer the output already holds (refused without it)")
    add_progress_options(merge)
    merge.set_defaults(func=run_merge)


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """``--asset``, ``--bbox``, ``--datetime``, ``--allow-local-assets``, ``--keep-removed``: choices
    applied to STAC inputs; ``--http-*``: the limits of network reads."""
    group = parser.add_argument_group("catalog inputs (STAC Item/ItemCollection/Catalog JSON, local or URL)")
    group.add_argument("--asset", default=None,
                       help="asset key of each STAC item to read (default: 'visual', or the one RGB/visual asset)")
    group.add_argument("--bbox", type=numbers(4), default=None,
                       help="only STAC items intersecting min_lon,min_lat,max_lon,max_lat (WGS 84)")
    group.add_argument("--datetime", default=None,
                       help="only STAC items of this date or range: 2021-06-01, 2021-01-01/2021-12-31, ../2021-12-31")
    group.add_argument("--allow-local-assets", action="store_true",
                       help="let a STAC catalog read over the network point at local files (refused by default)")
    group.add_argument("--keep-removed", action="store_true",
                       help="dataset output: keep the parts of items no longer in their STAC catalog "
                            "(default: dropped, with a warning)")
    net = parser.add_argument_group("network reads (COGs, STAC; defaults from $HQRS_GEO_HTTP_*)")
    net.add_argument("--http-connect-timeout", type=number(float, 0, 600, low_open=True), default=None,
                     metavar="S", help="seconds to connect (default 10)")
    net.add_argument("--http-read-timeout", type=number(float, 0, 3600, low_open=True), default=None,
                     metavar="S", help="seconds without data before a request is given up (default 30)")
    net.add_argument("--http-deadline", type=number(float, 0, 86400, low_open=True), default=None, metavar="S",
                     help="seconds one read (a scene's opening, a tile, a STAC document) may take in all, "
                          "retries included (default 120)")
    net.add_argument("--http-retries", type=number(int, 0, 20), default=None, metavar="N",
                     help="retries of a failed request (timeouts, HTTP 429/5xx; default 3)")


def add_scale_options(parser: argparse.ArgumentParser, workers: bool = False) -> None:
    """The partitioned engine's options (``workers``: also add ``--workers``, for commands without
    the engine options)."""
    group = parser.add_argument_group(
        "scale-out (with a folder as output: a partitioned GeoParquet dataset, resumable; with --engine ray, "
        "--workers is the number of model workers)")
    group.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: this process (default); ray: CPU tasks and model workers on a Ray cluster")
    group.add_argument("--ray-address", default=None,
                       help="Ray cluster: auto (the one on this machine) or HOST:PORT (default: $RAY_ADDRESS, "
                            "else a Ray instance started for this job)")
    if workers:
        group.add_argument("--workers", type=number(int, 1), default=None, help="Ray engine: model workers")
    group.add_argument("--gpus-per-worker", type=number(float, 0), default=None,
                       help="Ray engine: GPUs per model worker (default 1 when the cluster has GPUs)")
    group.add_argument("--cpus-per-worker", type=number(float, 0, low_open=True), default=None,
                       help="Ray engine: CPUs per model worker (default 1 with GPUs, else a node less half a core)")
    group.add_argument("--block-tiles", type=number(int, 1), default=1024,
                       help="grid cells per work unit; larger scenes are split into blocks (default 1024)")
    group.add_argument("--in-flight", type=number(int, 1), default=None,
                       help="Ray engine: units under way at once (bounds memory; default 2 per worker + free CPUs)")
    group.add_argument("--unit-timeout", type=number(float, 0, low_open=True), default=1800.0, metavar="S",
                       help="Ray engine: seconds a unit may be under way before it is put back in the queue "
                            "(default 1800)")
    group.add_argument("--verify-parts", action="store_true",
                       help="check the SHA-256 of every finished part before resuming (finds parts damaged in "
                            "place; by default their size and time are checked, and reads check the SHA-256)")


def source_filter(args: argparse.Namespace) -> SourceFilter:
    """The :class:`~hqrs_geo.raster.catalog.SourceFilter` of :func:`add_source_options`; the
    network limits given are set for this process and its children (:mod:`hqrs_geo.raster.network`)."""
    set_limits(args.http_connect_timeout, args.http_read_timeout, args.http_deadline, args.http_retries)
    return SourceFilter(asset=args.asset, bbox=args.bbox, datetime=args.datetime,
                        allow_local_assets=args.allow_local_assets, keep_removed=args.keep_removed).validated()


def scale_options(args: argparse.Namespace) -> ScaleOptions:
    """The :class:`~hqrs_geo.engine.partitioned.ScaleOptions` of :func:`add_scale_options`."""
    ray = args.engine == "ray"
    return ScaleOptions(
        engine=args.engine, ray_address=args.ray_address, workers=args.workers if ray else None,
        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker, block_tiles=args.block_tiles,
        in_flight=args.in_flight, unit_timeout=args.unit_timeout, verify_parts=args.verify_parts,
    ).validated()


def finish_dataset(args: argparse.Namespace, progress: Any, report: Any) -> int:
    """End a partitioned job: the summary (with the failed scenes) and exit status 0, or
    :data:`EXIT_FAILED_SCENES` when some scenes failed."""
    failed = [{"scene": k, "error": v} for k, v in report.failed.items()]
    progress.finish(report.summary().splitlines()[0], tiles=report.tiles, scenes=report.scenes,
                    skipped=report.skipped, finished=report.done, failed=failed,
                    output=str(report.output))
    if report.failed or (not args.quiet and progress.mode != "json"):  # failed scenes: always on stderr
        print(report.summary(), file=sys.stderr)
    return EXIT_FAILED_SCENES if report.failed else 0


def run_merge(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo merge``: a dataset as one tile layer."""
    merged = merge_dataset(args.dataset, args.output, bbox=args.bbox, bbox_crs=args.bbox_crs,
                           overwrite=args.overwrite)
    summary = f"{len(merged.frame)} tile(s) of {args.dataset} written to {args.output}"
    return finish(args, progress, summary, tiles=len(merged.frame), output=str(args.output))
