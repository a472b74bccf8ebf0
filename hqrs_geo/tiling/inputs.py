"""A job's input, resolved once at the entry (the API, the command line, the QGIS runner).

An input is either rasters to tile (:class:`Rasters`: paths, globs, folders, lists, URLs and STAC
documents, with the filter that picks STAC assets and items) or one existing tile layer — a file
or a dataset folder — opened as a :class:`~hqrs_geo.layer.source.TileSource`.
:func:`resolve_input` is the one place that asks which of the two a job was given; everything
below the entry works on the resolved value.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..layer.io import is_layer_path
from ..layer.source import TileSource, open_source
from ..raster.catalog import SourceEntry, SourceFilter, resolve_sources

InputItems = str | os.PathLike | SourceEntry | Sequence[str | os.PathLike | SourceEntry]


def as_list(inputs: Any) -> list[str | SourceEntry]:
    """``inputs`` (one path, URL or resolved entry, or a sequence of them) as a list of strings
    and :class:`~hqrs_geo.raster.catalog.SourceEntry` values."""
    if isinstance(inputs, (str, os.PathLike, SourceEntry)):
        inputs = [inputs]
    return [i if isinstance(i, SourceEntry) else str(i) for i in inputs]


@dataclass(frozen=True)
class Rasters:
    """Rasters a job tiles: the items as given and the filter for STAC catalogs (``None``: none)."""

    items: list[str | SourceEntry] = field(default_factory=list)
    source_filter: SourceFilter | None = None

    def scenes(self) -> list:
        """The items to tile: with a filter, every scene they name
        (:func:`~hqrs_geo.raster.catalog.resolve_sources`); without one, the items as given."""
        if self.source_filter is None:
            return list(self.items)
        return resolve_sources(self.items, self.source_filter)


def names_layer(items: Sequence[Any]) -> bool:
    """True when ``items`` (from :func:`as_list`) is a single tile-layer file (by extension) or
    dataset folder."""
    return len(items) == 1 and isinstance(items[0], str) and is_layer_path(items[0])


def resolve_input(inputs: Any, source_filter: SourceFilter | None = None) -> Rasters | TileSource:
    """The job's input: one tile layer file or dataset folder, opened
    (:func:`~hqrs_geo.layer.source.open_source`: a one-line error when it is not a tile layer), or
    the :class:`Rasters` to tile (``source_filter`` applies to those only)."""
    items = as_list(inputs)
    if names_layer(items):
        return open_source(str(items[0]))
    return Rasters(items, source_filter)


__all__ = ["Rasters", "as_list", "names_layer", "resolve_input"]
