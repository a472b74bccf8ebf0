"""Few-shot detection: "find all of these" from a handful of positive and negative tiles.

A light classifier is fitted on the stored embeddings of the labelled tiles and then scores
every tile of the layer or dataset. Both methods end in the same form, a direction ``v`` and an
affine map of the cosine score: ``probability = sigmoid(scale * (x . v) + bias)``, so scoring
every tile is one matrix-vector pass over the stored embeddings with the search kernels
(:meth:`~hqrs_geo.search.exact.ExactSearch.scores`: the layer's matrix, a dataset part by part;
an IVF-PQ dataset is scored on its stored embeddings, not on the compressed codes) and a refit
costs milliseconds (it sees only the labelled tiles).

The two methods:

* ``"logistic"`` (default): L2-regularised logistic regression (intercept not penalised) with
  class-balance weights (each class weighs half of the labelled rows, so the probability's
  prior is 1/2 whatever the numbers of positives and negatives), solved by Newton's method
  (IRLS) in numpy: ``minimise sum_i s_i log(1 + exp(-y_i (w . x_i + b))) + ||w||^2 / (2 C)``.
  :data:`BACKGROUND` unlabelled tiles drawn at random (a fixed seed, so every refit of a layer
  draws the same tiles; the labelled ones left out) join the negatives as *weak* negatives: most
  tiles of a scene are not the wanted class, so they teach the classifier what "anything else"
  looks like. Some of them may in fact be positives, so they are weak: with real negatives given,
  the weak ones weigh half of the negative class and the real ones the other half (two rejected
  hits count as much as 256 random tiles), without real negatives they are the negative class.
  ``background=0`` leaves them out (then at least one real negative is needed).
* ``"query"``: no training, the query vector ``q = 2 mean(pos) - mean(neg)`` (normalised; the
  weak negatives stand in when no negative is given), scored by cosine ``s = x . q``.
  Its probability is a stated rule: a logistic curve of ``s`` that is 1/2 halfway between the
  mean score of the positives and of the negatives, 0.9 at the positives' mean and 0.1 at the
  negatives' mean (``scale = 2 ln 9 / (mean_pos - mean_neg)``). It only orders tiles as the
  vector does; treat its probability as a rough guide.

Probabilities are those of the balanced problem: read them as "how much more like the
positives than the negatives", with 0.5 as the natural threshold.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import OptionError
from ..layer.io import read_runs
from ..layer.runs import new_run
from .exact import read_rows
from .marked import TILES, marked_ids
from .session import BaseSession, Block

METHODS = ("logistic", "query")
#: Inverse L2 strength of the logistic regression (sklearn's ``C`` for the class-balanced loss).
#: Measured (benchmarks/fewshot.py, hqrs-mini-clip): C from 0.3 to 3 rank alike, 10 ranks worse
#: (10-shot mean AP 0.02-0.03 lower) and smaller C squeezes every probability toward 0.5; 3 keeps
#: the ranking and a usable spread of probabilities.
DEFAULT_C = 3.0
#: Unlabelled tiles drawn as weak negatives.
BACKGROUND = 512
#: Seed of the weak negatives' draw (fixed: refits of one layer draw the same tiles).
BACKGROUND_SEED = 20240
#: Most labelled tiles of one detector (positives plus negatives).
MAX_LABELS = 10_000


# ---------------------------------------------------------------------------------- the solver
def _sigmoid(z: np.ndarray) -> np.ndarray:
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    e = np.exp(z[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def _log1pexp(z: np.ndarray) -> np.ndarray:
    """``log(1 + exp(z))`` without overflow."""
    return np.logaddexp(0.0, z)


def fit_logistic(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, c: float = DEFAULT_C,
                 max_iter: int = 100, tol: float = 1e-10) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method: ``(w, b)`` minimising
    ``sum_i s_i log(1 + exp(-y_i (w . x_i + b))) + ||w||^2 / (2 c)`` for labels ``y`` in {0, 1}
    (the intercept ``b`` is not penalised; the same objective as scikit-learn's
    ``LogisticRegression(C=c)`` with sample weights ``s``).

    The problem is strictly convex (``c`` finite), so Newton steps with a backtracking line
    search converge in a handful of iterations; each costs one ``(D+1) x (D+1)`` solve.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    s = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if not (np.isfinite(c) and c > 0):
        raise OptionError(f"the regularisation C must be a positive number, not {c!r}", option="c")
    if n < d:  # the optimal w lies in the span of the rows: solve in that n-dimensional basis (same objective)
        basis, _ = np.linalg.qr(x.T)
        w, b = fit_logistic(x @ basis, y, s, c, max_iter, tol)
        return basis @ w, b
    xb = np.hstack([x, np.ones((n, 1))])
    sign = 2.0 * y - 1.0
    penalty = np.full(d + 1, 1.0 / c)
    penalty[-1] = 0.0
    theta = np.zeros(d + 1)

    def loss(t: np.ndarray) -> float:
        return float(s @ _log1pexp(-sign * (xb @ t)) + 0.5 * (penalty * t) @ t)

    current = loss(theta)
    for _ in range(max_iter):
        p = _sigmoid(xb @ theta)
        grad = xb.T @ (s * (p - y)) + penalty * theta
        hess = (xb * (s * p * (1 - p))[:, None]).T @ xb + np.diag(penalty)
        hess[-1, -1] += 1e-12 * max(1.0, float(s.sum()))  # a separable set with one class cannot move b forever
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        decrease = float(grad @ step)
        if decrease < tol * max(1.0, abs(current)):
            break
        t = 1.0
        while True:
            candidate = theta - t * step
            value = loss(candidate)
            if value <= current - 1e-4 * t * decrease or t < 1e-8:
                break
            t *= 0.5
        theta, current = candidate, value
    return theta[:-1], float(theta[-1])


def label_weights(positives: int, negatives: int, weak: int) -> np.ndarray:
    """Sample weights of ``positives``, then ``negatives``, then ``weak`` negatives (in that
    order): each class weighs half of the total; within the negatives, real and weak ones weigh
    half each when both are present."""
    total = positives + negatives + weak
    half = total / 2.0
    if negatives and weak:
        neg, bg = half / 2 / negatives, half / 2 / weak
    else:
        neg = bg = half / max(negatives + weak, 1)
    return np.concatenate([np.full(positives, half / max(positives, 1)), np.full(negatives, neg), np.full(weak, bg)])


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Sample weights giving each class half of the total (scikit-learn's ``class_weight="balanced"``)."""
    y = np.asarray(y)
    n = len(y)
    out = np.empty(n)
    for value in (0, 1):
        count = int((y == value).sum())
        if count:
            out[y == value] = n / (2.0 * count)
    return out


