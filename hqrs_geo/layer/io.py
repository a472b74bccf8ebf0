"""Reading and writing tile layers, whatever their kind: the entry to :mod:`hqrs_geo.layer`.

Every function here takes a tile layer file (GeoPackage, GeoParquet, FlatGeobuf:
:mod:`hqrs_geo.layer.files`) or a dataset folder (:mod:`hqrs_geo.layer.dataset`) and does the
same for both; this is where the two are told apart (with :mod:`hqrs_geo.layer.source`, the
same as objects). Writes are atomic and merge with what is there (see
:func:`write_layer`). :func:`open_layer` reads a layer and its run records once for a whole job.
:class:`~hqrs_geo.layer.files.TileLayer`, :data:`FORMATS` and :data:`TILES_LAYER` are
importable from here too.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import OutputError
from .dataset import read_dataset_runs, read_dataset_tiles, write_dataset_layer
from .files import TileLayer, check_file_writable, read_file_runs, read_file_tiles, write_file_layer
from .formats import FORMATS, TILES_LAYER, PathLike, file_format, file_state
from .manifest import is_dataset
from .runs import LayerRuns


def layer_format(path: PathLike) -> str:
    """The driver for ``path`` by its extension (``Dataset`` for a dataset folder, see
    :mod:`hqrs_geo.layer.dataset`); a one-line error for unsupported ones."""
    if is_dataset(path):
        return "Dataset"
    return file_format(path)


def is_layer_path(path: PathLike) -> bool:
    """True when ``path`` names a tile-layer file by its extension, or is a dataset folder."""
    return Path(str(path)).suffix.lower() in FORMATS or is_dataset(path)


def check_writable(path: PathLike) -> None:
    """Fail early, before any work, when ``path`` cannot be written."""
    if is_dataset(path):
        if not os.access(path, os.W_OK):
            raise OutputError(f"{path}: not writable (permission denied); choose another output")
        return
    check_file_writable(path)


def read_tiles(path: PathLike, layer: str = TILES_LAYER) -> Any:
    """Read a tile layer as a GeoDataFrame ordered by ``tile_id`` (scene, row, column).

    One-line errors for missing or foreign files. A dataset folder is read whole.
    """
    if is_dataset(path):
        return read_dataset_tiles(path)
    return read_file_tiles(path, layer)


def read_runs(path: PathLike, layer_format: str | None = None) -> LayerRuns:
    """The run records of the layer at ``path`` (a file or a dataset folder), oldest first (empty
    when it has none): the one reader of run records. ``layer_format``: its driver, when known."""
    if layer_format == "Dataset" or (layer_format is None and is_dataset(path)):
        return read_dataset_runs(path)
    return read_file_runs(path)


def open_layer(path: PathLike) -> TileLayer:
    """Read the tiles and run records of the layer at ``path`` (one-line errors)."""
    state = file_state(path)
    frame = read_tiles(path)
    runs = read_runs(path)
    return TileLayer(str(path), frame, runs, state if file_state(path) == state else None)


def write_tiles(path: PathLike, tiles: Any, run: dict | None = None, replace_sources: Sequence[str] | None = None,
                layer: str = TILES_LAYER, replace_all: bool = False, tables: dict | None = None,
                known: TileLayer | None = None) -> Any:
    """Write ``tiles`` to ``path`` atomically, merging with an existing layer; returns what was
    written (GeoDataFrame). See :func:`write_layer` for the parameters."""
    return write_layer(path, tiles, run, replace_sources, layer, replace_all, tables, known).frame


def write_layer(
    path: PathLike,
    tiles: Any,
    run: dict | None = None,
    replace_sources: Sequence[str] | None = None,
    layer: str = TILES_LAYER,
    replace_all: bool = False,
    tables: dict | None = None,
    known: TileLayer | None = None,
) -> TileLayer:
    """Write ``tiles`` to ``path`` atomically, merging with an existing layer; returns the layer
    as written (tiles ordered by ``tile_id``, run records), ready for the next step.

    ``replace_sources``: sources whose existing tiles are replaced (default: the sources in
    ``tiles``); ``replace_all``: the layer becomes exactly ``tiles`` (result layers). ``run``
    (see :func:`~hqrs_geo.layer.runs.new_run`) is appended to the layer's run records.
    ``tables``: extra attribute tables ``{name: DataFrame}`` written in the same atomic step
    (GeoPackage tables; ``<layer>.<name>.csv`` beside other formats). ``known``: the layer as
    the job read it (:func:`open_layer`); used instead of reading it again while unchanged.
    """
    check_writable(path)
    if is_dataset(path):
        return write_dataset_layer(path, tiles, run, replace_sources, layer, replace_all, tables)
    return write_file_layer(path, tiles, run, replace_sources, layer, replace_all, tables, known)


__all__ = ["FORMATS", "TILES_LAYER", "TileLayer", "check_writable", "is_layer_path", "layer_format",
           "open_layer", "read_runs", "read_tiles", "write_layer", "write_tiles"]
