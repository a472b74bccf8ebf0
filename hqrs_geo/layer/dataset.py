"""Partitioned tile datasets: a folder of GeoParquet parts plus a manifest.

A dataset is what the scale-out engine (:mod:`hqrs_geo.engine.partitioned`) writes for an
archive of scenes: one GeoParquet file per scene, or per block of grid rows of a large
scene, each written atomically (:func:`hqrs_geo.atomic.atomic_path`), and ``_manifest.json``
(written atomically too)::

    DATASET/
      _manifest.json                 # the manifest (:mod:`hqrs_geo.layer.manifest`)
      <scene>.parquet                # one part per scene ...
      <scene>.b0003.parquet          # ... or per block of a large scene

Each part is a complete GeoParquet tile layer: the tile columns
(:data:`~hqrs_geo.layer.columns.TILE_COLUMNS`, ``source_url``, ``stac_item``), the results
(embeddings as fixed-size lists, captions), the footprints in the dataset's CRS, and in its
``hqrs_geo`` schema metadata the run records with the scene's reading and the part's facts
(``params.part``), so one part can be opened on its own. DuckDB
(``read_parquet('DATASET/*.parquet')``) and geopandas (``geopandas.read_parquet('DATASET')``;
names starting with ``_`` or ``.`` are skipped) read the parts as they are.

The manifest and its checks are in :mod:`hqrs_geo.layer.manifest` (its names are importable
from here too).

:func:`hqrs_geo.layer.io.open_layer`, :func:`~hqrs_geo.layer.io.read_tiles`,
:func:`~hqrs_geo.layer.io.read_runs` and :func:`~hqrs_geo.layer.io.write_tiles` accept a
dataset folder, so every command that reads or updates a tile layer works on one;
:func:`merge_dataset` writes one GeoPackage (or GeoParquet/FlatGeobuf) for QGIS.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
from pyproj import Transformer

from ..atomic import atomic_path, file_facts, folder_lock
from ..errors import InputError, OutputError
from .columns import (
    PROVENANCE_COLUMNS,
    SOURCE,
    SOURCE_URL,
    STAC_ITEM,
    TILE_COLUMNS,
    TILE_ID,
    embedding_columns,
    encode,
    has_value,
)
from .crs import box_in, same_crs, validate_box
from .files import TileLayer, check_file_writable, has_layer, write_file
from .formats import TILES_LAYER, PathLike, file_format, file_state
from .manifest import (
    FORMAT,
    MANIFEST,
    VERSION,
    Manifest,
    bad_value,
    is_dataset,
    is_dataset_output,
    manifest_path,
    open_manifest,
    part_name,
    part_name_problem,
    part_path,
    part_problem,
    scene_reading,
    shown,
    validate_manifest,
    verified_part,
)
from .parquet import geoparquet_crs, stored_runs, write_parquet_file
from .runs import LayerRuns, new_run


# -- parts ----------------------------------------------------------------------------------------
def part_crs(path: PathLike) -> str | None:
    """The CRS of a part's footprints as its GeoParquet metadata says (None when it has none)."""
    return geoparquet_crs(path)


def frame_bounds(frame: Any) -> tuple[list[float] | None, list[float] | None]:
    """``(bounds in the frame's CRS, bounds in WGS 84)`` of a tile frame's footprints."""
    if frame.empty:
        return None, None
    bounds = [float(v) for v in frame.total_bounds]
    wgs84 = None
    if frame.crs is not None:
        transformer = Transformer.from_crs(frame.crs, "EPSG:4326", always_xy=True)
        box = transformer.transform_bounds(bounds[0], bounds[1], bounds[2], bounds[3], densify_pts=21)
        wgs84 = [float(v) for v in box]
    return bounds, wgs84


def write_part(path: PathLike, frame: Any, runs: list[dict]) -> dict:
    """Write one part (a GeoParquet tile layer) atomically; returns its file facts
    (``tiles``, ``bounds``, ``bounds_wgs84``, ``crs``, ``sha256``, ``bytes``, ``mtime_ns``)."""
    frame = frame.sort_values(TILE_ID, kind="stable").reset_index(drop=True)
    for name in PROVENANCE_COLUMNS:
        if name not in frame.columns:
            frame[name] = frame[SOURCE] if name == SOURCE_URL else None
    with atomic_path(path) as tmp:
        write_parquet_file(tmp, frame, runs, part=True)
    bounds, wgs84 = frame_bounds(frame)
    crs = frame.crs.to_string() if frame.crs is not None else None
    return {"tiles": int(len(frame)), "bounds": bounds, "bounds_wgs84": wgs84, "crs": crs, **file_facts(path)}