# ---------------------------------------------------------------------------------- the detector
@dataclass
class Detector:
    """A fitted detector: ``probability = sigmoid(scale * (x . vector) + bias)``."""

    method: str
    vector: np.ndarray  # (D,) float32
    scale: float
    bias: float
    positives: list[str]
    negatives: list[str]
    background: int = 0  # weak negatives drawn
    fit_seconds: float = 0.0

    def probability(self, cosine: np.ndarray) -> np.ndarray:
        """Probabilities from the scores ``x . vector`` (NaN stays NaN)."""
        return _sigmoid(np.asarray(cosine, dtype=np.float64) * self.scale + self.bias)

    def labels(self) -> dict[str, int]:
        """``{tile_id: 1 | -1}`` of the training tiles."""
        return {**{t: -1 for t in self.negatives}, **{t: 1 for t in self.positives}}


def blocks(session: BaseSession) -> list[Block]:
    """The embedding matrices of a search session, in search order (one per dataset part)."""
    return session.blocks()


def background_vectors(session: BaseSession, count: int, exclude: Sequence[str], seed: int) -> np.ndarray:
    """Stored embeddings of up to ``count`` tiles drawn at random (``seed``), none of ``exclude``."""
    parts = blocks(session)
    sizes = np.asarray([len(b.ids) for b in parts], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return np.zeros((0, 0), dtype=np.float32)
    rng = np.random.default_rng(seed)
    want = min(total, count + len(exclude))
    picks = np.sort(rng.choice(total, size=want, replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    skip = set(exclude)
    out = []
    for i, block in enumerate(parts):
        rows = picks[(picks >= starts[i]) & (picks < starts[i + 1])] - starts[i]
        if skip:
            rows = np.asarray([r for r in rows if block.id_at(int(r)) not in skip], dtype=np.int64)
        if len(rows):
            out.append(read_rows(block.matrix, rows))
    vectors = np.concatenate(out) if out else np.zeros((0, parts[0].matrix.shape[1]), dtype=np.float32)
    return vectors[:count]


def fit(session: BaseSession, positive: Sequence[str], negative: Sequence[str] = (), method: str = "logistic",
        c: float = DEFAULT_C, background: int = BACKGROUND) -> Detector:
    """Fit a detector on the stored embeddings of the labelled tiles of ``session`` (see the
    module docstring; ``background``: weak negatives to draw); one-line errors for no positive,
    unknown ids, a tile in both lists."""
    if method not in METHODS:
        raise OptionError(f"unknown method {str(method)[:40]!r}; use one of {', '.join(METHODS)}", option="method")
    start = time.perf_counter()
    positive, negative = marked_ids(positive, negative, TILES, limit=MAX_LABELS)
    pos = session.tile_vectors(positive)
    if isinstance(background, bool) or not isinstance(background, (int, np.integer)) or background < 0:
        raise OptionError(f"background must be a whole number of tiles >= 0, not {background!r}",
                          option="background")
    neg = session.tile_vectors(negative) if negative else np.zeros((0, pos.shape[1]), dtype=np.float32)
    weak = np.zeros((0, pos.shape[1]), dtype=np.float32)
    if background and (method == "logistic" or not negative):
        weak = background_vectors(session, int(background), positive + negative, BACKGROUND_SEED)
    drawn = len(weak)
    if not negative and not drawn:
        raise OptionError("no negative to learn from: mark some tiles as negatives (every other tile is a "
                          "positive, or no weak negatives were asked for)", option="negative")
    if method == "query":
        neg = neg if negative else weak
        q = 2.0 * pos.mean(axis=0) - neg.mean(axis=0)
        norm = float(np.linalg.norm(q))
        if norm == 0 or not math.isfinite(norm):
            raise OptionError("the positives and negatives average to the same vector; give other examples",
                              option="positive")
        q = q / norm
        mean_pos, mean_neg = float((pos @ q).mean()), float((neg @ q).mean())
        gap = max(mean_pos - mean_neg, 1e-6)
        scale = 2.0 * math.log(9.0) / gap
        detector = Detector("query", q.astype(np.float32), scale, -scale * (mean_pos + mean_neg) / 2, positive,
                            negative, drawn)
    else:
        x = np.concatenate([pos, neg, weak])
        y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg) + len(weak))])
        w, b = fit_logistic(x, y, label_weights(len(pos), len(neg), len(weak)), c)
        norm = float(np.linalg.norm(w))
        if norm == 0:
            raise OptionError("the classifier learned nothing from these examples; give other examples",
                              option="positive")
        detector = Detector("logistic", (w / norm).astype(np.float32), norm, b, positive, negative, drawn)
    detector.fit_seconds = time.perf_counter() - start
    return detector


