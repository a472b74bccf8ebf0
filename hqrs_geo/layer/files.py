"""Tile layer files: GeoPackage (default), GeoParquet (``.parquet``), FlatGeobuf (``.fgb``).

A tile layer holds one polygon per tile (columns in :mod:`hqrs_geo.layer.columns`) and the
run records of every job that wrote to it (:mod:`hqrs_geo.layer.runs`); how each format stores
them is in :mod:`~hqrs_geo.layer.gpkg`, :mod:`~hqrs_geo.layer.parquet` and
:mod:`~hqrs_geo.layer.flatgeobuf`.

Writes are atomic (:func:`hqrs_geo.atomic.atomic_path`): a temporary file in the same folder,
checked and then moved over the target, so an interrupted or failed write leaves the previous
file untouched. Writing tiles of a scene again replaces that scene's tiles (no duplicates),
keeps other scenes' tiles, and keeps the result columns of tiles whose pixel window did not
change. A :class:`TileLayer` is a layer read once for a whole job.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import pandas as pd

from ..atomic import atomic_path, folder_lock
from ..errors import InputError, OutputError
from .columns import TILE_ID, WINDOW_COLUMNS
from .flatgeobuf import read_fgb, read_fgb_runs, sidecar_path, write_fgb
from .formats import TILES_LAYER, PathLike, file_format, file_state
from .gpkg import layer_names, read_gpkg, read_gpkg_runs, write_gpkg
from .parquet import read_parquet, read_parquet_runs, write_parquet
from .runs import LayerRuns


@dataclass
class TileLayer:
    """A tile layer read once for a job: its path, tiles (GeoDataFrame) and run records.

    ``state`` (size, mtime, inode) is the file's as it was read: a write that finds the file
    unchanged reuses what was read instead of reading it again.
    """

    path: str
    frame: Any
    runs: LayerRuns
    state: tuple[int, int, int] | None = None

    def scenes(self) -> dict:
        """``{source: SceneReading}`` of the layer's scenes (see :meth:`LayerRuns.scenes`)."""
        return self.runs.scenes()

    def unchanged(self) -> bool:
        """True while the file is as it was when read."""
        return self.state is not None and file_state(self.path) == self.state


def check_file_writable(path: PathLike) -> None:
    """Fail early, before any work, when the layer file ``path`` cannot be written (its folder
    is missing, it is a folder, no permission, an unsupported extension)."""
    file_format(path)
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: folder {folder} does not exist; create it or choose another output")
    if target.exists() and target.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name ending in .gpkg, .parquet or .fgb")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise OutputError(f"{path}: not writable (permission denied); choose another output")


def read_file_tiles(path: PathLike, layer: str = TILES_LAYER) -> Any:
    """The tiles of the layer file ``path`` ordered by ``tile_id`` (one-line errors for missing
    or foreign files)."""
    driver = file_format(path)
    if not Path(path).exists():
        raise InputError(f"{path}: file not found; tile a raster into a layer first")
    if Path(path).is_dir():
        raise InputError(f"{path}: is a folder, not a tile layer file")
    if driver == "Parquet":
        frame = read_parquet(path)
    elif driver == "GPKG":
        frame = read_gpkg(path, layer)
    else:
        frame = read_fgb(path)
    if TILE_ID not in frame.columns:
        raise InputError(f"{path}: not an hqrs_geo tile layer (no tile_id column); tile a raster into a layer first")
    return frame.sort_values(TILE_ID, kind="stable").reset_index(drop=True)


def read_file_runs(path: PathLike) -> LayerRuns:
    """The run records of the layer file ``path``, oldest first (empty when it has none or does
    not exist yet)."""
    driver = file_format(path)
    if not Path(path).exists():
        return LayerRuns(path=path)
    if driver == "GPKG":
        return read_gpkg_runs(path)
    if driver == "Parquet":
        return read_parquet_runs(path)
    return read_fgb_runs(path)


def has_layer(path: PathLike, layer: str) -> bool:
    """True when the file exists and holds ``layer`` (always True for single-layer formats)."""
    if not Path(path).exists():
        return False
    if file_format(path) != "GPKG":
        return True
    return layer in layer_names(path)


