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
from pathlib import Path
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


def _engine_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    group.add_argument("--batch-size", type=int, default=32, help="tiles per batch (halved on CUDA out-of-memory)")
    group.add_argument("--workers", type=int, default=None, help="tile reader processes (default: min(4, CPUs-1) on GPU; on CPU 0 up to 4 cores, else 1)")
    group.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                       help="auto: bf16 (or fp16) on CUDA, fp32 on CPU")
    group.add_argument("--embedding-dtype", default="float16", choices=("float16", "float32"),
                       help="stored embedding values (little-endian; default float16)")
    group.add_argument("--overwrite", action="store_true", help="recompute results the layer already has")


def _decoding_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("caption decoding")
    group.add_argument("--decoding", default="beam", choices=("greedy", "beam", "sample"), help="default beam")
    group.add_argument("--beams", type=int, default=3, help="beam width (default 3)")
    group.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0: off)")
    group.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability (1.0: off)")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    group.add_argument("--min-length", type=int, default=5, help="minimum caption length in tokens")
    group.add_argument("--max-length", type=int, default=30, help="maximum caption length in tokens")
    group.add_argument("--seed", type=int, default=0, help="sampling seed")


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

    models = sub.add_parser("models", help="list the model registry and which checkpoints are present")
    models.add_argument("--json", action="store_true", help="print JSON")
    _common(models)
    models.set_defaults(func=cmd_models)

    for name, helptext in (("embed", "image embeddings of tiles (rasters or a tile layer)"),
                           ("caption", "captions of tiles with a CoCa model (rasters or a tile layer)"),
                           ("run", "tile + embed + caption in one pass")):
        job = sub.add_parser(name, help=helptext)
        job.add_argument("inputs", nargs="+", help="one tile layer, or rasters/globs/folders (then -o is required)")
        job.add_argument("-o", "--output", default=None, help="tile layer to write (default: update the input layer)")
        models_group = job.add_argument_group("models")
        if name in ("embed", "run"):
            flag = "--model" if name == "embed" else "--embed-model"
            models_group.add_argument(flag, dest="embed_models", action="append", default=[],
                                      help="embedding model (registry name or open_clip architecture); repeatable; "
                                           "default $HQRS_GEO_EMBED_MODEL or the shipped demo model hqrs-mini-clip")
            models_group.add_argument("--checkpoint" if name == "embed" else "--embed-checkpoint",
                                      dest="embed_checkpoints", action="append", default=[],
                                      help="checkpoint file for the model of the same position")
            models_group.add_argument("--arch" if name == "embed" else "--embed-arch", dest="embed_arch",
                                      action="append", default=[], help="open_clip architecture of that checkpoint")
        if name in ("caption", "run"):
            models_group.add_argument("--model" if name == "caption" else "--caption-model", dest="caption_model",
                                      default=None, help="CoCa caption model (registry name or architecture); default "
                                           "$HQRS_GEO_CAPTION_MODEL or the shipped demo model hqrs-mini-coca")
            models_group.add_argument("--checkpoint" if name == "caption" else "--caption-checkpoint",
                                      dest="caption_checkpoint", default=None, help="checkpoint of the caption model")
            models_group.add_argument("--arch" if name == "caption" else "--caption-arch", dest="caption_arch",
                                      default=None, help="open_clip architecture of that checkpoint")
            _decoding_options(job)
        models_group.add_argument("--trust-checkpoint", action="store_true",
                                  help="allow checkpoints that need pickle code execution (only from trusted sources)")
        _engine_options(job)
        _tiling_options(job)
        _common(job)
        job.set_defaults(func=cmd_model_job, job=name)
    _search_parsers(sub)

    evaluate = sub.add_parser("eval", help="evaluate a model: retrieval R@K, zero-shot accuracy, caption metrics")
    evaluate.add_argument("task", choices=("retrieval", "zeroshot", "caption"))
    evaluate.add_argument("dataset", help="Karpathy-style JSON (images[].filename, class, split, sentences[].raw)")
    evaluate.add_argument("--split", default="val", help="split to evaluate (default val)")
    evaluate.add_argument("--model", required=True, help="registry name or open_clip architecture")
    evaluate.add_argument("--checkpoint", default=None)
    evaluate.add_argument("--arch", default=None)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    evaluate.add_argument("--json", dest="json_out", default=None, help="also write the metrics to this JSON file")
    evaluate.add_argument("--trust-checkpoint", action="store_true")
    evaluate.add_argument("--decoding", default="beam", choices=("greedy", "beam", "sample"), help="caption task")
    evaluate.add_argument("--beams", type=int, default=3, help="caption task: beam width")
    evaluate.add_argument("--max-length", type=int, default=30, help="caption task: maximum tokens")
    _common(evaluate)
    evaluate.set_defaults(func=cmd_eval)
    _finetune_parser(sub)
    _mpgi_parsers(sub)
    return parser


