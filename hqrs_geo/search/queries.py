"""Query vectors in a layer's embedding space: from text, example tiles and image files.

The text (or image) encoder must be the model that made the layer's image embeddings: its
name, architecture, checkpoint and sha256 come from the layer's run record
(:meth:`hqrs_geo.layer.runs.LayerRuns.embedding_source`) and :func:`load_source_model` loads
exactly those weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, OptionError
from ..layer.runs import EmbeddingSource
from ..models.encode import normalise
from ..models.loader import load_model
from ..models.registry import REGISTRY


def load_source_model(source: EmbeddingSource, checkpoint: str | None = None, device: str = "cpu",
                      trust_checkpoint: bool = False) -> Any:
    """Load the model of ``source``, checking that the weights are the ones that made the layer."""
    path = checkpoint or source.checkpoint
    if path and not Path(path).is_file() and checkpoint is None:
        raise InputError(
            f"the layer's embeddings were made by {source.model} with checkpoint {path}, which is missing; "
            "give the path of that checkpoint file")
    name = source.model if source.model in REGISTRY else source.arch
    loaded = load_model(name, checkpoint=path, arch=source.arch, device=device, trust_checkpoint=trust_checkpoint)
    if source.sha256 and loaded.sha256 != source.sha256:
        raise InputError(
            f"{loaded.checkpoint}: sha256 {str(loaded.sha256)[:12]}… differs from the checkpoint that embedded the "
            f"layer ({source.sha256[:12]}…); use that checkpoint, or embed the layer again")
    return loaded


def combine(positives: np.ndarray, negatives: np.ndarray | None = None, negative_weight: float = 0.5) -> np.ndarray:
    """Query from examples: mean of positives minus ``negative_weight`` x mean of negatives, normalised."""
    if len(positives) == 0:
        raise OptionError("no positive example; give a tile id or an image", option="tile")
    query = normalise(positives).mean(axis=0)
    if negatives is not None and len(negatives):
        query = query - negative_weight * normalise(negatives).mean(axis=0)
        if float(np.linalg.norm(query)) < 1e-6:  # e.g. the same tile given as positive and negative, weight 1
            raise OptionError("the negative examples cancel the positive ones: the query is a zero vector and every "
                              "score would be 0; do not give a tile as both, or lower «negative_weight»",
                              option="negative_weight")
    return normalise(query[None])[0]
