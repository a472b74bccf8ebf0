"""Partitioned tile datasets: a folder of GeoParquet parts plus a manifest.

A dataset is what the scale-out engine (:mod:`hqrs_geo.engine.partitioned`) writes for an
archive of scenes: one GeoParquet file per scene, or per block of grid rows of a large
scene, each written atomically (:func:`hqrs_geo.atomic.atomic_path`), and ``_manifest.json``
(written atomically too)::

    DATASET/
      _manifest.json                 # the manifest (below)
      <scene>.parquet                # one part per scene ...
      <scene>.b0003.parquet          # ... or per block of a large scene

Each part is a complete GeoParquet tile layer: the tile columns
(:data:`~hqrs_geo.layer.columns.TILE_COLUMNS`, ``source_url``, ``stac_item``), the results
(embeddings as fixed-size lists, captions), the footprints in the dataset's CRS, and in its
``hqrs_geo`` schema metadata the run records with the scene's reading and the part's facts
(``params.part``), so one part can be opened on its own. DuckDB
(``read_parquet('DATASET/*.parquet')``) and geopandas (``geopandas.read_parquet('DATASET')``;
names starting with ``_`` or ``.`` are skipped) read the parts as they are.

The manifest (``format`` ``hqrs_geo.dataset``, ``version`` 1):

* ``crs``: the CRS of every footprint (the first scene's, or the one asked for);
* ``runs``: the run records of the jobs that wrote the dataset (as in a layer, see
  :mod:`hqrs_geo.layer.runs`); ``fingerprint``: the last job's (tiling, CRS, models' weights,
  decoding): a part made with another fingerprint is recomputed;
* ``scenes``: per scene key its ``source`` (what GDAL opens), ``url``, ``item`` (STAC item id),
  ``reading`` (bands, stretch, … as :class:`~hqrs_geo.tiling.records.SceneReading`), ``grid``,
  ``blocks`` (parts it is split into), ``tiles``;
* ``parts``: per part file name its ``scene``, ``block``, ``rows`` (grid rows ``[first, last)``),
  ``tiles``, ``bounds`` (in ``crs``) and ``bounds_wgs84`` (lon/lat; for pruning partitions by
  area), ``crs``, ``sha256`` and ``bytes`` of the file, and the job ``fingerprint``;
* ``failed``: per scene key that failed in the last job its ``source``, ``url``, ``item`` and
  one-line ``error``; running the job again retries exactly those (and anything unfinished).

:func:`hqrs_geo.layer.io.open_layer`, :func:`~hqrs_geo.layer.io.read_tiles`,
:func:`~hqrs_geo.layer.runs.read_runs` and :func:`~hqrs_geo.layer.io.write_tiles` accept a
dataset folder, so every command that reads or updates a tile layer works on one;
:func:`merge_dataset` writes one GeoPackage (or GeoParquet/FlatGeobuf) for QGIS.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_path, sha256_file, write_json
from ..errors import InputError, OutputError
from .columns import (
    PROVENANCE_COLUMNS,
    SOURCE,
    SOURCE_URL,
    STAC_ITEM,
    TILE_ID,
    embedding_columns,
    has_value,
)
from .runs import PARQUET_KEY, LayerRuns

MANIFEST = "_manifest.json"
FORMAT = "hqrs_geo.dataset"
VERSION = 1
PART_SUFFIX = ".parquet"
PathLike = str | os.PathLike


# -- what a folder is ---------------------------------------------------------------------------
def manifest_path(folder: PathLike) -> Path:
    """``<folder>/_manifest.json``."""
    return Path(folder) / MANIFEST


def is_dataset(path: PathLike) -> bool:
    """True when ``path`` is a dataset folder (it holds a manifest)."""
    return manifest_path(path).is_file()


def is_dataset_output(path: PathLike) -> bool:
    """True when ``path`` names a dataset to write: an existing dataset or folder, a name ending
    in ``/``, or a name without extension (tile layer files end in ``.gpkg``, ``.parquet``, ``.fgb``)."""
    text = str(path)
    return (is_dataset(text) or os.path.isdir(text) or text.endswith(("/", os.sep))
            or Path(text).suffix == "")


def part_name(scene: str, block: int, blocks: int) -> str:
    """File name of a part: ``<scene>.parquet``, or ``<scene>.b0003.parquet`` for block 3 of several."""
    return f"{scene}{PART_SUFFIX}" if blocks <= 1 else f"{scene}.b{block:04d}{PART_SUFFIX}"


# -- the manifest ---------------------------------------------------------------------------------
@dataclass
class Manifest:
    """The manifest of a dataset, in memory; :meth:`save` writes it atomically."""

    folder: Path
    crs: str | None = None
    fingerprint: str | None = None
    runs: list = field(default_factory=list)
    scenes: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)
    failed: dict = field(default_factory=dict)

    @classmethod
    def load(cls, folder: PathLike) -> Manifest:
        """The manifest of ``folder`` (an empty one when the folder has none yet)."""
        path = manifest_path(folder)
        if not path.exists():
            return cls(Path(folder))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read the dataset manifest ({exc}); was it changed outside hqrs_geo?") \
                from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"{path}: not an hqrs_geo dataset manifest; choose another output folder")
        if int(data.get("version", 0)) > VERSION:
            raise InputError(f"{path}: dataset format version {data.get('version')} is newer than this "
                             "hqrs_geo reads; upgrade hqrs_geo")
        return cls(Path(folder), data.get("crs"), data.get("fingerprint"), list(data.get("runs", [])),
                   dict(data.get("scenes", {})), dict(data.get("parts", {})), dict(data.get("failed", {})))

    def as_dict(self) -> dict:
        """The JSON document."""
        return {"format": FORMAT, "version": VERSION, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "crs": self.crs, "fingerprint": self.fingerprint, "runs": self.runs, "scenes": self.scenes,
                "parts": self.parts, "failed": self.failed}

    def save(self) -> None:
        """Write the manifest atomically (the folder is created when missing)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from ..atomic import output_error

            raise output_error(self.folder, exc) from None
        write_json(manifest_path(self.folder), self.as_dict(), indent=None)

    def part_files(self) -> list[Path]:
        """Paths of the parts with tiles, ordered by name."""
        return [self.folder / name for name in sorted(self.parts) if self.parts[name].get("tiles", 0) > 0]

    def scene_parts(self, key: str) -> list[str]:
        """Names of the parts of scene ``key``."""
        return [name for name, part in self.parts.items() if part.get("scene") == key]

    def scene_done(self, key: str, source: str, fingerprint: str | None) -> bool:
        """True when every block of scene ``key`` (read from ``source``) has a part made by ``fingerprint``."""
        scene = self.scenes.get(key)
        if not scene or scene.get("source") != source or "blocks" not in scene:
            return False
        blocks = int(scene["blocks"])
        if blocks == 0:
            return scene.get("fingerprint") == fingerprint
        done = {part.get("block") for part in (self.parts[n] for n in self.scene_parts(key))
                if part.get("fingerprint") == fingerprint and part.get("blocks") == blocks}
        return done >= set(range(blocks))

    def add_part(self, info: dict) -> None:
        """Record a finished part (and drop the failure of its scene)."""
        self.parts[info["name"]] = info
        self.failed.pop(info["scene"], None)

    def drop_obsolete_parts(self, key: str, keep: Iterable[str]) -> list[str]:
        """Forget the parts of scene ``key`` not in ``keep`` (another blocking or job); returns their names."""
        keep = set(keep)
        gone = [name for name in self.scene_parts(key) if name not in keep]
        for name in gone:
            del self.parts[name]
        return gone