def part_record(path: PathLike) -> dict | None:
    """The ``params.part`` facts a part file carries (None for files that are not parts)."""
    for run in reversed(stored_runs(path)):
        part = (run.get("params") or {}).get("part")
        if part:
            return dict(part)
    return None


def _embedding_sizes(schema: Any) -> dict[str, int]:
    """``{embedding column: values per vector}`` of a part, from its Arrow schema."""
    return {name: schema.field(name).type.list_size for name in embedding_columns(schema.names)
            if pa.types.is_fixed_size_list(schema.field(name).type)}


def check_embedding_sizes(sizes: dict[str, dict[str, int]], where: PathLike) -> None:
    """Refuse parts whose embeddings have another dimension than most parts' (``sizes``: per
    part path, :func:`_embedding_sizes`), naming the first such part."""
    columns = {column for found in sizes.values() for column in found}
    for column in sorted(columns):
        counts = Counter(found[column] for found in sizes.values() if column in found)
        if len(counts) < 2:
            continue
        usual = counts.most_common(1)[0][0]
        odd = next(path for path, found in sizes.items() if found.get(column, usual) != usual)
        raise InputError(f"{odd}: its embeddings {column} have {sizes[odd][column]} values, the other parts of "
                         f"dataset {where} {usual}; embed the dataset again with one model («overwrite»), or "
                         "remove this part")


def _read_parts(manifest: Manifest, names: Sequence[str], where: PathLike) -> Any:
    """The tiles of parts ``names`` (each checked against the manifest, :func:`verified_part`),
    footprints in the dataset's CRS (a part in another CRS is reprojected)."""
    frames, sizes = [], {}
    for name in names:
        frame, path, found = _read_part(manifest, name, where)
        sizes[str(path)] = found
        frames.append(frame)
    check_embedding_sizes(sizes, where)
    if not frames:
        return None
    if len(frames) == 1:
        return frames[0]
    frame = pd.concat(frames, ignore_index=True)
    return gpd.GeoDataFrame(frame, geometry=frames[0].geometry.name, crs=frames[0].crs)


def read_part(manifest: Manifest, name: str, columns: Sequence[str] | None = None) -> Any:
    """The tiles of part ``name`` of the dataset ``manifest`` describes, ordered by ``tile_id``:
    the file checked against its entry first (:func:`verified_part`), footprints in the dataset's
    CRS; ``columns``: only these besides the footprint (a one-line error for a column the part
    lacks)."""
    frame, _, _ = _read_part(manifest, name, manifest.folder, columns)
    if TILE_ID in frame.columns:
        frame = frame.sort_values(TILE_ID, kind="stable").reset_index(drop=True)
    return frame


def _read_part(manifest: Manifest, name: str, where: PathLike, columns: Sequence[str] | None = None) \
        -> tuple[Any, Path, dict[str, int]]:
    """``(tiles, path, embedding sizes)`` of one verified part (see :func:`read_part`)."""
    path = verified_part(manifest, name)
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
        if columns is not None:
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise InputError(f"{path}: this part of dataset {where} has no column {missing[0]!r}; "
                                 f"it has {', '.join(n for n in schema.names if n != 'geometry')}")
            columns = [*dict.fromkeys([*columns, "geometry"])]
        sizes = _embedding_sizes(schema)
        frame = gpd.read_parquet(path, columns=columns)
    except InputError:
        raise
    except Exception as exc:  # pyarrow raises many types for damaged files
        raise InputError(f"{path}: cannot read this part of dataset {where} ({str(exc).splitlines()[0]}); "
                         "run the job that made the dataset again") from None
    listed = manifest.parts[name].get("tiles")
    if meta.num_rows != listed:  # the file is the one written (SHA-256): its entry was changed
        raise bad_value(manifest_path(manifest.folder), f"parts[{shown(name)}].tiles",
                   f"is {listed}, the part holds {meta.num_rows} tiles", "restore the manifest")
    return _in_dataset_crs(frame, manifest, path), path, sizes


def _in_dataset_crs(frame: Any, manifest: Manifest, path: PathLike) -> Any:
    """A part's tiles with footprints in the dataset's CRS (reprojected when the part is in another)."""
    if manifest.crs is None or same_crs(frame.crs, manifest.crs):
        return frame
    if frame.crs is None:
        raise InputError(f"{path}: this part has no CRS, the dataset {manifest.folder} is in {manifest.crs}; run "
                         "the job that made the dataset again")
    return frame.to_crs(manifest.crs)