def _mpgi_parsers(sub) -> None:
    mpgi = sub.add_parser("mpgi", help="MpGI captions: VLM perspectives + rule-guided relay + caption model, "
                                       "merged by an LLM")
    mpgi.add_argument("layer", help="tile layer (from 'hqrs-geo tile')")
    mpgi.add_argument("-o", "--output", default=None, help="layer to write (default: update LAYER)")
    mpgi.add_argument("--recipe", default=None, help="recipe TOML (default: the shipped default recipe)")
    mpgi.add_argument("--vectors", action="append", default=[], metavar="PATH[:LAYER[:CLASS_FIELD]]",
                      help="vector layer for the facts, e.g. osm.gpkg:buildings:building; repeatable")
    mpgi.add_argument("--limit", type=int, default=None, help="only the first N tiles")
    mpgi.add_argument("--device", default="auto", help="device of local models")
    _common(mpgi)
    mpgi.set_defaults(func=cmd_mpgi)

    export = sub.add_parser("export-dataset", help="captioned tiles as chips + open_clip CSV + Karpathy JSON")
    export.add_argument("layer")
    export.add_argument("-o", "--output", required=True, help="dataset folder")
    export.add_argument("--captions", choices=("mpgi", "caption"), default="mpgi",
                        help="mpgi: detailed + short MpGI captions (default); caption: the caption column")
    export.add_argument("--format", choices=("jpg", "png"), default="jpg")
    export.add_argument("--val-fraction", type=float, default=0.1, help="share of tiles in the val split")
    _common(export)
    export.set_defaults(func=cmd_export_dataset)