# -- parts ----------------------------------------------------------------------------------------
def _string_columns(table: Any) -> Any:
    """Columns that are all empty (Arrow type null) become strings, so every part has one schema."""
    import pyarrow as pa

    for i, column in enumerate(table.schema):
        if pa.types.is_null(column.type):
            table = table.set_column(i, pa.field(column.name, pa.string()), table.column(i).cast(pa.string()))
        elif pa.types.is_large_string(column.type):
            table = table.set_column(i, pa.field(column.name, pa.string()), table.column(i).cast(pa.string()))
    return table


def frame_bounds(frame: Any) -> tuple[list[float] | None, list[float] | None]:
    """``(bounds in the frame's CRS, bounds in WGS 84)`` of a tile frame's footprints."""
    if frame.empty:
        return None, None
    bounds = [float(v) for v in frame.total_bounds]
    wgs84 = None
    if frame.crs is not None:
        from pyproj import Transformer

        transformer = Transformer.from_crs(frame.crs, "EPSG:4326", always_xy=True)
        box = transformer.transform_bounds(bounds[0], bounds[1], bounds[2], bounds[3], densify_pts=21)
        wgs84 = [float(v) for v in box]
    return bounds, wgs84


def write_part(path: PathLike, frame: Any, runs: list[dict]) -> dict:
    """Write one part (a GeoParquet tile layer) atomically; returns its file facts
    (``tiles``, ``bounds``, ``bounds_wgs84``, ``crs``, ``sha256``, ``bytes``)."""
    import pyarrow.parquet as pq

    from .io import _fixed_size_list

    frame = frame.sort_values(TILE_ID, kind="stable").reset_index(drop=True)
    for name in PROVENANCE_COLUMNS:
        if name not in frame.columns:
            frame[name] = frame[SOURCE] if name == SOURCE_URL else None
    vectors = embedding_columns(list(frame.columns))
    with atomic_path(path) as tmp:
        frame.drop(columns=vectors).to_parquet(tmp, index=False)
        table = pq.read_table(tmp)
        for name in vectors:
            table = table.append_column(name, _fixed_size_list(frame[name], frame[f"{name}_dim"]))
        table = _string_columns(table)
        meta = dict(table.schema.metadata or {})
        meta[PARQUET_KEY] = json.dumps(runs).encode()
        meta.pop(b"pandas", None)  # the index and dtypes are ours to set on reading
        pq.write_table(table.replace_schema_metadata(meta), tmp)
    bounds, wgs84 = frame_bounds(frame)
    crs = frame.crs.to_string() if frame.crs is not None else None
    return {"tiles": int(len(frame)), "bounds": bounds, "bounds_wgs84": wgs84, "crs": crs,
            "sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def part_runs(path: PathLike) -> list[dict]:
    """The run records stored in a part (empty for files that are not parts)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
        return list(json.loads(meta.get(PARQUET_KEY, b"[]")))
    except Exception:  # a foreign or truncated file is not a part
        return []


def part_record(path: PathLike) -> dict | None:
    """The ``params.part`` facts a part file carries (None for files that are not parts)."""
    for run in reversed(part_runs(path)):
        part = (run.get("params") or {}).get("part")
        if part:
            return dict(part)
    return None


def _read_parts(files: Sequence[Path], where: PathLike) -> Any:
    import geopandas as gpd
    import pandas as pd

    frames = []
    for path in files:
        try:
            frames.append(gpd.read_parquet(path))
        except Exception as exc:  # pyarrow raises many types for damaged files
            raise InputError(f"{path}: cannot read this part of dataset {where} ({str(exc).splitlines()[0]}); "
                             "run the job that made it again") from None
    if not frames:
        return None
    if len(frames) == 1:
        return frames[0]
    frame = pd.concat(frames, ignore_index=True)
    return gpd.GeoDataFrame(frame, geometry=frames[0].geometry.name, crs=frames[0].crs)


def _empty_frame(manifest: Manifest) -> Any:
    import geopandas as gpd

    from .columns import TILE_COLUMNS

    return gpd.GeoDataFrame({c: [] for c in (*TILE_COLUMNS, *PROVENANCE_COLUMNS)},
                            geometry=gpd.GeoSeries([], crs=manifest.crs), crs=manifest.crs)


def _bbox_in(manifest: Manifest, bbox: Sequence[float], bbox_crs: str | None) -> tuple[float, ...]:
    """``bbox`` (in ``bbox_crs``, default the dataset's CRS) in the dataset's CRS."""
    if bbox_crs is None or manifest.crs is None:
        return tuple(float(v) for v in bbox)
    from pyproj import CRS, Transformer

    if CRS.from_user_input(bbox_crs) == CRS.from_user_input(manifest.crs):
        return tuple(float(v) for v in bbox)
    transformer = Transformer.from_crs(bbox_crs, manifest.crs, always_xy=True)
    return tuple(float(v) for v in transformer.transform_bounds(bbox[0], bbox[1], bbox[2], bbox[3], densify_pts=21))


def _overlaps(a: Sequence[float] | None, b: Sequence[float]) -> bool:
    return a is not None and not (a[0] > b[2] or a[2] < b[0] or a[1] > b[3] or a[3] < b[1])


# -- reading --------------------------------------------------------------------------------------
def open_manifest(path: PathLike) -> Manifest:
    """The manifest of an existing dataset (one-line error otherwise)."""
    if not Path(path).exists():
        raise InputError(f"{path}: dataset not found; run a job with this folder as output first")
    if not is_dataset(path):
        raise InputError(f"{path}: is a folder without {MANIFEST}, not an hqrs_geo dataset")
    return Manifest.load(path)


def read_dataset_tiles(path: PathLike, bbox: Sequence[float] | None = None, bbox_crs: str | None = None) -> Any:
    """The tiles of a dataset as one GeoDataFrame ordered by ``tile_id``; with ``bbox`` only the
    tiles intersecting it (parts outside it are not read)."""
    import shapely

    manifest = open_manifest(path)
    files = manifest.part_files()
    box = None
    if bbox is not None:
        box = _bbox_in(manifest, bbox, bbox_crs)
        files = [f for f in files if _overlaps(manifest.parts[f.name].get("bounds"), box)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise InputError(f"{missing[0]}: a part listed in the manifest of {path} is missing; "
                         "run the job that made the dataset again")
    frame = _read_parts(files, path)
    if frame is None:
        frame = _empty_frame(manifest)
    if box is not None and not frame.empty:
        frame = frame[frame.geometry.intersects(shapely.box(*box))]
    return frame.sort_values(TILE_ID, kind="stable").reset_index(drop=True)


class DatasetRuns(LayerRuns):
    """The run records of a dataset (the manifest's), with the scenes' readings from its scenes."""

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest.runs, manifest.folder)
        self.manifest = manifest

    def scenes(self) -> dict:
        """``{source: SceneReading}`` of every scene of the dataset."""
        from ..tiling.records import SceneReading

        out = super().scenes()
        for scene in self.manifest.scenes.values():
            if scene.get("reading"):
                out[scene["reading"]["source"]] = SceneReading.from_dict(scene["reading"])
        return out


def read_dataset_runs(path: PathLike) -> DatasetRuns:
    """The run records of a dataset."""
    return DatasetRuns(open_manifest(path))


# -- writing back (results of embed, caption, classify, score columns) -----------------------------
def _part_of_rows(manifest: Manifest, frame: Any) -> Any:
    """The part file name of each row of a tile frame (by its scene and grid row)."""
    import pandas as pd

    by_source = {scene.get("source"): key for key, scene in manifest.scenes.items()}
    ranges: dict[str, list[tuple[int, int, str]]] = {}
    for name, part in manifest.parts.items():
        first, last = part.get("rows") or (0, 1 << 62)
        ranges.setdefault(part["scene"], []).append((int(first), int(last), name))

    def which(source: str, row: int) -> str | None:
        for first, last, name in ranges.get(by_source.get(source, ""), []):
            if first <= row < last:
                return name
        return None

    return pd.Series([which(s, int(r)) for s, r in zip(frame[SOURCE], frame["row"])], index=frame.index,
                     dtype=object)


def write_dataset_layer(path: PathLike, tiles: Any, run: dict | None = None,
                        replace_sources: Sequence[str] | None = None, layer: str = "tiles",
                        replace_all: bool = False, tables: dict | None = None) -> Any:
    """Write ``tiles`` (a whole-dataset frame with new or changed columns) back into the parts of
    the dataset at ``path``; each changed part is rewritten atomically, then the manifest.
    Returns what :func:`hqrs_geo.layer.io.write_layer` returns (a :class:`TileLayer`)."""
    from .io import TileLayer, _file_state

    if layer != "tiles" or tables:
        raise OutputError(f"{path}: a dataset holds tile parts only; write result layers and tables to a "
                          "GeoPackage («output»), or merge the dataset into one first")
    manifest = open_manifest(path)
    if tiles.crs is not None and manifest.crs is not None and tiles.crs != manifest.crs:
        raise OutputError(f"{path}: the dataset is in {manifest.crs}, the tiles in {tiles.crs}; write tiles in the "
                          "dataset's CRS")
    parts = _part_of_rows(manifest, tiles)
    if parts.isna().any():
        stray = tiles.loc[parts.isna(), TILE_ID].iloc[0]
        raise OutputError(f"{path}: tile {stray} belongs to no part of the dataset; add scenes with the job "
                          "that made the dataset (run or tile with this folder as output)")
    replace = set(replace_sources if replace_sources is not None else tiles[SOURCE].unique())
    touched = set(parts.unique())
    if replace_all:
        touched |= set(manifest.parts)
    else:
        touched |= {name for name, part in manifest.parts.items()
                    if manifest.scenes.get(part["scene"], {}).get("source") in replace}
    if run is not None:
        manifest.runs.append({"run_id": len(manifest.runs) + 1, **run})
    for name in sorted(touched):
        rows = tiles[parts == name]
        target = manifest.folder / name
        if rows.empty:
            target.unlink(missing_ok=True)
            manifest.parts[name] = {**manifest.parts[name], "tiles": 0, "bounds": None, "bounds_wgs84": None}
            continue
        runs = part_runs(target) if target.exists() else []
        if run is not None:
            runs.append({"run_id": len(runs) + 1, **run})
        manifest.parts[name] = {**manifest.parts[name], **write_part(target, rows, runs)}
    manifest.save()
    frame = tiles.sort_values(TILE_ID, kind="stable").reset_index(drop=True) if TILE_ID in tiles.columns else tiles
    return TileLayer(str(path), frame, DatasetRuns(manifest), _file_state(path))


# -- merging into one layer -----------------------------------------------------------------------
def _as_blobs(frame: Any) -> Any:
    """Embedding arrays (as read from GeoParquet) as little-endian BLOBs of their own float width."""
    import numpy as np

    from .columns import encode

    for name in embedding_columns(list(frame.columns)):
        values = frame[name]
        present = values.map(has_value)
        if not present.any():
            continue
        first = np.asarray(values[present].iloc[0])
        dtype = "float16" if first.dtype == np.float16 else "float32"
        blobs = encode(np.stack([np.asarray(v) for v in values[present]]), dtype)
        out: list[bytes | None] = [None] * len(values)
        for i, blob in zip(np.flatnonzero(present.to_numpy()), blobs):
            out[int(i)] = blob
        frame[name] = out
    return frame


def merge_dataset(path: PathLike, output: PathLike, bbox: Sequence[float] | None = None,
                  bbox_crs: str | None = None) -> Any:
    """Write the tiles of the dataset at ``path`` (those intersecting ``bbox``, in ``bbox_crs`` or
    the dataset's CRS) as one tile layer ``output`` (GeoPackage for QGIS, GeoParquet or
    FlatGeobuf), with the dataset's run records and the readings of its scenes: every command
    works on the merged layer as on the dataset. Returns the merged layer as a :class:`TileLayer`."""
    from .io import TileLayer, _file_state, _write_fgb, _write_gpkg, _write_parquet, check_writable, layer_format
    from .runs import new_run

    if is_dataset(output):
        raise OutputError(f"{output}: is a dataset; merge into a file ending in .gpkg, .parquet or .fgb")
    check_writable(output)
    manifest = open_manifest(path)
    frame = read_dataset_tiles(path, bbox, bbox_crs)
    sources = set(frame[SOURCE]) if not frame.empty else set()
    readings = [s["reading"] for s in manifest.scenes.values() if s.get("reading") and s.get("source") in sources]
    params = {"dataset": str(Path(path).resolve()), "bbox": list(bbox) if bbox is not None else None,
              "bbox_crs": bbox_crs, "parts": len(manifest.part_files()), "scenes": readings}
    runs = [*manifest.runs, {"run_id": len(manifest.runs) + 1, **new_run("merge", "tiles", params)}]
    for name in (SOURCE_URL, STAC_ITEM):
        if name in frame.columns:
            frame[name] = frame[name].astype(object)
    driver = layer_format(output)
    if driver == "Parquet":
        _write_parquet(output, frame, runs, {})
    else:
        frame = _as_blobs(frame.copy())
        (_write_gpkg(output, frame, runs, "tiles", {}) if driver == "GPKG" else _write_fgb(output, frame, runs, {}))
    return TileLayer(str(output), frame, LayerRuns(runs, output), _file_state(output))


def dataset_summary(path: PathLike) -> dict:
    """Counts of a dataset: scenes, parts, tiles, failed scenes, bytes."""
    manifest = open_manifest(path)
    return {"scenes": len(manifest.scenes), "parts": len(manifest.part_files()),
            "tiles": sum(int(p.get("tiles", 0)) for p in manifest.parts.values()),
            "failed": len(manifest.failed), "bytes": sum(int(p.get("bytes", 0)) for p in manifest.parts.values()),
            "crs": manifest.crs}


__all__ = ["FORMAT", "MANIFEST", "DatasetRuns", "Manifest", "dataset_summary", "is_dataset",
           "is_dataset_output", "merge_dataset", "open_manifest", "part_name", "part_record", "part_runs",
           "read_dataset_runs", "read_dataset_tiles", "write_dataset_layer", "write_part"]