def merge_tiles(existing: Any, new: Any, replace_sources: Sequence[str]) -> Any:
    """Combine an existing tile layer with new tiles without duplicates.

    Existing tiles of ``replace_sources`` are replaced by ``new``; extra columns (embeddings,
    captions…) of an existing tile are carried over when its id and pixel window are unchanged.
    Tiles of other sources are kept as they are.
    """
    if existing is None or existing.empty:
        return new
    if existing.crs != new.crs and not new.empty:
        raise OutputError(
            f"the existing layer is in {existing.crs}, the new tiles in {new.crs}; "
            f"write a new file or tile in the layer's CRS {existing.crs.to_string() if existing.crs else '(none)'}"
        )
    replaced = existing["source"].isin(list(replace_sources))
    if new.empty:  # no tiles (e.g. an all-nodata scene): nothing to add, whatever its CRS
        return gpd.GeoDataFrame(existing[~replaced].reset_index(drop=True), geometry=existing.geometry.name,
                                crs=existing.crs)
    old = existing[replaced]
    extra = [c for c in existing.columns if c not in new.columns and c != existing.geometry.name]
    if extra and not old.empty:
        carry = old[[TILE_ID, *WINDOW_COLUMNS, *extra]]
        new = new.merge(carry, on=[TILE_ID, *WINDOW_COLUMNS], how="left")
    merged = pd.concat([existing[~replaced], new], ignore_index=True)
    return gpd.GeoDataFrame(merged, geometry=new.geometry.name, crs=new.crs)


def write_file(path: PathLike, frame: Any, runs: list[dict], layer: str = TILES_LAYER,
               tables: dict | None = None) -> None:
    """Write ``frame`` and its run records ``runs`` (and ``tables``) as the layer file ``path``
    in the format its extension names, atomically; nothing is merged (see :func:`write_file_layer`)."""
    driver = file_format(path)
    if driver == "GPKG":
        write_gpkg(path, frame, runs, layer, tables or {})
    elif driver == "Parquet":
        write_parquet(path, frame, runs, tables or {})
    else:
        write_fgb(path, frame, runs, tables or {})


def write_file_layer(path: PathLike, tiles: Any, run: dict | None = None,
                     replace_sources: Sequence[str] | None = None, layer: str = TILES_LAYER,
                     replace_all: bool = False, tables: dict | None = None,
                     known: TileLayer | None = None) -> TileLayer:
    """:func:`hqrs_geo.layer.io.write_layer` of a layer file: under its folder's lock (another
    job's read-modify-write of this layer finishes first), merged with the layer there."""
    check_file_writable(path)
    folder = Path(path).parent if str(Path(path).parent) else Path(".")
    with folder_lock(folder, path):
        return _write_locked(path, tiles, run, replace_sources, layer, replace_all, tables, known)


def _write_locked(path: PathLike, tiles: Any, run: dict | None, replace_sources: Sequence[str] | None,
                  layer: str, replace_all: bool, tables: dict | None, known: TileLayer | None) -> TileLayer:
    """:func:`write_file_layer` under the folder's lock."""
    reuse = known is not None and layer == TILES_LAYER and Path(known.path) == Path(path) and known.unchanged()
    existing = None
    if reuse and known is not None:
        existing = known.frame
    elif not replace_all and has_layer(path, layer):
        existing = read_file_tiles(path, layer)
    if replace_all:
        existing = None
    sources = replace_sources if replace_sources is not None else tiles["source"].unique().tolist()
    merged = merge_tiles(existing, tiles, sources)
    if reuse and known is not None:
        runs = list(known.runs)
    else:
        runs = list(read_file_runs(path)) if Path(path).exists() else []
    if run is not None:
        runs.append({"run_id": len(runs) + 1, **run})
    write_file(path, merged, runs, layer, tables)
    if TILE_ID in merged.columns:
        merged = merged.sort_values(TILE_ID, kind="stable").reset_index(drop=True)
    return TileLayer(str(path), merged, LayerRuns(runs, path), file_state(path))


def copy_layer(layer: PathLike, output: PathLike) -> None:
    """Copy a tile layer file (and a FlatGeobuf's run-record sidecar) atomically and verified."""
    with atomic_path(output) as tmp:
        shutil.copyfile(layer, tmp)
    if sidecar_path(layer).exists():
        with atomic_path(sidecar_path(output)) as tmp:
            shutil.copyfile(sidecar_path(layer), tmp)


__all__ = ["TileLayer", "check_file_writable", "copy_layer", "has_layer", "merge_tiles", "read_file_runs",
           "read_file_tiles", "write_file", "write_file_layer"]