def cmd_mpgi(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo mpgi``: the MpGI pipeline on a tile layer."""
    from .mpgi.pipeline import run_mpgi

    frame = run_mpgi(args.layer, args.recipe, args.vectors, args.output, args.limit, progress, device=args.device)
    summary = f"{args.output or args.layer}: MpGI captions on {frame['mpgi_caption'].notna().sum()} tile(s)"
    progress.finish(summary, output=str(args.output or args.layer))
    if not args.quiet and progress.mode != "json":
        print(summary, file=sys.stderr)
    return 0


def cmd_export_dataset(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo export-dataset``: chips + captions.csv + dataset.json."""
    from .mpgi.export import export_dataset

    counts = export_dataset(args.layer, args.output, args.captions, args.format, args.val_fraction, progress)
    summary = (f"{counts['images']} images, {counts['captions']} captions ({counts['train']} train, "
               f"{counts['val']} val) in {counts['folder']}")
    progress.finish(summary, **counts)
    if not args.quiet and progress.mode != "json":
        print(summary, file=sys.stderr)
    return 0


def _finetune_parser(sub) -> None:
    tune = sub.add_parser("finetune", help="train or fine-tune an open_clip CLIP/CoCa on image-caption pairs")
    tune.add_argument("dataset", help="open_clip CSV/TSV (filepath, caption) or Karpathy-style JSON")
    tune.add_argument("-o", "--output", required=True, help="run folder (checkpoints, model.safetensors, train.json)")
    what = tune.add_argument_group("model")
    what.add_argument("--arch", default=None, help="open_clip architecture or config .json to train from scratch")
    what.add_argument("--model", default=None, help="registry model to fine-tune from its weights")
    what.add_argument("--checkpoint", default=None, help="weights to start from")
    what.add_argument("--init-from", default=None, help="warm start: copy the tensors of this checkpoint that fit")
    what.add_argument("--trust-checkpoint", action="store_true")
    data = tune.add_argument_group("data")
    data.add_argument("--split", dest="splits", action="append", default=None,
                      help="training split of a JSON dataset (default train); repeatable")
    data.add_argument("--val-split", default="val", help="validation split for model selection ('' for none)")
    data.add_argument("--class-prompts", dest="class_prompt_prob", type=float, default=0.0,
                      help="probability of a class prompt instead of a sentence, for images with a class")
    data.add_argument("--csv-img-key", default="filepath")
    data.add_argument("--csv-caption-key", default="caption")
    data.add_argument("--min-scale", type=float, default=0.6, help="smallest random crop, fraction of the side")
    data.add_argument("--no-rotate", dest="dihedral", action="store_false", help="no 90 degree rotations/flips")
    opt = tune.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=10)
    opt.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    opt.add_argument("--batch-size", type=int, default=64)
    opt.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimiser step")
    opt.add_argument("--lr", type=float, default=5e-4)
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--warmup-steps", type=int, default=100)
    opt.add_argument("--caption-loss-weight", type=float, default=2.0, help="CoCa")
    opt.add_argument("--clip-loss-weight", type=float, default=1.0, help="CoCa")
    opt.add_argument("--class-target", type=float, default=0.0,
                     help="share of the contrastive target given to other images of the same class "
                          "(labelled data; 0 = open_clip's ClipLoss)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                     help="auto: bf16/fp16 AMP on CUDA, fp32 on CPU (bf16 is about 2x faster on CPUs with AVX512-BF16)")
    opt.add_argument("--device", default="auto")
    run = tune.add_argument_group("checkpoints")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint every N optimiser steps")
    run.add_argument("--keep-checkpoints", type=int, default=2)
    run.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    run.add_argument("--save-dtype", choices=("fp32", "fp16"), default="fp32", help="dtype of the saved weights")
    _common(tune)
    tune.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo finetune``: train, checkpoint, validate; prints where the weights are."""
    from .training import FinetuneConfig, finetune

    names = [f for f in FinetuneConfig.__dataclass_fields__ if hasattr(args, f)]
    values = {name: getattr(args, name) for name in names}
    values["splits"] = tuple(args.splits or ("train",))
    values["val_split"] = args.val_split or None
    record = finetune(FinetuneConfig(**values), resume=args.resume, progress=progress)
    output = Path(args.output)
    best = record.get("best") or {}
    summary = f"trained {record['arch']} for {record['steps']} steps: {output / 'model.safetensors'}"
    if best:
        summary += f"; best on validation at step {best['step']}: {output / 'best.safetensors'}"
    progress.finish(summary, output=str(output))
    if not args.quiet and progress.mode != "json":
        print(summary, file=sys.stderr)
        if record.get("final"):
            print("final validation: " + ", ".join(f"{k} {v:.1f}" for k, v in record["final"].items()),
                  file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo eval``: metrics as a table and optionally JSON."""
    from .evaluation import evaluate_retrieval, evaluate_zeroshot
    from .models.loader import load_model

    loaded = load_model(args.model, checkpoint=args.checkpoint, arch=args.arch, device=args.device,
                        trust_checkpoint=args.trust_checkpoint)
    if args.task == "caption":
        from .evaluation import evaluate_captions
        from .models.decoding import DecodingConfig

        decoding = DecodingConfig(method=args.decoding, num_beams=args.beams, max_length=args.max_length).validated()
        metrics = evaluate_captions(loaded, args.dataset, args.split, decoding, limit=args.limit)
    else:
        run = evaluate_retrieval if args.task == "retrieval" else evaluate_zeroshot
        metrics = run(loaded, args.dataset, args.split, limit=args.limit)
    report = {"task": args.task, "model": loaded.spec.name, "sha256": loaded.sha256, "split": args.split, **metrics}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    if not args.quiet:
        for key, value in report.items():
            print(f"{key:<10} {value:.2f}" if isinstance(value, float) else f"{key:<10} {value}")
    return 0


def _floats(count: int):
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
        return values
    return parse


def _search_common(parser: argparse.ArgumentParser, outputs: bool = True) -> None:
    parser.add_argument("layer", help="tile layer with embeddings")
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="which embeddings (model name or key) when the layer has several")
    group.add_argument("--checkpoint", default=None, help="checkpoint of that model, if it moved since embedding")
    group.add_argument("--device", default="cpu", help="device for the text/image encoder (default cpu)")
    group.add_argument("--ann", action="store_true", help="use the approximate index built by 'hqrs-geo index'")
    spatial = parser.add_argument_group("spatial filters")
    spatial.add_argument("--bbox", type=_floats(4), default=None, help="minx,miny,maxx,maxy (in --bbox-crs)")
    spatial.add_argument("--bbox-crs", default=None, help="CRS of --bbox (default: the layer's)")
    spatial.add_argument("--within", default=None, help="polygon layer (path or 'path|layername=NAME')")
    spatial.add_argument("--near", type=_floats(2), default=None, help="x,y of a point (in --near-crs)")
    spatial.add_argument("--near-crs", default="EPSG:4326", help="CRS of --near (default EPSG:4326 lon,lat)")
    spatial.add_argument("--distance", type=float, default=None, help="distance from --near in metres")
    if outputs:
        out = parser.add_argument_group("results")
        out.add_argument("-k", type=int, default=20, help="number of results (default 20)")
        out.add_argument("--result-layer", nargs="?", const="", default=None,
                         help="also write the ranked tiles as a layer (default name search_<query>)")
        out.add_argument("--output", default=None, help="file for the result layer (default: the tile GeoPackage)")
        out.add_argument("--score-column", default=None, help="write every tile's score as this column of the layer")
        out.add_argument("--score-raster", default=None, help="write a GeoTIFF of scores at tile resolution")
        out.add_argument("--json", action="store_true", help="print results as JSON")
    _common(parser)


