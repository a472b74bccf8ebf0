"""Search functions for notebooks: each returns a GeoDataFrame with a ``score`` column.

For many queries on one layer, keep a :class:`~hqrs_geo.search.session.SearchSession`
(:func:`~hqrs_geo.search.sessions.open_session` opens the right session for a layer file or
a dataset folder).
"""
from __future__ import annotations

from collections.abc import Sequence

from .fewshot import detect as run_detect
from .sessions import open_session
from .spatial import SpatialFilter


def search_text(layer: str, query: str | Sequence[str], k: int = 20, model: str | None = None,
                spatial: SpatialFilter | None = None, **session_options):
    """Tiles of ``layer`` ranked by similarity to the text(s) ``query``."""
    return open_session(layer, model=model, **session_options).search_text(query, k=k, spatial=spatial)


def search_similar(layer: str, tiles: Sequence[str] = (), images: Sequence[str] = (), negative: Sequence[str] = (),
                   negative_images: Sequence[str] = (), negative_weight: float = 0.5, k: int = 20,
                   model: str | None = None, spatial: SpatialFilter | None = None, **session_options):
    """Tiles of ``layer`` like the example tiles/images and unlike the negative ones."""
    session = open_session(layer, model=model, **session_options)
    return session.search_similar(tiles, negative, images, negative_images, negative_weight, k, spatial)


def classify(layer: str, labels: Sequence[str], templates: Sequence[str] | None = None, top_k: int = 3,
             model: str | None = None, **session_options):
    """Zero-shot ``label``, ``label_score``, ``label_top`` for every tile (the layer is not modified)."""
    return open_session(layer, model=model, **session_options).classify(labels, templates, top_k)


def detect(layer: str, positive: Sequence[str], negative: Sequence[str] = (), method: str = "logistic",
           k: int | None = 1000, threshold: float = 0.5, model: str | None = None,
           spatial: SpatialFilter | None = None, **session_options):
    """Few-shot detection (:mod:`hqrs_geo.search.fewshot`): the tiles of ``layer`` most like the
    ``positive`` tile ids and unlike the ``negative`` ones, at most ``k`` (None: all) with a
    probability at or above ``threshold``, best first (``score`` = probability, ``rank``,
    ``train_label`` = 1 / -1 for the labelled tiles)."""
    frame, _ = run_detect(open_session(layer, model=model, **session_options), positive, negative, method, k,
                          threshold, spatial)
    return frame
