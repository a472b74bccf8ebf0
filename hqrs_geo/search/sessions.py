"""Opening a search session on a tile source: the one place in :mod:`hqrs_geo.search` that tells
a tile layer file (:class:`~hqrs_geo.search.session.SearchSession`, the layer and its embeddings
read once) from a dataset folder (:class:`~hqrs_geo.search.partitioned.DatasetSession`, part by
part). Everything after works through the session's methods.
"""
from __future__ import annotations

import os
from typing import Any

from ..layer.source import TileSource, open_source
from .partitioned import DatasetSession
from .session import BaseSession, SearchSession


def open_session(layer: TileSource | str | os.PathLike, **options: Any) -> BaseSession:
    """A search session on ``layer`` (a path, checked by :func:`~hqrs_geo.layer.source.open_source`,
    or a tile source already opened); ``options``: those of :class:`SearchSession` (``model``,
    ``checkpoint``, ``device``, ``use_ann``, ``trust_checkpoint``)."""
    source = open_source(layer) if isinstance(layer, (str, os.PathLike)) else layer
    session = DatasetSession if source.partitioned else SearchSession
    return session(source.path, **options)


__all__ = ["open_session"]
