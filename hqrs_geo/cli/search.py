"""``hqrs-geo search``, ``similar``, ``classify``, ``index`` and ``serve-search``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import OptionError
from ..search.choose import KINDS
from ..search.labels import read_lines
from ..search.output import result_layer_name, write_result_layer, write_score_column, write_score_raster
from ..search.serve import serve
from ..search.session import BaseSession
from ..search.sessions import open_session
from ..search.spatial import SpatialFilter
from .options import add_progress_options, number, numbers

#: Python parameter names whose command-line flag is not ``--name-with-dashes``.
FLAGS = {"k": "-k", "query": "QUERY", "templates": "--templates-file", "result_layer": "--result-layer"}


def _add_common(parser: argparse.ArgumentParser, outputs: bool = True) -> None:
    parser.add_argument("layer", help="tile layer with embeddings")
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="which embeddings (model name or key) when the layer has several")
    group.add_argument("--checkpoint", default=None, help="checkpoint of that model, if it moved since embedding")
    group.add_argument("--trust-checkpoint", action="store_true",
                       help="allow a checkpoint that needs pickle code execution (only from trusted sources)")
    group.add_argument("--device", default="cpu", help="device for the text/image encoder (default cpu)")
    group.add_argument("--ann", action="store_true", help="use the approximate index built by 'hqrs-geo index'")
    spatial = parser.add_argument_group("spatial filters")
    spatial.add_argument("--bbox", type=numbers(4), default=None, help="minx,miny,maxx,maxy (in --bbox-crs)")
    spatial.add_argument("--bbox-crs", default=None, help="CRS of --bbox (default: the layer's)")
    spatial.add_argument("--within", default=None, help="polygon layer (path or 'path|layername=NAME')")
    spatial.add_argument("--near", type=numbers(2), default=None, help="x,y of a point (in --near-crs)")
    spatial.add_argument("--near-crs", default="EPSG:4326", help="CRS of --near (default EPSG:4326 lon,lat)")
    spatial.add_argument("--distance", type=number(float, 0, 1e8), default=None, help="distance from --near in metres")
    if outputs:
        out = parser.add_argument_group("results")
        out.add_argument("-k", type=number(int, 1, 1_000_000), default=20, help="number of results (default 20)")
        out.add_argument("--result-layer", nargs="?", const="", default=None,
                         help="also write the ranked tiles as a layer (default name search_<query>)")
        out.add_argument("--output", default=None, help="file for the result layer (default: the tile GeoPackage)")
        out.add_argument("--score-column", default=None, help="write every tile's score as this column of the layer")
        out.add_argument("--score-raster", default=None, help="write a GeoTIFF of scores at tile resolution")
        out.add_argument("--json", action="store_true", help="print results as JSON")
    add_progress_options(parser)


def register(sub: Any) -> None:
    """Add the search commands."""
    search = sub.add_parser("search", help="rank tiles by similarity to text")
    _add_common(search)
    search.add_argument("query", nargs="+", help="one or more texts (combined)")
    search.add_argument("--no-template", action="store_true",
                        help="use the text as is, without the prompt templates and synonyms")
    search.set_defaults(func=run_search, kind="text", option_flags=FLAGS)

    similar = sub.add_parser("similar", help="rank tiles by similarity to example tiles or images")
    _add_common(similar)
    similar.add_argument("--tile", action="append", default=[], help="positive example tile id (repeatable)")
    similar.add_argument("--image", action="append", default=[], help="positive example image file (repeatable)")
    similar.add_argument("--negative", action="append", default=[], help="negative example tile id (repeatable)")
    similar.add_argument("--negative-image", action="append", default=[], help="negative example image (repeatable)")
    similar.add_argument("--negative-weight", type=number(float, 0, 10), default=0.5,
                         help="weight of the negatives' mean (0.5)")
    similar.add_argument("--include-examples", action="store_true", help="keep the example tiles in the results")
    similar.set_defaults(func=run_search, kind="similar", option_flags=FLAGS)

    classify = sub.add_parser("classify", help="zero-shot classes for every tile (label, label_score, label_top)")
    _add_common(classify, outputs=False)
    classify.add_argument("--labels", default=None, help="comma-separated class names")
    classify.add_argument("--labels-file", default=None, help="text file with one class name per line")
    classify.add_argument("--templates-file", default=None, help="prompt templates with {} (one per line)")
    classify.add_argument("--top-k", type=number(int, 1, 1000), default=3, help="classes kept in label_top (default 3)")
    classify.set_defaults(func=run_classify, option_flags=FLAGS)

    index = sub.add_parser("index", help="build the nearest-neighbour index of a layer (FAISS), or say none is needed")
    index.add_argument("layer")
    index.add_argument("--model", default=None, help="which embeddings when the layer has several")
    index.add_argument("--kind", choices=KINDS, default="auto",
                       help="auto (by size and available memory, says why), exact (no index), hnsw, ivf, or ivfpq "
                            "(compressed, inverted lists on disk, for tens of millions of tiles)")
    index.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="index parameter, e.g. nprobe=32, rerank=256, nlist=4096, m=64 (ivfpq); M=32, "
                            "efSearch=512 (hnsw); repeatable")
    add_progress_options(index)
    index.set_defaults(func=run_index)

    serve = sub.add_parser("serve-search", help="answer JSON-lines search requests on stdin/stdout")
    _add_common(serve, outputs=False)
    serve.set_defaults(func=run_serve, option_flags=FLAGS)


def _session(args: argparse.Namespace) -> BaseSession:
    """The search session of the command's layer (a file or a dataset folder)."""
    return open_session(args.layer, model=args.model, checkpoint=args.checkpoint, device=args.device,
                         use_ann=args.ann, trust_checkpoint=args.trust_checkpoint)