def _empty_frame(manifest: Manifest) -> Any:
    return gpd.GeoDataFrame({c: [] for c in (*TILE_COLUMNS, *PROVENANCE_COLUMNS)},
                            geometry=gpd.GeoSeries([], crs=manifest.crs), crs=manifest.crs)


def _overlaps(a: Sequence[float] | None, b: Sequence[float]) -> bool:
    return a is not None and all(math.isfinite(v) for v in b) and not (
        a[0] > b[2] or a[2] < b[0] or a[1] > b[3] or a[3] < b[1])


# -- reading --------------------------------------------------------------------------------------
def read_dataset_tiles(path: PathLike, bbox: Sequence[float] | None = None, bbox_crs: str | None = None) -> Any:
    """The tiles of a dataset as one GeoDataFrame ordered by ``tile_id``, footprints in the
    dataset's CRS; with ``bbox`` (in ``bbox_crs``, default the dataset's CRS) only the tiles
    intersecting it (parts outside it are not read). Every part read is checked against its
    manifest entry first (:func:`verified_part`)."""
    validate_box(bbox, bbox_crs)
    manifest = open_manifest(path)
    names = [name for name in sorted(manifest.parts) if manifest.parts[name].get("tiles", 0) > 0]
    box = None
    if bbox is not None:
        box = box_in(bbox, bbox_crs, manifest.crs)
        boxes: dict[Any, tuple[float, ...]] = {}

        def box_of(crs: Any) -> tuple[float, ...]:
            if crs not in boxes:  # a part in another CRS records its bounds in its own CRS
                boxes[crs] = box_in(bbox, bbox_crs or manifest.crs, crs)
            return boxes[crs]

        names = [n for n in names if _overlaps(manifest.parts[n].get("bounds"),
                                               box_of(manifest.parts[n].get("crs") or manifest.crs))]
    frame = _read_parts(manifest, names, path)
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
        out = super().scenes()
        where = manifest_path(self.manifest.folder)
        for key, scene in self.manifest.scenes.items():
            if scene.get("reading"):
                reading = scene_reading(where, key, scene["reading"])
                out[reading.source] = reading
        return out


def read_dataset_runs(path: PathLike) -> DatasetRuns:
    """The run records of a dataset."""
    return DatasetRuns(open_manifest(path))


# -- writing back (results of embed, caption, classify, score columns) -----------------------------
def _part_of_rows(manifest: Manifest, frame: Any) -> Any:
    """The part file name of each row of a tile frame (by its scene and grid row)."""
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
    if layer != "tiles" or tables:
        raise OutputError(f"{path}: a dataset holds tile parts only; write result layers and tables to a "
                          "GeoPackage («output»), or merge the dataset into one first")
    manifest = open_manifest(path)
    if tiles.crs is not None and manifest.crs is not None and not same_crs(tiles.crs, manifest.crs):
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
        commit_part(manifest, name, tiles[parts == name], run)
    manifest.save()
    frame = tiles.sort_values(TILE_ID, kind="stable").reset_index(drop=True) if TILE_ID in tiles.columns else tiles
    return TileLayer(str(path), frame, DatasetRuns(manifest), file_state(path))


def commit_part(manifest: Manifest, name: str, rows: Any, run: dict | None = None) -> None:
    """Rewrite part ``name`` with ``rows`` (its tiles with new or changed columns; none: the part
    is emptied) and record it in the manifest on disk, both under the dataset's lock: the
    manifest never lists a part file that is not there. Columns another job added to the part
    since this job read it are kept."""
    target = part_path(manifest.folder, name)
    with manifest.locked():
        manifest.refresh()
        if name not in manifest.parts:  # another job dropped it (its scene was made again)
            return
        if rows.empty:
            target.unlink(missing_ok=True)
            manifest.parts[name] = {**manifest.parts[name], "tiles": 0, "bounds": None, "bounds_wgs84": None}
        else:
            runs = stored_runs(target) if target.exists() else []
            if run is not None:
                runs.append({"run_id": len(runs) + 1, **run})
            rows = _keep_columns_of(manifest, name, target, rows)
            manifest.parts[name] = {**manifest.parts[name], **write_part(target, rows, runs)}
        manifest.save()