def _search_parsers(sub) -> None:
    search = sub.add_parser("search", help="rank tiles by similarity to text")
    _search_common(search)
    search.add_argument("query", nargs="+", help="one or more texts (combined)")
    search.add_argument("--no-template", action="store_true", help="use the text as is, without the model's template")
    search.set_defaults(func=cmd_search, kind="text")

    similar = sub.add_parser("similar", help="rank tiles by similarity to example tiles or images")
    _search_common(similar)
    similar.add_argument("--tile", action="append", default=[], help="positive example tile id (repeatable)")
    similar.add_argument("--image", action="append", default=[], help="positive example image file (repeatable)")
    similar.add_argument("--negative", action="append", default=[], help="negative example tile id (repeatable)")
    similar.add_argument("--negative-image", action="append", default=[], help="negative example image (repeatable)")
    similar.add_argument("--negative-weight", type=float, default=0.5, help="weight of the negatives' mean (0.5)")
    similar.add_argument("--include-examples", action="store_true", help="keep the example tiles in the results")
    similar.set_defaults(func=cmd_search, kind="similar")

    classify = sub.add_parser("classify", help="zero-shot classes for every tile (label, label_score, label_top)")
    _search_common(classify, outputs=False)
    classify.add_argument("--labels", default=None, help="comma-separated class names")
    classify.add_argument("--labels-file", default=None, help="file with one class name per line")
    classify.add_argument("--templates-file", default=None, help="prompt templates with {} (one per line)")
    classify.add_argument("--top-k", type=int, default=3, help="classes kept in label_top (default 3)")
    classify.set_defaults(func=cmd_classify)

    index = sub.add_parser("index", help="build the approximate nearest-neighbour index of a layer (FAISS)")
    index.add_argument("layer")
    index.add_argument("--model", default=None, help="which embeddings when the layer has several")
    index.add_argument("--kind", choices=("hnsw", "ivf"), default="hnsw")
    _common(index)
    index.set_defaults(func=cmd_index)

    serve = sub.add_parser("serve-search", help="answer JSON-lines search requests on stdin/stdout")
    _search_common(serve, outputs=False)
    serve.set_defaults(func=cmd_serve)


