"""``hqrs-geo detect``: few-shot detection from positive and negative example tiles."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from ..errors import OptionError
from ..layer.io import write_layer
from ..layer.runs import new_run
from ..search import fewshot
from ..search.fewshot import BACKGROUND, DEFAULT_C, METHODS, probabilities, saved_labels
from ..search.output import write_result_layer
from .options import number
from .search import _add_common, _session, _spatial

#: Python parameter names whose command-line flag is not ``--name-with-dashes``.
FLAGS = {"k": "-k", "positive": "--pos", "negative": "--neg", "output": "-o", "c": "--c"}
COLUMNS = ("detect_prob", "detect_rank")
DETECT_COMMAND = "detect"


def register(sub: Any) -> None:
    """Add the ``detect`` command."""
    detect = sub.add_parser("detect", help="find all tiles like the positive examples (few-shot classifier on the "
                                           "embeddings)")
    _add_common(detect, outputs=False)
    group = detect.add_argument_group("detection")
    group.add_argument("--pos", nargs="+", action="extend", default=[], metavar="ID",
                       help="positive example tile ids (what to find)")
    group.add_argument("--neg", nargs="+", action="extend", default=[], metavar="ID",
                       help="negative example tile ids (what not to find); random tiles join them as weak "
                            "negatives (--background)")
    group.add_argument("--labels-from", nargs="?", const="saved", default=None, metavar="LAYER",
                       help="use the labels saved with LAYER (alone or 'saved': the labels saved with this layer) "
                            "as well as --pos/--neg")
    group.add_argument("--save-labels", nargs="?", const="", default=None, metavar="NAME",
                       help="save the labels used with the layer (run record), optionally with a detector name")
    group.add_argument("--method", choices=METHODS, default="logistic",
                       help="logistic: L2 logistic regression (default); query: 2 mean(pos) - mean(neg), no training")
    group.add_argument("--threshold", type=number(float, 0, 1), default=0.5,
                       help="least probability of a detection (default 0.5)")
    group.add_argument("-k", type=number(int, 1, 10**9), default=None,
                       help="at most this many detections in -o (default: all at or above the threshold)")
    group.add_argument("--c", type=number(float, 0, 1e12, low_open=True), default=DEFAULT_C,
                       help=f"inverse L2 regularisation of the logistic regression (default {DEFAULT_C:g})")
    group.add_argument("--background", type=number(int, 0, 100_000), default=BACKGROUND,
                       help=f"unlabelled tiles drawn as weak negatives (default {BACKGROUND}; 0: none, give --neg)")
    group.add_argument("-o", "--output", default=None,
                       help="write the detections (tiles at or above the threshold) to this layer (.gpkg or "
                            ".parquet); without it, columns detect_prob and detect_rank are written into LAYER")
    group.add_argument("--json", action="store_true", help="print the detections as JSON")
    detect.set_defaults(func=run_detect, option_flags=FLAGS)


def labels_for(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``--pos``/``--neg`` plus the saved labels of ``--labels-from`` (explicit ones win)."""
    positive, negative = list(args.pos), list(args.neg)
    if args.labels_from is not None:
        source = args.layer if args.labels_from == "saved" else args.labels_from
        saved = saved_labels(source)
        if not saved["positive"] and not saved["negative"]:
            raise OptionError(f"{source}: has no saved labels; give --pos tile ids (and --save-labels to keep them)",
                              option="labels_from")
        explicit = set(positive) | set(negative)
        positive += [t for t in saved["positive"] if t not in explicit]
        negative += [t for t in saved["negative"] if t not in explicit]
    if not positive:
        raise OptionError("no positive tile; give --pos with the id of at least one tile like what to find",
                          option="positive")
    return positive, negative


def run_detect(args: argparse.Namespace, progress: Any) -> int:
    """``hqrs-geo detect``: fit, score every tile, write the detections."""
    positive, negative = labels_for(args)
    session = _session(args)
    if args.output is None:  # the columns go into the layer itself: refused early where they cannot
        session.check_columns("detection")
    spatial = _spatial(args)
    detector = fewshot.fit(session, positive, negative, args.method, args.c, args.background)
    params = {"method": args.method, "positive": detector.positives, "negative": detector.negatives,
              "threshold": args.threshold, "model": session.source.model, "background": detector.background,
              "filters": {k: v for k, v in vars(spatial).items() if v is not None}}
    detection = fewshot.score(session, detector, args.k, args.threshold, spatial)
    frame = fewshot.result_frame(session, detection)
    if args.output is not None:
        out = frame.drop(columns=[c for c in (*COLUMNS, "detect_label") if c in frame.columns])  # a former run's
        out = out.rename(columns={"score": "detect_prob", "rank": "detect_rank", "train_label": "detect_label"})
        written = write_result_layer(args.layer, out, "detections", params, args.output)
    else:
        write_columns(session, detector, spatial, params)
        written = f"{args.layer} (columns {', '.join(COLUMNS)})"
    if args.save_labels is not None:
        fewshot.save_labels(session, detector.positives, detector.negatives, args.save_labels or None)
    summary = detection.summary()
    if args.json:
        print(json.dumps({"detector": summary, "results": [
            {"rank": int(r["rank"]), "tile_id": str(r["tile_id"]), "probability": float(r["score"])}
            for r in frame.to_dict("records")]}))
    elif not args.quiet:
        print(f"{'rank':>4}  {'prob':>6}  tile_id")
        for r in frame.head(20).to_dict("records"):
            print(f"{int(r['rank']):>4}  {float(r['score']):6.3f}  {r['tile_id']}")
        weak = f" + {detector.background} weak" if detector.background else ""
        print(f"{summary['above']} of {summary['tiles']} tiles at or above {args.threshold:g} ({args.method}, "
              f"{len(detector.positives)} positive, {len(detector.negatives)} negative{weak}; fit "
              f"{summary['fit_seconds']:.3f} s, score {summary['score_seconds']:.3f} s)", file=sys.stderr)
        print(f"written: {written}", file=sys.stderr)
    return 0


def write_columns(session: Any, detector: Any, spatial: Any, params: dict) -> None:
    """``detect_prob`` (NaN where not scored) and ``detect_rank`` (1 = most likely) of every tile,
    written into the session's layer file (see :meth:`BaseSession.check_columns
    <hqrs_geo.search.session.BaseSession.check_columns>`); replaces only columns an earlier
    detect wrote."""
    opened = session.opened
    frame = opened.frame.copy()
    present = {str(c).lower() for c in frame.columns} & set(COLUMNS)
    if present and not any(run.get("command") == DETECT_COMMAND for run in opened.runs):
        raise OptionError(f"{session.layer}: already has a column {sorted(present)[0]!r} that no detect run wrote; "
                          "write the detections to another layer with -o", option="output")
    prob = np.full(len(frame), np.nan)
    for _, block in probabilities(session, detector, spatial):
        prob[session.rows] = block
    rank = np.full(len(frame), np.nan)
    scored = np.flatnonzero(~np.isnan(prob))
    order = scored[np.lexsort((scored, -prob[scored]))]
    rank[order] = np.arange(1, len(order) + 1)
    frame["detect_prob"] = prob
    frame["detect_rank"] = rank
    session.opened = write_layer(session.layer, frame, new_run(DETECT_COMMAND, "tiles", params), replace_all=True,
                                 known=opened)
