"""Tile sources: one interface over the two kinds of tile layer, so the code above never asks
which kind it holds.

* :class:`FileSource` – one tile layer file (GeoPackage, GeoParquet, FlatGeobuf; see
  :mod:`hqrs_geo.layer.io`);
* :class:`DatasetSource` – a dataset folder of GeoParquet parts and a manifest (see
  :mod:`hqrs_geo.layer.dataset`).

Both read the whole layer (or the tiles intersecting a box), list their parts (a file is one
part; a dataset one per part file, each checked against its manifest entry when read), read the
run records, the CRS and the bounds, and write tiles back atomically. :func:`open_source` is
the one place that tells the two apart; :func:`copy_layer` (defined in :mod:`hqrs_geo.layer.files`)
copies a layer file.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import geopandas as gpd
import pyarrow.parquet as pq
import pyogrio
import shapely

from ..errors import InputError
from .crs import box_in, validate_box
from .dataset import read_dataset_runs, read_dataset_tiles, read_part, write_dataset_layer
from .files import copy_layer, read_file_runs, read_file_tiles, write_file_layer
from .formats import FORMATS, TILES_LAYER, file_format, first_line
from .manifest import MANIFEST, Manifest, is_dataset, open_manifest, verified_part
from .parquet import geoparquet_crs, parquet_bounds
from .runs import LayerRuns

PathLike = str | os.PathLike
Bounds = tuple[float, float, float, float]


def clip_to_box(frame: Any, bbox: Sequence[float] | None, bbox_crs: str | None = None) -> Any:
    """The rows of a tile frame whose footprint intersects ``bbox`` (in ``bbox_crs``; None: the
    frame's CRS), index reset; ``frame`` itself without a box."""
    if bbox is None:
        return frame
    box = box_in(bbox, bbox_crs, frame.crs)
    return frame[frame.geometry.intersects(shapely.box(*box))].reset_index(drop=True)


@dataclass(frozen=True)
class TilePart:
    """One part of a tile source: the file itself for a layer file, one part file of a dataset.

    ``name`` is the file name, ``path`` its path. :meth:`read` reads its tiles (a dataset part
    is checked against its manifest entry first, and its footprints come in the dataset's CRS).
    ``bounds`` (in ``crs``): the extent its manifest entry records, None where none is recorded
    (a layer file: read it to know).
    """

    name: str
    path: str
    manifest: Manifest | None = field(default=None, repr=False, compare=False)
    bounds: tuple[float, float, float, float] | None = field(default=None, compare=False)
    crs: str | None = field(default=None, compare=False)

    def columns(self) -> list[str]:
        """The names of the part's columns, footprint included, without reading its rows."""
        if self.manifest is not None:
            return list(pq.read_schema(verified_part(self.manifest, self.name)).names)
        if file_format(self.path) == "Parquet":
            return list(pq.read_schema(self.path).names)
        return [*(str(f) for f in FileSource(self.path)._info()["fields"]), "geometry"]

    def read(self, columns: Sequence[str] | None = None, bbox: Sequence[float] | None = None,
             bbox_crs: str | None = None) -> Any:
        """The part's tiles ordered by ``tile_id`` (GeoDataFrame); ``columns``: only these besides
        the footprint; ``bbox`` (in ``bbox_crs``, default the part's CRS): only the tiles
        intersecting it."""
        validate_box(bbox, bbox_crs)
        if self.manifest is not None:
            frame = read_part(self.manifest, self.name, columns)
        else:
            frame = read_file_tiles(self.path)
            if columns is not None:
                missing = [c for c in columns if c not in frame.columns]
                if missing:
                    raise InputError(f"{self.path}: has no column {missing[0]!r}; it has "
                                     f"{', '.join(c for c in frame.columns if c != frame.geometry.name)}")
                keep = [*dict.fromkeys([*columns, frame.geometry.name])]
                frame = gpd.GeoDataFrame(frame[keep], geometry=frame.geometry.name, crs=frame.crs)
        return clip_to_box(frame, bbox, bbox_crs)


@runtime_checkable
class TileSource(Protocol):
    """A tile layer to read and update, whatever its kind (see the module docstring).

    ``partitioned`` is True for a dataset folder; only the entry points and :mod:`hqrs_geo.layer`
    may read it: everything else works through the methods.
    """

    @property
    def path(self) -> str:
        """Where the layer is (a file or a dataset folder)."""
        ...

    @property
    def partitioned(self) -> bool:
        """True for a dataset folder."""
        ...

    def read(self, bbox: Sequence[float] | None = None, bbox_crs: str | None = None) -> Any:
        """All tiles ordered by ``tile_id`` (GeoDataFrame); with ``bbox`` (in ``bbox_crs``, default
        the layer's CRS) only those intersecting it."""
        ...

    def parts(self) -> list[TilePart]:
        """The parts, ordered by name (a layer file is one part)."""
        ...

    def runs(self) -> LayerRuns:
        """The run records, oldest first."""
        ...

    def crs(self) -> str | None:
        """The CRS of the footprints (``EPSG:…`` where it has a code), None when they have none."""
        ...

    def bounds(self) -> Bounds | None:
        """``(minx, miny, maxx, maxy)`` of all footprints in :meth:`crs`; None without tiles."""
        ...

    def write(self, tiles: Any, run: dict | None = None, replace_sources: Sequence[str] | None = None,
              replace_all: bool = False, tables: dict | None = None) -> None:
        """Write ``tiles`` back atomically, merged with what is there (see
        :func:`hqrs_geo.layer.io.write_layer` for the parameters)."""
        ...


@dataclass(frozen=True)
class FileSource:
    """A tile layer file (GeoPackage, GeoParquet or FlatGeobuf) as a :class:`TileSource`."""

    path: str
    partitioned: bool = field(default=False, init=False)

    def read(self, bbox: Sequence[float] | None = None, bbox_crs: str | None = None) -> Any:
        """All tiles of the file (see :meth:`TileSource.read`)."""
        validate_box(bbox, bbox_crs)
        return clip_to_box(read_file_tiles(self.path), bbox, bbox_crs)

    def parts(self) -> list[TilePart]:
        """The file itself."""
        return [TilePart(Path(self.path).name, self.path)]

    def runs(self) -> LayerRuns:
        """The file's run records."""
        return read_file_runs(self.path)

    def crs(self) -> str | None:
        """The CRS the file's metadata names."""
        if file_format(self.path) == "Parquet":
            return geoparquet_crs(self.path)
        return self._info().get("crs")

    def bounds(self) -> Bounds | None:
        """The extent of the footprints (from the file's metadata where it has one)."""
        if file_format(self.path) == "Parquet":
            return parquet_bounds(self.path)
        info = self._info(force_total_bounds=True)
        if not info.get("features"):
            return None
        box = info["total_bounds"]
        return (float(box[0]), float(box[1]), float(box[2]), float(box[3]))

    def write(self, tiles: Any, run: dict | None = None, replace_sources: Sequence[str] | None = None,
              replace_all: bool = False, tables: dict | None = None) -> None:
        """Write into the file atomically (:func:`hqrs_geo.layer.files.write_file_layer`)."""
        write_file_layer(self.path, tiles, run, replace_sources, replace_all=replace_all, tables=tables)

    def _info(self, **options: Any) -> dict:
        layer = TILES_LAYER if file_format(self.path) == "GPKG" else None
        try:
            return pyogrio.read_info(self.path, layer=layer, **options)
        except Exception as exc:  # pyogrio raises many types for foreign files
            raise InputError(f"{self.path}: cannot read layer {TILES_LAYER!r} ({first_line(exc)})") \
                from None


@dataclass(frozen=True)
class DatasetSource:
    """A dataset folder (GeoParquet parts and a manifest) as a :class:`TileSource`; each method
    reads the manifest as it is on disk now."""

    path: str
    partitioned: bool = field(default=True, init=False)

    def read(self, bbox: Sequence[float] | None = None, bbox_crs: str | None = None) -> Any:
        """The tiles of every part, or of the parts intersecting ``bbox`` (see
        :func:`hqrs_geo.layer.dataset.read_dataset_tiles`)."""
        return read_dataset_tiles(self.path, bbox, bbox_crs)

    def manifest(self) -> Manifest:
        """The dataset's manifest as it is now."""
        return open_manifest(self.path)

    def parts(self) -> list[TilePart]:
        """One part per part file with tiles, ordered by name."""
        manifest = self.manifest()
        return [TilePart(path.name, str(path), manifest, _bounds(manifest.parts[path.name].get("bounds")),
                         manifest.parts[path.name].get("crs") or manifest.crs) for path in manifest.part_files()]

    def runs(self) -> LayerRuns:
        """The manifest's run records (with the readings of its scenes)."""
        return read_dataset_runs(self.path)

    def crs(self) -> str | None:
        """The dataset's CRS (the manifest's)."""
        return self.manifest().crs

    def bounds(self) -> Bounds | None:
        """The union of the parts' bounds (as the manifest records them) in the dataset's CRS."""
        manifest = self.manifest()
        boxes = [box_in(part["bounds"], part.get("crs") or manifest.crs, manifest.crs)
                 for part in manifest.parts.values() if part.get("tiles", 0) > 0 and part.get("bounds")]
        if not boxes:
            return None
        return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                max(b[3] for b in boxes))

    def write(self, tiles: Any, run: dict | None = None, replace_sources: Sequence[str] | None = None,
              replace_all: bool = False, tables: dict | None = None) -> None:
        """Write the tiles back into the parts they belong to, then the manifest
        (:func:`hqrs_geo.layer.dataset.write_dataset_layer`)."""
        write_dataset_layer(self.path, tiles, run, replace_sources, TILES_LAYER, replace_all, tables)


def _bounds(box: Any) -> tuple[float, float, float, float] | None:
    return None if box is None else (float(box[0]), float(box[1]), float(box[2]), float(box[3]))


def open_source(path: PathLike) -> TileSource:
    """The tile source at ``path``: a dataset folder (it holds a manifest) or a tile layer file
    (``.gpkg``, ``.parquet``, ``.fgb``); a one-line :class:`InputError` for anything else."""
    text = str(path)
    if is_dataset(text):
        open_manifest(text)  # a damaged manifest is refused here, before any work
        return DatasetSource(text)
    if Path(text).is_dir():
        raise InputError(f"{text}: is a folder without {MANIFEST}, not an hqrs_geo dataset; give a tile layer "
                         "file or a dataset folder")
    if Path(text).suffix.lower() not in FORMATS:
        raise InputError(f"{text}: not a tile layer; give a .gpkg, .parquet or .fgb file or a dataset folder")
    if not Path(text).exists():
        raise InputError(f"{text}: file not found; tile a raster into a layer first")
    return FileSource(text)


__all__ = ["DatasetSource", "FileSource", "TilePart", "TileSource", "clip_to_box", "copy_layer", "open_source"]
