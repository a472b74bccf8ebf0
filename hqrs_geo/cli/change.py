"""``hqrs-geo change``: compare two dates tile by tile and write the change layer."""
from __future__ import annotations

import argparse
import json
import math
from typing import Any

from ..compare import change
from ..layer.io import read_tiles
from ..search.labels import read_lines
from ..tiling.config import TileConfig
from .options import add_progress_options, add_tiling_options, finish, number, tile_config

#: Python parameter names whose command-line flag is not ``--name-with-dashes``.
FLAGS = {"positive": "--pos", "negative": "--neg", "output": "-o", "k": "-k", "classes": "--labels",
         "before": "BEFORE", "after": "AFTER"}


def register(sub: Any) -> None:
    """Add the ``change`` command."""
    change = sub.add_parser("change", help="compare two dates tile by tile: a change layer with scores, captions "
                                           "and classes of both dates")
    change.add_argument("before", help="the earlier date: a raster (path, URL, quoted glob, folder) or a tile layer "
                                       "or dataset folder")
    change.add_argument("after", help="the later date, as BEFORE (rasters are tiled on BEFORE's tiles)")
    change.add_argument("-o", "--output", required=True, help="the change layer: .gpkg, .parquet or .fgb (a folder "
                                                             "DATASET/ when BEFORE is a dataset)")
    group = change.add_argument_group("what to look for")
    group.add_argument("--became", default=None, metavar="TEXT", help="also score tiles that became TEXT")
    group.add_argument("--stopped", default=None, metavar="TEXT", help="also score tiles that stopped being TEXT")
    group.add_argument("--labels", default=None, help="comma-separated class names: zero-shot class of each date")
    group.add_argument("--labels-file", default=None, help="text file with one class name per line")
    group.add_argument("--pos", nargs="+", action="extend", default=[], metavar="ID",
                       help="BEFORE tile ids of pairs that changed: few-shot change probability (change_prob)")
    group.add_argument("--neg", nargs="+", action="extend", default=[], metavar="ID",
                       help="BEFORE tile ids of pairs that did not change (random pairs join them as weak ones)")
    group.add_argument("--threshold", type=number(float), default=3.0,
                       help="change_score (robust z within the scene) from which a pair counts as changed "
                            "(default 3.0)")
    group.add_argument("--min-overlap", type=number(float, 0, 1), default=0.5,
                       help="least valid fraction of both tiles for a pair to be compared (default 0.5)")
    models = change.add_argument_group("models")
    models.add_argument("--model", default=None, help="embedding model of both dates (default: the one they were "
                                                      "embedded with, else the default model)")
    models.add_argument("--checkpoint", default=None, help="checkpoint of --model")
    models.add_argument("--caption-model", default=None, help="caption model where captions are missing")
    models.add_argument("--caption-checkpoint", default=None, help="checkpoint of --caption-model")
    models.add_argument("--no-captions", action="store_true", help="no caption columns (and no captioning)")
    models.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    out = change.add_argument_group("printed results")
    out.add_argument("-k", type=number(int, 1, 1_000_000), default=None,
                     help="also print the N most changed tiles (by --became / --stopped when given)")
    out.add_argument("--json", action="store_true", help="print the most changed tiles as JSON (-k, default 20)")
    add_tiling_options(change)
    add_progress_options(change)
    change.set_defaults(func=run_change, option_flags=FLAGS)


def ranking(args: argparse.Namespace) -> str:
    """The column prefix that orders the printed tiles: became, stopped or change."""
    return "became" if args.became else "stopped" if args.stopped else "change"


def top_rows(layer: Any, prefix: str, k: int) -> list[dict]:
    """The ``k`` best compared tiles by ``<prefix>_rank`` as JSON-friendly dicts."""
    rank = f"{prefix}_rank"
    ranked = layer[layer[rank].notna()].sort_values([rank, "tile_id"]).head(k)
    rows = []
    for row in ranked.to_dict("records"):
        item: dict[str, Any] = {"rank": int(row[rank]), "tile_id": str(row["tile_id"]),
                                "after_tile_id": row.get("after_tile_id"), "score": _num(row.get(f"{prefix}_score")),
                                "change_score": _num(row.get("change_score")),
                                "change_cosine": _num(row.get("change_cosine")), "changed": bool(row["changed"])}
        for name in ("caption_before", "caption_after", "class_before", "class_after", "class_change", "change_prob"):
            if name in row:
                item[name] = _num(row[name]) if name == "change_prob" else row[name]
        rows.append(item)
    return rows


def _num(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def run_change(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo change``: the change layer, a summary, and the most changed tiles."""
    classes = args.labels.split(",") if args.labels else []
    if args.labels_file:
        classes += read_lines(args.labels_file, "labels file")
    tiling: TileConfig | None = tile_config(args)
    if tiling == TileConfig().validated():  # none given: AFTER rasters take BEFORE's own reading (bands, stretch)
        tiling = None
    layer = change(args.before, args.after, args.output, model=args.model, checkpoint=args.checkpoint,
                   caption_model=args.caption_model, caption_checkpoint=args.caption_checkpoint,
                   captions=not args.no_captions, classes=classes or None, became=args.became, stopped=args.stopped,
                   positive=args.pos, negative=args.neg, threshold=args.threshold, min_overlap=args.min_overlap,
                   tiling=tiling, device=args.device, progress=progress)
    prefix = ranking(args)
    k = args.k if args.k is not None else (20 if args.json else 0)
    if isinstance(layer, dict):  # a dataset written part by part: its counts, and its rows only to print some
        tiles, compared, changed = layer["tiles"], layer["compared"], layer["changed"]
        if k:
            layer = read_tiles(args.output)
    else:
        tiles = len(layer)
        compared = int(layer["compared"].sum()) if len(layer) else 0
        changed = int(layer["changed"].sum()) if len(layer) else 0
    rows = top_rows(layer, prefix, k) if k else []
    if args.json:
        print(json.dumps({"ranking": prefix, "results": rows}, ensure_ascii=False))
    elif rows and not args.quiet:
        print(f"{'rank':>4}  {'score':>7}  tile_id  (caption before → after; class change)")
        for row in rows:
            score = f"{row['score']:7.3f}" if row["score"] is not None else f"{'':>7}"
            extra = []
            if row.get("caption_before") or row.get("caption_after"):
                extra.append(f"{row.get('caption_before') or '-'} → {row.get('caption_after') or '-'}")
            if row.get("class_change"):
                extra.append(str(row["class_change"]))
            print(f"{row['rank']:>4}  {score}  {row['tile_id']}" + (f"  ({'; '.join(extra)})" if extra else ""))
    summary = (f"{compared} of {tiles} tile pairs compared, {changed} changed (change score >= "
               f"{args.threshold:g}); written to {args.output}")
    return finish(args, progress, summary, compared=compared, changed=changed, tiles=tiles,
                  output=str(args.output), threshold=args.threshold)
