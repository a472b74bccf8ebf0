"""The numbers of a change layer, from the paired embeddings of two dates (numpy only).

* :func:`cosine_distance` – ``d = 1 - cos(before, after)`` per pair.
* :class:`Calibration` – the robust z-score of ``d`` within one reference scene,
  ``z = (d - median) / (1.4826 * MAD)``, and its percentile: most tiles of a scene did not change,
  so the median and the MAD describe the unchanged pairs, and a shift that touches every tile
  (season, sun, haze, another sensor) moves the median, not the scores.
* :func:`competition_rank` – 1 = highest, ties share a rank.
* :func:`text_change` – ``cos(text, after) - cos(text, before)`` (tiles that *became* the text).
* :func:`pair_features` and :func:`fit_change_detector` – few-shot change detection on the
  difference of the two dates' embeddings with the logistic detector of
  :mod:`hqrs_geo.search.fewshot`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import OptionError
from ..models.encode import normalise
from ..search.fewshot import DEFAULT_C, Detector, fit_logistic, label_weights

#: 1.4826 x MAD estimates the standard deviation of normally distributed values.
MAD_SCALE = 1.4826
#: sqrt(pi / 2) x the mean absolute deviation estimates it too (used when the MAD is 0).
MEAN_AD_SCALE = 1.2533
#: The least spread of ``d`` a scene is calibrated with: differences in cosine distance below
#: this (float16 rounding of stored embeddings is about 1e-4) never make a tile stand out.
MIN_SCALE = 1e-3


def cosine_distance(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """``1 - cosine`` of each row pair (rows are normalised first: stored float16 rounding)."""
    b, a = normalise(before), normalise(after)
    return (1.0 - np.einsum("ij,ij->i", b.astype(np.float64), a.astype(np.float64))).astype(np.float64)


@dataclass
class Calibration:
    """The distribution of ``d`` among the compared pairs of one reference scene."""

    median: float
    mad: float
    scale: float  # the denominator of the z-score
    values: np.ndarray  # d of every compared pair, sorted

    @classmethod
    def of(cls, d: np.ndarray) -> Calibration:
        """Calibration from the distances of a scene's compared pairs (at least one)."""
        values = np.sort(np.asarray(d, dtype=np.float64))
        median = float(np.median(values))
        deviation = np.abs(values - median)
        mad = float(np.median(deviation))
        scale = MAD_SCALE * mad
        if scale < MIN_SCALE:  # more than half the pairs identical: the mean deviation still sees the rest
            scale = max(MEAN_AD_SCALE * float(deviation.mean()), MIN_SCALE)
        return cls(median, mad, scale, values)

    def z(self, d: np.ndarray) -> np.ndarray:
        """Robust z-scores of distances ``d``."""
        return (np.asarray(d, dtype=np.float64) - self.median) / self.scale

    def percentile(self, d: np.ndarray) -> np.ndarray:
        """0..100: the share of the scene's compared pairs whose distance is at most ``d``."""
        return 100.0 * np.searchsorted(self.values, np.asarray(d, dtype=np.float64), side="right") / len(self.values)

    def as_dict(self) -> dict:
        """The run-record facts of the calibration."""
        return {"median": round(self.median, 6), "mad": round(self.mad, 6), "scale": round(self.scale, 6),
                "compared": int(len(self.values))}


def competition_rank(values: np.ndarray, pool_sorted: np.ndarray) -> np.ndarray:
    """Rank of each of ``values`` among ``pool_sorted`` (ascending), highest first: 1 + how many of
    the pool are larger (equal values share a rank)."""
    larger = len(pool_sorted) - np.searchsorted(pool_sorted, np.asarray(values, dtype=np.float64), side="right")
    return (larger + 1).astype(np.int64)


def text_change(text: np.ndarray, before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """``cos(text, after) - cos(text, before)`` per pair (``text``: one normalised vector)."""
    t = np.asarray(text, dtype=np.float64).ravel()
    return normalise(after).astype(np.float64) @ t - normalise(before).astype(np.float64) @ t


def pair_features(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The few-shot features of each pair: ``after - before`` of the normalised embeddings (its
    length is ``sqrt(2 d)``: the detector sees how much and in which direction a tile changed)."""
    return (normalise(after) - normalise(before)).astype(np.float32)


def fit_change_detector(positives: np.ndarray, negatives: np.ndarray, weak: np.ndarray,
                        positive_ids: Sequence[str], negative_ids: Sequence[str]):
    """A :class:`~hqrs_geo.search.fewshot.Detector` fitted on pair features: the pairs marked
    changed (``positives``) against those marked unchanged and ``weak`` negatives (random
    compared pairs: most pairs did not change), class-balanced as few-shot detection is."""
    x = np.concatenate([positives, negatives, weak]).astype(np.float64)
    y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives) + len(weak))])
    if not len(negatives) and not len(weak):
        raise OptionError("no unchanged pair to learn from: mark some pairs as unchanged", option="negative")
    w, b = fit_logistic(x, y, label_weights(len(positives), len(negatives), len(weak)), DEFAULT_C)
    norm = float(np.linalg.norm(w))
    if norm == 0:
        raise OptionError("the change detector learned nothing from these pairs; mark other pairs",
                          option="positive")
    return Detector("logistic", (w / norm).astype(np.float32), norm, b, list(positive_ids), list(negative_ids),
                    len(weak))


__all__ = ["MAD_SCALE", "MIN_SCALE", "Calibration", "competition_rank", "cosine_distance", "fit_change_detector",
           "pair_features", "text_change"]