def _spatial(args: argparse.Namespace) -> SpatialFilter:
    """The command's spatial filters."""
    return SpatialFilter(bbox=args.bbox, bbox_crs=args.bbox_crs, within=args.within, near=args.near,
                         near_crs=args.near_crs, distance=args.distance)


def run_search(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo search`` and ``hqrs-geo similar``: ranked tiles, optionally written out."""
    session = _session(args)
    spatial = _spatial(args)
    if args.kind == "text":
        query = session.text_query(args.query, template=not args.no_template)
        label = " ".join(args.query)
        exclude: tuple = ()
    else:
        query = session.similar_query(args.tile, args.negative, args.image, args.negative_image, args.negative_weight)
        exclude = () if args.include_examples else tuple(args.tile) + tuple(args.negative)
        label = "similar " + " ".join(args.tile + [Path(p).stem for p in args.image])
    results = session.vector_search(query, args.k, spatial, exclude)
    params = {"query": label, "kind": args.kind, "model": session.source.model, "k": args.k,
              "filters": {k: v for k, v in vars(spatial).items() if v is not None}}
    written = []
    if args.result_layer is not None:
        name = args.result_layer or result_layer_name(label)
        written.append(write_result_layer(args.layer, results, name, params, args.output))
    if args.score_column or args.score_raster:
        scores = session.score_all(query, spatial, exclude)
        if args.score_column:
            write_score_column(args.layer, scores, args.score_column, params)
            written.append(f"{args.layer} (column {args.score_column})")
        if args.score_raster:
            written.extend(write_score_raster(args.layer, scores, args.score_raster))
    if args.json:
        print(json.dumps([{"rank": int(r.rank), "tile_id": r.tile_id, "score": float(r.score)}
                          for r in results.itertuples()]))
    elif not args.quiet:
        has_caption = "caption" in results.columns
        print(f"{'rank':>4}  {'score':>7}  tile_id" + ("  caption" if has_caption else ""))
        for r in results.itertuples():
            caption = f"  {r.caption}" if has_caption and isinstance(r.caption, str) else ""
            print(f"{r.rank:>4}  {r.score:7.4f}  {r.tile_id}{caption}")
    if not args.quiet and not args.json:
        for item in written:
            print(f"written: {item}", file=sys.stderr)
    return 0


def run_classify(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo classify``: zero-shot labels written to the tile layer."""
    labels = args.labels.split(",") if args.labels else []
    if args.labels_file:
        labels += read_lines(args.labels_file, "labels file")
    templates = read_lines(args.templates_file, "templates file") if args.templates_file else None
    session = _session(args)
    frame = session.classify(labels, templates, args.top_k, write=True)
    if not args.quiet:
        for label, count in frame["label"].value_counts().items():
            print(f"{count:6d}  {label}")
        print(f"labels written to {args.layer} (columns label, label_score, label_top)", file=sys.stderr)
    return 0


def run_index(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo index``: build and store the ANN index, report its recall@10 (a dataset's part
    by part: nothing is loaded whole)."""
    params = _index_params(args.param)
    report = open_session(args.layer, model=args.model).build_index(args.kind, **params)
    print(json.dumps(report))
    return 0


def _index_params(items: list[str]) -> dict:
    """``NAME=VALUE`` pairs as a dict of integers (one-line errors)."""
    params = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            params[name.strip()] = int(value)
        except ValueError:
            raise OptionError(f"invalid index parameter {item!r}: use NAME=INTEGER, e.g. nprobe=32",
                              option="param") from None
    return params


def run_serve(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo serve-search``: JSON-lines request/response loop."""
    session = _session(args)
    _ = session.model  # load the model before announcing readiness
    serve(session)
    return 0
