"""``hqrs_geo.change``: compare two dates tile by tile and write the change layer.

Two passes over the BEFORE date's blocks (the layer file, or one dataset part at a time):
the first pairs the tiles and measures every pair's cosine distance, which calibrates each
reference scene (:class:`~hqrs_geo.compare.scores.Calibration`) and collects the labelled pairs
of few-shot change; the second computes every column and collects the change layer, which is
then written atomically with a run record (:mod:`hqrs_geo.layer.io`).
"""
from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from ..errors import OptionError
from ..layer.columns import CAPTION, PROVENANCE_COLUMNS, SOURCE, TILE_COLUMNS, TILE_ID
from ..layer.runs import new_run
from ..search.fewshot import BACKGROUND, BACKGROUND_SEED
from ..search.marked import PAIRS, marked_ids
from .dates import Block, DateLayer, forget
from .inputs import (
    Date,
    Embeddings,
    check_overlap,
    choose_model,
    complete_results,
    date_layers,
    no_pairs,
    resolve_dates,
    same_model,
)
from .output import check_output, open_sink
from .pairs import pair_tiles
from .scores import Calibration, competition_rank, cosine_distance, fit_change_detector, pair_features, text_change

#: The columns of a change layer after the BEFORE tile's own (see docs/change.md).
CHANGE_COLUMNS = ("after_tile_id", "overlap", "compared", "change_cosine", "change_score", "change_pct", "changed",
                  "change_rank")
CHANGE_COMMAND = "change"
ARROW = " → "