# ---------------------------------------------------------------------------------- scoring
@dataclass
class Detection:
    """The tiles of one detection pass: the best ``k`` at or above the threshold, and counts."""

    detector: Detector
    threshold: float
    hits: list[tuple[float, int, int]] = field(default_factory=list)  # (probability, block, row), best first
    tiles: int = 0  # tiles scored
    above: int = 0  # tiles at or over the threshold
    score_seconds: float = 0.0

    def summary(self) -> dict:
        """The ``detector`` object of the serve-search answer."""
        d = self.detector
        return {"method": d.method, "positives": len(d.positives), "negatives": len(d.negatives),
                "background": d.background, "tiles": self.tiles, "above": self.above, "threshold": self.threshold,
                "fit_seconds": round(d.fit_seconds, 4), "score_seconds": round(self.score_seconds, 4)}


def cosines(session: BaseSession, detector: Detector, spatial: Any = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(block number, x . vector of its rows)`` for every block (NaN where filtered out), one
    block at a time: memory stays that of one part's scores."""
    parts = blocks(session)
    query = detector.vector[None, :].astype(np.float32)
    for i, (block, mask) in enumerate(zip(parts, session.block_masks(spatial))):
        if mask is False or len(block.ids) == 0:
            continue
        yield i, block.exact.scores(query, mask if isinstance(mask, np.ndarray) else None)


def probabilities(session: BaseSession, detector: Detector, spatial: Any = None) -> Iterator[tuple[int, np.ndarray]]:
    """``(block number, probabilities of its rows)`` for every block (NaN where filtered out)."""
    for i, cosine in cosines(session, detector, spatial):
        yield i, detector.probability(cosine)


def _cosine_cut(detector: Detector, threshold: float) -> float:
    """A cosine below which no row can reach ``threshold`` (a little below the exact cut: rows
    between it and the cut are decided by their computed probability)."""
    if threshold <= 0:
        return -math.inf
    logit = 40.0 if threshold >= 1 else math.log(threshold / (1 - threshold))  # sigmoid(40) rounds to 1
    return (logit - 1e-6 - detector.bias) / detector.scale - 1e-6


def check_threshold(threshold: Any) -> float:
    """The threshold as a float in 0..1 (one-line error otherwise)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise OptionError(f"threshold must be a probability in 0..1, not {threshold!r}", option="threshold")
    return float(threshold)


def score(session: BaseSession, detector: Detector, k: int | None = 1000, threshold: float = 0.5,
          spatial: Any = None) -> Detection:
    """Score every tile (passing ``spatial``); keep the best ``k`` (None: all) at or above ``threshold``."""
    threshold = check_threshold(threshold)
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise OptionError(f"invalid k {k!r}: ask for at least one tile", option="k")
    start = time.perf_counter()
    found = Detection(detector, threshold)
    kept: list[tuple[np.ndarray, int, np.ndarray]] = []
    cut = _cosine_cut(detector, threshold)
    for i, cosine in cosines(session, detector, spatial):
        found.tiles += int(np.count_nonzero(~np.isnan(cosine)))
        rows = np.flatnonzero(cosine >= cut)  # NaN (filtered out) is never >=
        prob = detector.probability(cosine[rows])  # probabilities of the candidates only
        keep = prob >= threshold
        rows, prob = rows[keep], prob[keep]
        found.above += len(rows)
        if k is not None and len(rows) > k:
            kth = np.partition(prob, len(prob) - k)[len(prob) - k]
            best = prob >= kth  # ties at the k-th kept: the merge below orders them by block and row
            rows, prob = rows[best], prob[best]
        kept.append((prob, i, rows))
    if kept:
        probs = np.concatenate([p for p, _, _ in kept])
        which = np.concatenate([np.full(len(r), i) for _, i, r in kept])
        rows = np.concatenate([r for _, _, r in kept])
        order = np.lexsort((rows, which, -probs))[:k]
        found.hits = [(float(probs[j]), int(which[j]), int(rows[j])) for j in order]
    found.score_seconds = time.perf_counter() - start
    return found


def result_frame(session: BaseSession, detection: Detection) -> Any:
    """The hits as a GeoDataFrame (the tile columns, ``score`` = probability, ``rank``,
    ``train_label`` = the tile's own training label 1 / -1 or None)."""
    frame = session.block_rows(detection.hits)
    frame = frame.drop(columns=[c for c in frame.columns if str(c).startswith("emb_")])
    labels = detection.detector.labels()
    frame["train_label"] = pd.Series([labels.get(str(t)) for t in frame["tile_id"]], index=frame.index, dtype=object)
    return frame


def detect(session: BaseSession, positive: Sequence[str], negative: Sequence[str] = (), method: str = "logistic",
           k: int | None = 1000, threshold: float = 0.5, spatial: Any = None, c: float = DEFAULT_C,
           background: int = BACKGROUND) -> tuple[Any, Detection]:
    """Fit and score in one call: ``(result GeoDataFrame, Detection)``."""
    detector = fit(session, positive, negative, method, c, background)
    detection = score(session, detector, k, threshold, spatial)
    return result_frame(session, detection), detection


# ---------------------------------------------------------------------------------- saved labels
LABELS_COMMAND = "labels"


def saved_labels(path: str) -> dict:
    """The labels last saved with the layer or dataset ``path``: ``{"positive", "negative",
    "name"}`` (empty lists and None when none were saved)."""
    return read_runs(path).labels()


def save_labels(session: BaseSession, positive: Sequence[str], negative: Sequence[str] = (), name: str | None = None
                ) -> int:
    """Save labels with the session's layer (a run record ``labels``; a dataset's manifest);
    returns how many. Ids are checked against the layer first (one-line errors)."""
    positive, negative = list(dict.fromkeys(positive)), list(dict.fromkeys(negative))
    both = set(positive) & set(negative)
    if both:
        raise OptionError(f"tile {sorted(both)[0]!r} is both positive and negative; keep it in one list",
                          option="negative")
    if name is not None and (not isinstance(name, str) or len(name) > 200):
        raise OptionError("the detector name must be a text of at most 200 characters", option="name")
    if positive or negative:
        session.tile_vectors(positive + negative)  # unknown ids: the one-line error
    params = {"positive": positive, "negative": negative, "name": name, "model": session.source.model}
    session.record_run(new_run(LABELS_COMMAND, "tiles", params))
    return len(positive) + len(negative)
