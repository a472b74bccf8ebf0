"""Zero-shot scene classes of embedding rows: class vectors from the prompt ensemble
(:mod:`hqrs_geo.models.prompts`), a softmax at the model's calibrated temperature, and the
label columns ``label``, ``label_score`` and ``label_top`` that ``classify``, change detection
and MpGI's class perspective write.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import OptionError
from .encode import class_vectors
from .prompts import SCENE_CLASSES


class ZeroShot:
    """Zero-shot labelling of embedding rows: softmax over the class vectors at ``scale`` (the
    model's calibrated zero-shot scale, else its logit scale); ``label``, ``label_score`` and
    ``label_top`` (``"a:0.61;b:0.22;…"``)."""

    def __init__(self, labels: list[str], classes: np.ndarray, scale: float, top_k: int):
        self.labels, self.classes, self.scale, self.top_k = labels, classes, scale, top_k

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """``[N, C]`` class probabilities of the rows of ``vectors`` (each row sums to 1)."""
        logits = np.asarray(vectors, dtype=np.float32) @ self.classes.T
        probs = np.exp((logits - logits.max(axis=1, keepdims=True)) * self.scale)
        return probs / probs.sum(axis=1, keepdims=True)

    def label(self, vectors: np.ndarray) -> tuple[list, np.ndarray, list[str]]:
        """``(label, label_score, label_top)`` of every row of ``vectors``."""
        probs = self.probabilities(vectors)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :self.top_k]
        names = np.asarray(self.labels, dtype=object)
        tops = [";".join(f"{names[j]}:{p[j]:.3f}" for j in row) for row, p in zip(order, probs)]
        return list(names[order[:, 0]]), probs[np.arange(len(probs)), order[:, 0]], tops

    def columns(self, frame: Any, rows: np.ndarray, vectors: np.ndarray) -> Any:
        """``frame`` with the label columns set at ``rows`` from ``vectors`` (others empty)."""
        label, score, top = self.label(vectors)
        frame["label"], frame["label_score"], frame["label_top"] = None, np.nan, None
        at = frame.index[rows]
        frame.loc[at, "label"] = label
        frame.loc[at, "label_score"] = score
        frame.loc[at, "label_top"] = top
        return frame

    def params(self, templates: Sequence[str] | None, model: str) -> dict:
        """The run-record parameters of a classification."""
        return {"labels": list(self.labels), "templates": list(templates) if templates else None,
                "model": model, "scale": round(float(self.scale), 4)}


def check_labels(labels: Sequence[str], templates: Sequence[str] | None, top_k: int) -> list[str]:
    """The stripped labels, or a one-line :class:`~hqrs_geo.errors.OptionError` for fewer than two
    labels, a repeated label, a template without ``{}`` or a ``top_k`` below 1."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise OptionError(f"invalid top_k {top_k!r}: keep at least one class", option="top_k")
    if templates is not None and any("{}" not in t for t in templates):
        raise OptionError("every template needs a {} for the class name", option="templates")
    labels = [label.strip() for label in labels if label.strip()]
    if len(labels) < 2:
        raise OptionError(f"{len(labels)} label(s) given; give at least two labels to choose from",
                          option="labels")
    if len(set(labels)) != len(labels):
        raise OptionError("a label is given twice; give distinct labels", option="labels")
    return labels


def zero_shot_scale(loaded: Any) -> float:
    """The softmax scale of zero-shot probabilities: the registry's calibrated value for the
    model (``ModelSpec.zero_shot_scale``), else the model's own logit scale, else 100."""
    spec = getattr(loaded, "spec", None)
    if spec is not None and getattr(spec, "zero_shot_scale", None):
        return float(spec.zero_shot_scale)
    model = loaded.model
    return float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else 100.0


def zero_shot(loaded: Any, labels: Sequence[str] | None = None, templates: Sequence[str] | None = None,
              top_k: int = 3, synonyms: bool = True) -> ZeroShot:
    """A :class:`ZeroShot` for a loaded CLIP model over ``labels`` (default
    :data:`~hqrs_geo.models.prompts.SCENE_CLASSES`), with the prompt ensemble and synonyms of
    :func:`~hqrs_geo.models.encode.class_vectors` and the model's calibrated scale."""
    chosen = check_labels(list(labels) if labels is not None else list(SCENE_CLASSES), templates, top_k)
    return ZeroShot(chosen, class_vectors(loaded, chosen, templates, synonyms), zero_shot_scale(loaded), int(top_k))