# ------------------------------------------------------------------------------------ checks
def _number(value: Any, name: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (low is not None and value < low) or (high is not None and value > high):
        rule = f"in {low:g}..{high:g}" if low is not None and high is not None else "a finite number"
        raise OptionError(f"{value!r} is not a valid {name}; give a number {rule}", option=name)
    return float(value)


def _text(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise OptionError("the text is empty; describe what the tiles became or stopped being", option=name)
    return value.strip()


# ------------------------------------------------------------------------------------ pairs of a block
@dataclass
class PairedBlock:
    """A BEFORE block with its AFTER partners and the vectors of its compared pairs."""

    block: Block
    after_id: np.ndarray  # object: the partner's tile id or None
    overlap: np.ndarray  # float
    compared: np.ndarray  # bool
    rows: np.ndarray  # the compared rows
    before: np.ndarray  # (len(rows), D) float32
    after: np.ndarray  # (len(rows), D) float32
    after_caption: np.ndarray  # object: the partner's caption or None
    d: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def sources(self) -> np.ndarray:
        """The reference scene of each compared row."""
        return self.block.frame[SOURCE].to_numpy()[self.rows].astype(str)


def pair_block(block: Block, after: DateLayer, min_overlap: float) -> PairedBlock:
    """Pair a BEFORE block with the AFTER tiles of the same footprints."""
    frame = block.frame
    n = len(frame)
    candidates = after.blocks_over(tuple(frame.total_bounds), frame.crs) if n else []
    candidates = [c for c in candidates if len(c.frame)]
    after_id = np.full(n, None, dtype=object)
    after_caption = np.full(n, None, dtype=object)
    overlap = np.zeros(n)
    compared = np.zeros(n, dtype=bool)
    dim = after.session.index.dim
    empty = np.zeros((0, dim), dtype=np.float32)
    if not candidates:
        return PairedBlock(block, after_id, overlap, compared, np.zeros(0, np.int64), empty, empty, after_caption)
    keep = [TILE_ID, "valid_fraction", candidates[0].frame.geometry.name]
    joined = gpd.GeoDataFrame(pd.concat([c.frame[keep] for c in candidates], ignore_index=True),
                              geometry=candidates[0].frame.geometry.name, crs=candidates[0].frame.crs)
    offsets = np.cumsum([0, *[len(c.frame) for c in candidates]])
    row = pair_tiles(frame, joined).after_row
    paired = np.flatnonzero(row >= 0)
    which = np.searchsorted(offsets, row[paired], side="right") - 1
    local = row[paired] - offsets[which]
    after_id[paired] = joined[TILE_ID].to_numpy()[row[paired]]
    a_valid = joined["valid_fraction"].to_numpy(dtype=float)[row[paired]]
    b_valid = frame["valid_fraction"].to_numpy(dtype=float)[paired]
    overlap[paired] = np.nan_to_num(np.minimum(a_valid, b_valid))
    a_has = np.zeros(len(paired), dtype=bool)
    for w, candidate in enumerate(candidates):
        sel = which == w
        a_has[sel] = candidate.vec_row[local[sel]] >= 0
        if CAPTION in candidate.frame.columns:
            captions = candidate.frame[CAPTION].to_numpy(dtype=object)[local[sel]]
            after_caption[paired[sel]] = [c if isinstance(c, str) else None for c in captions]
    ok = a_has & block.has_vector[paired] & (overlap[paired] >= min_overlap)
    compared[paired[ok]] = True
    rows = paired[ok]
    before = block.vectors(rows)
    after_vectors = np.zeros((len(rows), before.shape[1] if len(rows) else dim), dtype=np.float32)
    for w in np.unique(which[ok]):
        sel = which[ok] == w
        after_vectors[sel] = candidates[w].vectors(local[ok][sel])
    found = PairedBlock(block, after_id, overlap, compared, rows, before, after_vectors, after_caption)
    found.d = cosine_distance(before, after_vectors) if len(rows) else np.zeros(0)
    return found


# ------------------------------------------------------------------------------------ the comparison
@dataclass
class Queries:
    """What is asked besides the change score: texts, classes, labelled pairs."""

    became: np.ndarray | None = None
    stopped: np.ndarray | None = None
    zero_shot: Any = None
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)


class Comparison:
    """The two dates and the statistics of the first pass."""

    def __init__(self, before: DateLayer, after: DateLayer, min_overlap: float, queries: Queries):
        self.before, self.after, self.min_overlap, self.queries = before, after, min_overlap, queries
        self.calibrations: dict[str, Calibration] = {}
        self.z_pool = np.zeros(0)
        self.pools: dict[str, np.ndarray] = {}
        self.detector: Any = None
        self.counts = {"tiles": 0, "paired": 0, "compared": 0}

    def paired_blocks(self) -> Iterator[PairedBlock]:
        """Every BEFORE block paired (one at a time)."""
        for block in self.before.blocks():
            yield pair_block(block, self.after, self.min_overlap)

    def calibrate(self, progress: Any = None) -> None:
        """First pass: distances per reference scene, text-score pools, labelled pairs."""
        by_scene: dict[str, list[np.ndarray]] = {}
        texts: dict[str, list[np.ndarray]] = {"became": [], "stopped": []}
        q = self.queries
        labelled = {t: None for t in q.positive + q.negative}
        known: set[str] = set()
        weak_keys, weak = np.zeros(0), np.zeros((0, 0), np.float32)
        if progress is not None:
            progress.start("compare", max(len(self.before.part_names()), 1), unit="part")
        for paired in self.paired_blocks():
            frame = paired.block.frame
            self.counts["tiles"] += len(frame)
            self.counts["paired"] += int(sum(v is not None for v in paired.after_id))
            self.counts["compared"] += len(paired.rows)
            for source in np.unique(paired.sources):
                by_scene.setdefault(source, []).append(paired.d[paired.sources == source])
            for name in ("became", "stopped"):
                vector = getattr(q, name)
                if vector is not None and len(paired.rows):
                    texts[name].append(self._text_scores(name, vector, paired))
            if labelled:
                ids = frame[TILE_ID].astype(str).to_numpy()
                known.update(t for t in ids if t in labelled)
                at = {t: i for i, t in enumerate(ids[paired.rows])}
                for tile in labelled:
                    if tile in at:
                        labelled[tile] = pair_features(paired.before[[at[tile]]], paired.after[[at[tile]]])[0]
                if len(paired.rows):  # weak negatives: the pairs with the smallest keys
                    keys = _draw_keys(ids[paired.rows], BACKGROUND_SEED)
                    free = np.asarray([t not in labelled for t in ids[paired.rows]], dtype=bool)
                    feats = pair_features(paired.before[free], paired.after[free])
                    weak_keys = np.concatenate([weak_keys, keys[free]])
                    weak = feats if not len(weak) else np.concatenate([weak, feats])
                    keep = np.argsort(weak_keys, kind="stable")[:BACKGROUND]
                    weak_keys, weak = weak_keys[keep], weak[keep]
            if progress is not None:
                progress.advance(1)
        self.calibrations = {s: Calibration.of(np.concatenate(d)) for s, d in by_scene.items()
                             if sum(len(x) for x in d)}
        self.z_pool = np.sort(np.concatenate([c.z(c.values) for c in self.calibrations.values()])
                              if self.calibrations else np.zeros(0))
        self.pools = {name: np.sort(np.concatenate(v)) for name, v in texts.items() if v}
        if labelled:
            self.detector = self._fit(labelled, known, weak)

    def _text_scores(self, name: str, vector: np.ndarray, paired: PairedBlock) -> np.ndarray:
        up = text_change(vector, paired.before, paired.after)
        return up if name == "became" else -up

    def _fit(self, labelled: dict, known: set[str], weak: np.ndarray) -> Any:
        q = self.queries
        for tile in q.positive + q.negative:
            if tile not in known:
                raise OptionError(f"unknown tile id {tile[:80]!r} in {self.before.path}; mark BEFORE tile ids",
                                  option="positive" if tile in q.positive else "negative")
            if labelled[tile] is None:
                raise OptionError(f"tile {tile[:80]!r} was not compared (no AFTER tile of its footprint, too little "
                                  "valid overlap, or no embedding); mark compared pairs only",
                                  option="positive" if tile in q.positive else "negative")
        positives = np.stack([labelled[t] for t in q.positive])
        negatives = np.stack([labelled[t] for t in q.negative]) if q.negative else \
            np.zeros((0, positives.shape[1]), np.float32)
        if not len(weak):
            weak = np.zeros((0, positives.shape[1]), np.float32)
        return fit_change_detector(positives, negatives, weak, q.positive, q.negative)

    def columns(self, paired: PairedBlock, threshold: float, captions: bool) -> Any:
        """The change layer's rows of one BEFORE block."""
        frame = paired.block.frame
        keep = [c for c in (*TILE_COLUMNS, *PROVENANCE_COLUMNS) if c in frame.columns]
        out = frame[keep + [frame.geometry.name]].copy()
        n, rows = len(frame), paired.rows
        out["after_tile_id"] = paired.after_id
        out["overlap"] = paired.overlap
        out["compared"] = paired.compared
        cosine, score, pct = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
        cosine[rows] = paired.d
        sources = paired.sources
        for source in np.unique(sources):
            sel = sources == source
            calibration = self.calibrations[source]
            score[rows[sel]] = calibration.z(paired.d[sel])
            pct[rows[sel]] = calibration.percentile(paired.d[sel])
        out["change_cosine"], out["change_score"], out["change_pct"] = cosine, score, pct
        out["changed"] = paired.compared & (np.nan_to_num(score, nan=-np.inf) >= threshold)
        out["change_rank"] = _ranks(n, rows, score[rows], self.z_pool)
        if captions:
            caps = frame[CAPTION] if CAPTION in frame.columns else [None] * n
            out["caption_before"] = [c if isinstance(c, str) else None for c in caps]
            out["caption_after"] = paired.after_caption
        q = self.queries
        if q.zero_shot is not None:
            before_class, after_class = np.full(n, None, dtype=object), np.full(n, None, dtype=object)
            if len(rows):
                before_class[rows] = q.zero_shot.label(paired.before)[0]
                after_class[rows] = q.zero_shot.label(paired.after)[0]
            out["class_before"], out["class_after"] = before_class, after_class
            out["class_change"] = [None if b is None else ("" if b == a else f"{b}{ARROW}{a}")
                                   for b, a in zip(before_class, after_class)]
        for name in ("became", "stopped"):
            vector = getattr(q, name)
            if vector is None:
                continue
            values = np.full(n, np.nan)
            if len(rows):
                values[rows] = self._text_scores(name, vector, paired)
            out[f"{name}_score"] = values
            out[f"{name}_rank"] = _ranks(n, rows, values[rows], self.pools.get(name, np.zeros(0)))
        if self.detector is not None:
            prob = np.full(n, np.nan)
            if len(rows):
                prob[rows] = self.detector.probability(pair_features(paired.before, paired.after)
                                                       @ self.detector.vector)
            out["change_prob"] = prob
        return out


def _draw_keys(tile_ids: np.ndarray, seed: int) -> np.ndarray:
    """A pseudo-random key in [0, 1) per tile, from its id alone: the same pairs are drawn as weak
    negatives however the tiles are split into parts or ordered."""
    return np.fromiter((zlib.crc32(f"{seed}:{t}".encode()) for t in tile_ids), dtype=np.float64,
                       count=len(tile_ids)) / 2.0**32


def _ranks(n: int, rows: np.ndarray, values: np.ndarray, pool: np.ndarray) -> Any:
    rank = pd.array([None] * n, dtype="Int64")
    if len(rows):
        rank[rows] = competition_rank(values, pool)
    return rank


# ------------------------------------------------------------------------------------ the function
def change(before: Any, after: Any, output: str | os.PathLike, *, model: str | None = None,
           caption_model: str | None | bool = None, captions: bool = True, classes: Sequence[str] | None = None,
           became: str | None = None, stopped: str | None = None, positive: Sequence[str] = (),
           negative: Sequence[str] = (), threshold: float = 3.0, min_overlap: float = 0.5, tiling: Any = None,
           device: str = "auto", progress: Any = None, checkpoint: str | None = None,
           caption_checkpoint: str | None = None, options: Any = None, decoding: Any = None) -> Any:
    """Compare two dates of the same place tile by tile; write and return the change layer.

    ``before`` / ``after``: rasters (paths, globs, URLs… tiled: BEFORE with ``tiling``, AFTER on
    BEFORE's footprints, into ``<stem>-before`` / ``<stem>-after`` layers beside ``output``), or
    tile layers, or dataset folders (compared part by part). Embeddings (of one model for both
    dates: ``model``, else the one they were made with, else the default) and, with
    ``captions``, captions (``caption_model``, ``False``: none) are computed where missing.

    ``output``: the change layer (``.gpkg``, ``.parquet``, ``.fgb``), one row per BEFORE tile,
    returned as written (GeoDataFrame); for a BEFORE dataset also a folder, written part by part
    (returns ``{"output", "parts", "tiles", "paired", "compared", "changed"}``);
    its columns are listed in docs/change.md: ``change_cosine`` (1 - cosine of the two dates'
    embeddings), ``change_score`` (its robust z-score within the reference scene: a shift of the
    whole scene is absorbed), ``change_pct``, ``changed`` (``change_score >= threshold``),
    ``change_rank``; ``caption_before``/``caption_after``; ``class_before``/``class_after``/
    ``class_change`` for ``classes``; ``became_score``/``became_rank`` and
    ``stopped_score``/``stopped_rank`` for the texts ``became``/``stopped``; ``change_prob``
    for few-shot change (``positive``/``negative``: BEFORE tile ids of pairs marked changed /
    unchanged). Pairs whose valid overlap is below ``min_overlap`` are not compared.
    ``checkpoint``, ``caption_checkpoint``, ``options`` (:class:`~hqrs_geo.engine.options.RunOptions`)
    and ``decoding`` apply to results computed here.
    """
    threshold = _number(threshold, "threshold")
    min_overlap = _number(min_overlap, "min_overlap", 0.0, 1.0)
    became, stopped = _text(became, "became"), _text(stopped, "stopped")
    positive, negative = marked_ids(positive, negative, PAIRS, required=False)
    if caption_model is False:
        captions, caption_model = False, None
    if caption_model is True:
        caption_model = None
    b_in, a_in = resolve_dates(before, after)  # the entry: each date's input resolved once
    check_output(output, b_in)
    try:
        b, a = _open_dates(b_in, a_in, output, tiling, progress, model, checkpoint, caption_model,
                           caption_checkpoint, captions, device, options, decoding)
    finally:
        forget()
    b_path, a_path = b.path, a.path
    queries = Queries(positive=positive, negative=negative)
    if became is not None:
        queries.became = b.session.text_query(became)
    if stopped is not None:
        queries.stopped = b.session.text_query(stopped)
    if classes is not None:
        queries.zero_shot = b.session.zero_shot(list(classes), None, 1)
    comparison = Comparison(b, a, min_overlap, queries)
    comparison.calibrate(progress)
    if comparison.counts["tiles"] and not comparison.counts["paired"]:
        raise no_pairs(b_path, a_path)
    sink = open_sink(output, b)
    calibration = {s: c.as_dict() for s, c in comparison.calibrations.items()}
    params: dict[str, Any] = {
        "before": b_path, "after": a_path, "model": b.source.model, "threshold": threshold,
        "min_overlap": min_overlap, "median": {s: c["median"] for s, c in calibration.items()},
        "mad": {s: c["mad"] for s, c in calibration.items()}, "calibration": calibration,
        "counts": dict(comparison.counts), "became": became, "stopped": stopped,
        "classes": list(queries.zero_shot.labels) if classes else None, "positive": positive,
        "negative": negative, "scenes": b.scenes()}
    if progress is not None:
        progress.start("write", comparison.counts["tiles"])
    for paired in comparison.paired_blocks():
        sink.add(paired.block.name, comparison.columns(paired, threshold, captions),
                 new_run(CHANGE_COMMAND, "tiles", params))
        if progress is not None:
            progress.advance(len(paired.block.frame))
    params["counts"]["changed"] = sink.changed()
    return sink.finish(new_run(CHANGE_COMMAND, "tiles", params))


def _open_dates(before: Date, after: Date, output: Any, tiling: Any, progress: Any, model: str | None,
                checkpoint: str | None, caption_model: Any, caption_checkpoint: str | None, captions: bool,
                device: str, options: Any, decoding: Any) -> tuple[DateLayer, DateLayer]:
    """The two dates, made from rasters where needed, with the results the comparison needs."""
    b_layer, a_layer = date_layers(before, after, output, tiling, progress)
    for layer in (b_layer, a_layer):
        if os.path.abspath(str(layer.path).rstrip("/")) == os.path.abspath(str(output)):
            raise OptionError(f"{output}: is a date layer of this comparison; write the change layer to another file",
                              option="output")
    check_overlap(b_layer, a_layer)
    embedded = Embeddings(b_layer), Embeddings(a_layer)
    choice = choose_model(*embedded, model, checkpoint)
    for date in embedded:
        complete_results(date, choice, caption_model if isinstance(caption_model, str) else None,
                         caption_checkpoint, captions, device, options, decoding, progress)
    b = DateLayer(b_layer, model=choice.name, device=device)
    a = DateLayer(a_layer, model=choice.name, device=device)
    if not same_model(b.source, a.source):
        raise OptionError(f"{b.path} was embedded by {b.source.model}, {a.path} by {a.source.model}; both dates must "
                          "be embedded by the same model: give «model» to embed both with one", option="model")
    return b, a


__all__ = ["CHANGE_COLUMNS", "CHANGE_COMMAND", "change"]