def _keep_columns_of(manifest: Manifest, name: str, target: Path, rows: Any) -> Any:
    """``rows`` with the result columns the part file on disk has and ``rows`` lacks (written by
    another job meanwhile), matched by tile id."""
    if not target.exists() or part_problem(manifest.folder, name, manifest.parts[name]) is not None:
        return rows
    try:
        names = pq.read_schema(target).names
    except Exception:  # pyarrow raises many types for damaged files: nothing to keep
        return rows
    missing = [c for c in names if c not in rows.columns and c != "geometry"]
    if not missing or TILE_ID not in names:
        return rows
    found = gpd.read_parquet(target, columns=[TILE_ID, *missing, "geometry"]).drop(columns="geometry")
    rows = rows.merge(found, on=TILE_ID, how="left")
    return rows


# -- merging into one layer -----------------------------------------------------------------------
def _as_blobs(frame: Any) -> Any:
    """Embedding arrays (as read from GeoParquet) as little-endian BLOBs of their own float width."""
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
                  bbox_crs: str | None = None, overwrite: bool = False) -> Any:
    """Write the tiles of the dataset at ``path`` (those intersecting ``bbox``, in ``bbox_crs`` or
    the dataset's CRS) as one tile layer ``output`` (GeoPackage for QGIS, GeoParquet or
    FlatGeobuf), with the dataset's run records and the readings of its scenes: every command
    works on the merged layer as on the dataset. ``output`` must be outside the dataset; an
    existing tile layer there is replaced only with ``overwrite``. Parts in another CRS than the
    dataset's are reprojected. Returns the merged layer as a :class:`TileLayer`."""
    validate_box(bbox, bbox_crs)
    if is_dataset(output):
        raise OutputError(f"{output}: is a dataset; merge into a file ending in .gpkg, .parquet or .fgb")
    manifest = open_manifest(path)
    folder, target = Path(path).resolve(), Path(output).resolve()
    if folder == target or folder in target.parents:
        raise OutputError(f"{output}: is inside the dataset {path} being merged; write the merged layer outside "
                          "the dataset folder")
    check_file_writable(output)
    driver = file_format(output)
    with folder_lock(target.parent, output):
        if not overwrite:
            _refuse_existing_layer(output, driver)
        frame = read_dataset_tiles(path, bbox, bbox_crs)
        sources = set(frame[SOURCE]) if not frame.empty else set()
        readings = [s["reading"] for s in manifest.scenes.values()
                    if s.get("reading") and s.get("source") in sources]
        params = {"dataset": str(folder), "bbox": list(bbox) if bbox is not None else None,
                  "bbox_crs": bbox_crs, "parts": len(manifest.part_files()), "scenes": readings}
        runs = [*manifest.runs, {"run_id": len(manifest.runs) + 1, **new_run("merge", "tiles", params)}]
        for name in (SOURCE_URL, STAC_ITEM):
            if name in frame.columns:
                frame[name] = frame[name].astype(object)
        if driver != "Parquet":
            frame = _as_blobs(frame.copy())
        write_file(output, frame, runs, TILES_LAYER)
    return TileLayer(str(output), frame, LayerRuns(runs, output), file_state(output))


def _refuse_existing_layer(output: PathLike, driver: str) -> None:
    """A one-line error when ``output`` already holds a tile layer (a GeoPackage may hold other layers)."""
    if not Path(output).exists():
        return
    if driver == "GPKG" and not has_layer(output, TILES_LAYER):
        return
    raise OutputError(f"{output}: already holds a tile layer; add «overwrite» to replace it, or choose another "
                      "output")


def dataset_summary(path: PathLike) -> dict:
    """Counts of a dataset: scenes, parts, tiles, failed scenes, bytes."""
    manifest = open_manifest(path)
    return {"scenes": len(manifest.scenes), "parts": len(manifest.part_files()),
            "tiles": sum(int(p.get("tiles", 0)) for p in manifest.parts.values()),
            "failed": len(manifest.failed), "bytes": sum(int(p.get("bytes", 0)) for p in manifest.parts.values()),
            "crs": manifest.crs}


__all__ = ["FORMAT", "MANIFEST", "VERSION", "DatasetRuns", "Manifest", "check_embedding_sizes", "commit_part",
           "dataset_summary", "frame_bounds", "is_dataset", "is_dataset_output", "manifest_path", "merge_dataset",
           "open_manifest", "part_crs", "part_name", "part_name_problem", "part_path", "part_problem", "part_record",
           "read_dataset_runs", "read_dataset_tiles", "read_part", "same_crs", "validate_manifest", "verified_part",
           "write_dataset_layer", "write_part"]