def _session(args: argparse.Namespace):
    from .search.session import SearchSession

    return SearchSession(args.layer, model=args.model, checkpoint=args.checkpoint, device=args.device,
                         use_ann=args.ann)


def _spatial(args: argparse.Namespace):
    from .search.spatial import SpatialFilter

    return SpatialFilter(bbox=args.bbox, bbox_crs=args.bbox_crs, within=args.within, near=args.near,
                         near_crs=args.near_crs, distance=args.distance)


def cmd_search(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo search`` and ``hqrs-geo similar``: ranked tiles, optionally written out."""
    from .search.output import result_layer_name, write_result_layer, write_score_column, write_score_raster

    session = _session(args)
    spatial = _spatial(args)
    if args.kind == "text":
        query = session.text_query(args.query, template=not args.no_template)
        label = " ".join(args.query)
        results = session.vector_search(query, args.k, spatial)
        exclude = ()
    else:
        query = session.similar_query(args.tile, args.negative, args.image, args.negative_image, args.negative_weight)
        exclude = () if args.include_examples else tuple(args.tile) + tuple(args.negative)
        results = session.vector_search(query, args.k, spatial, exclude)
        label = "similar " + " ".join(args.tile + [Path(p).stem for p in args.image])
    params = {"query": label, "kind": args.kind, "model": session.source.model, "k": args.k,
              "filters": {k: v for k, v in vars(spatial).items() if v is not None}}
    written = []
    if args.result_layer is not None:
        name = args.result_layer or result_layer_name(label)
        written.append(write_result_layer(args.layer, results, name, params, args.output))
    if args.score_column or args.score_raster:
        mask = session.mask(spatial, exclude)
        all_scores = session.index.scores(query, mask)
        scores = {tid: float(s) for tid, s in zip(session.index.ids, all_scores) if s == s}
        if args.score_column:
            write_score_column(args.layer, scores, args.score_column, params)
            written.append(f"{args.layer} (column {args.score_column})")
        if args.score_raster:
            written.extend(write_score_raster(args.layer, scores, args.score_raster))
    if args.json:
        print(json.dumps([{"rank": int(r.rank), "tile_id": r.tile_id, "score": float(r.score)}
                          for r in results.itertuples()]))
    elif not args.quiet:
        print(f"{'rank':>4}  {'score':>7}  tile_id" + ("  caption" if "caption" in results.columns else ""))
        for r in results.itertuples():
            caption = f"  {r.caption}" if "caption" in results.columns and isinstance(r.caption, str) else ""
            print(f"{r.rank:>4}  {r.score:7.4f}  {r.tile_id}{caption}")
    for item in written:
        if not args.quiet and not args.json:
            print(f"written: {item}", file=sys.stderr)
    return 0


def cmd_classify(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo classify``: zero-shot labels written to the tile layer."""
    from .layers import new_run, write_tiles

    labels = args.labels.split(",") if args.labels else []
    if args.labels_file:
        labels += Path(args.labels_file).read_text().splitlines() if Path(args.labels_file).is_file() else []
        if not Path(args.labels_file).is_file():
            raise OptionError(f"{args.labels_file}: labels file not found")
    templates = None
    if args.templates_file:
        if not Path(args.templates_file).is_file():
            raise OptionError(f"{args.templates_file}: templates file not found")
        templates = [t for t in Path(args.templates_file).read_text().splitlines() if t.strip()]
        if any("{}" not in t for t in templates):
            raise OptionError(f"{args.templates_file}: every template needs a {{}} for the class name")
    session = _session(args)
    frame = session.classify(labels, templates, args.top_k)
    params = {"labels": [l.strip() for l in labels if l.strip()], "templates": templates, "model": session.source.model}
    write_tiles(args.layer, frame, new_run("classify", "tiles", params), replace_sources=list(frame["source"].unique()))
    if not args.quiet:
        counts = frame["label"].value_counts()
        for label, count in counts.items():
            print(f"{count:6d}  {label}")
        print(f"labels written to {args.layer} (columns label, label_score, label_top)", file=sys.stderr)
    return 0


def cmd_index(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo index``: build and store the ANN index, report its recall@10."""
    from .layers import read_tiles
    from .search.queries import embedding_source
    from .search.vectors import VectorIndex

    frame = read_tiles(args.layer)
    source = embedding_source(args.layer, frame, args.model)
    report = VectorIndex.open(args.layer, source.key, frame=frame).build_ann(kind=args.kind)
    print(json.dumps(report))
    return 0


def cmd_serve(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo serve-search``: JSON-lines request/response loop."""
    from .search.serve import serve

    session = _session(args)
    _ = session.model  # load the model before announcing readiness
    serve(session)
    return 0


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
    from .api import tile

    config = _config(args)
    tiles, merged, scenes = tile(args.rasters, args.output, config, progress=progress)
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


def cmd_models(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo models``: the registry and which checkpoints are on this machine."""
    from .errors import InputError
    from .models.checkpoints import bundled_checkpoint, cache_dir, cached_checkpoint
    from .models.registry import default_caption_model, default_embed_model, list_models

    defaults = {default_embed_model(), default_caption_model()}
    rows = []
    for spec in list_models():
        try:
            found = bundled_checkpoint(spec) or cached_checkpoint(spec)
        except InputError:
            found = None
        rows.append({**spec.as_dict(), "present": str(found) if found else None, "default": spec.name in defaults})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<22} {'kind':<5} {'arch':<16} {'checkpoint':<10} source")
    for row in rows:
        source = f"hf-hub {row['hf_repo']}/{row['hf_file']}" if row["hf_repo"] else (row["obtain"] or "built in")
        if row["bundled"]:
            source = "shipped in the package: small DEMO model (UC Merced + AID), not HQRS-CLIP/RS-CoCa"
        name = row["name"] + (" *" if row["default"] else "")
        print(f"{name:<22} {row['kind']:<5} {row['arch']:<16} {'present' if row['present'] else 'missing':<10} {source}")
    print("* default when no model is named ($HQRS_GEO_EMBED_MODEL / $HQRS_GEO_CAPTION_MODEL change it)")
    print(f"checkpoints are looked for in {cache_dir()} (set HQRS_GEO_HOME to move it); "
          "any open_clip architecture works with --checkpoint")
    return 0


def cmd_model_job(args: argparse.Namespace, progress: Progress) -> int:
    """``hqrs-geo embed|caption|run``: model inference over tiles, results on the layer."""
    from .api import run
    from .inference import RunOptions

    decoding = None
    if args.job in ("caption", "run"):
        from .models.decoding import DecodingConfig

        decoding = DecodingConfig(
            method=args.decoding, num_beams=args.beams, top_k=args.top_k, top_p=args.top_p,
            temperature=args.temperature, repetition_penalty=args.repetition_penalty,
            min_length=args.min_length, max_length=args.max_length, seed=args.seed,
        ).validated()
    options = RunOptions(batch_size=args.batch_size, precision=args.precision, workers=args.workers,
                         embedding_dtype=args.embedding_dtype, overwrite=args.overwrite).validated()
    frame = run(
        args.inputs, args.output,
        embed_models=getattr(args, "embed_models", []), caption_model=getattr(args, "caption_model", None),
        embed_checkpoints=getattr(args, "embed_checkpoints", []), embed_arch=getattr(args, "embed_arch", []),
        caption_checkpoint=getattr(args, "caption_checkpoint", None), caption_arch=getattr(args, "caption_arch", None),
        decoding=decoding, device=args.device, trust_checkpoint=args.trust_checkpoint,
        tiling=_config(args), options=options, progress=progress, command=args.job,
    )
    output = args.output or args.inputs[0]
    summary = f"{len(frame)} tile(s) in {output} now carry the results of {args.job}"
    progress.finish(summary, tiles=len(frame), output=str(output))
    if not args.quiet and progress.mode != "json":
        print(summary, file=sys.stderr)
    return 0


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
        err: HqrsError = Cancelled(
            "cancelled; outputs were left as they were before this run (finished model results are kept "
            "in <layer>.hqrs-partial.sqlite and skipped when you run the same command again)"
        )
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
