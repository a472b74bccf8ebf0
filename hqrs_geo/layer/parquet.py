"""GeoParquet tile layers (``.parquet``) and the files of dataset parts: the tiles with
embeddings as fixed-size lists, the run records in the ``hqrs_geo`` key of the schema metadata,
attribute tables as ``<file>.<name>.csv`` beside it; written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path
from ..errors import InputError
from .columns import decode, embedding_columns, has_value
from .crs import crs_text
from .formats import TILES_LAYER, PathLike, feature_check, first_line, write_sidecar_tables
from .runs import LayerRuns, parse_json

PARQUET_KEY = b"hqrs_geo"


def read_parquet(path: PathLike) -> Any:
    """The tiles of the GeoParquet file ``path`` (GeoDataFrame, as stored)."""
    try:
        return gpd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for foreign files
        raise InputError(f"{path}: cannot read layer {TILES_LAYER!r} ({first_line(exc)})") from None


def read_parquet_runs(path: PathLike) -> LayerRuns:
    """The run records of the GeoParquet file ``path`` (its schema metadata; empty when none)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as exc:  # pyarrow raises several types for foreign files
        raise InputError(f"{path}: cannot read as GeoParquet ({first_line(exc)})") from None
    return LayerRuns(parse_json(meta.get(PARQUET_KEY, b"[]"), path), path)


def stored_runs(path: PathLike) -> list[dict]:
    """The run records a GeoParquet file carries, without errors: empty for a file that has none
    or cannot be read (a foreign or truncated file is no dataset part)."""
    try:
        meta = pq.read_schema(path).metadata or {}
        return list(json.loads(meta.get(PARQUET_KEY, b"[]")))
    except Exception:  # a foreign or truncated file is not a part
        return []


def fixed_size_list(values: Any, dims: Any) -> Any:
    """Embedding BLOBs (or arrays read back from Parquet) as an Arrow fixed-size list column."""
    present = values.map(has_value).to_numpy()
    dim = int(dims[present].iloc[0]) if present.any() else 1
    first = values[present].iloc[0] if present.any() else b""
    width = (len(first) // dim) if isinstance(first, (bytes, bytearray)) else np.asarray(first).dtype.itemsize
    dtype = np.float16 if width == 2 else np.float32
    matrix = np.zeros((len(values), dim), dtype=dtype)
    if present.any():
        matrix[present] = decode(values[present].tolist(), dim).astype(dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), dim, mask=pa.array(~present))


def _string_columns(table: Any) -> Any:
    """Columns that are all empty (Arrow type null) become strings, so every part has one schema."""
    for i, column in enumerate(table.schema):
        if pa.types.is_null(column.type):
            table = table.set_column(i, pa.field(column.name, pa.string()), table.column(i).cast(pa.string()))
        elif pa.types.is_large_string(column.type):
            table = table.set_column(i, pa.field(column.name, pa.string()), table.column(i).cast(pa.string()))
    return table


def write_parquet_file(tmp: PathLike, frame: Any, runs: list[dict], part: bool = False) -> None:
    """Write ``frame`` to ``tmp`` as GeoParquet (embeddings as fixed-size lists, ``runs`` in the
    schema metadata); not atomic by itself: ``tmp`` is the temporary file of an
    :func:`~hqrs_geo.atomic.atomic_path`. ``part``: as a dataset part (every part one schema:
    all-empty columns as strings, no pandas index metadata)."""
    vectors = embedding_columns(list(frame.columns))
    frame.drop(columns=vectors).to_parquet(tmp, index=False)
    table = pq.read_table(tmp)
    for name in vectors:
        table = table.append_column(name, fixed_size_list(frame[name], frame[f"{name}_dim"]))
    if part:
        table = _string_columns(table)
    meta = dict(table.schema.metadata or {})
    meta[PARQUET_KEY] = json.dumps(runs).encode()
    if part:
        meta.pop(b"pandas", None)  # the index and dtypes are ours to set on reading
    pq.write_table(table.replace_schema_metadata(meta), tmp)


def write_parquet(path: PathLike, frame: Any, runs: list[dict], tables: dict | None = None) -> None:
    """Write ``frame`` to the GeoParquet file ``path`` with its run records atomically (checked to
    hold every feature), ``tables`` beside it."""
    def count(tmp: Path) -> int:
        return int(pq.read_metadata(tmp).num_rows)

    write_sidecar_tables(path, tables or {})
    with atomic_path(path, copy_existing=False, verify=feature_check(len(frame), count)) as tmp:
        write_parquet_file(tmp, frame, runs)


def geoparquet_crs(path: PathLike) -> str | None:
    """The CRS of a GeoParquet file's footprints as its ``geo`` metadata says, as short text
    (:func:`~hqrs_geo.layer.crs.crs_text`; ``OGC:CRS84``, the GeoParquet default, when it names
    none); None when it has none or the file cannot be read."""
    try:
        meta = pq.read_schema(path).metadata or {}
        geo = json.loads(meta.get(b"geo", b"{}"))
        column = geo.get("columns", {}).get(geo.get("primary_column", "geometry"), {})
    except Exception:  # pyarrow raises many types for damaged files
        return None
    if "crs" not in column:
        return "OGC:CRS84"  # the GeoParquet default
    return crs_text(column["crs"])


def parquet_bounds(path: PathLike) -> tuple[float, float, float, float] | None:
    """The extent of a GeoParquet file's footprints (its ``geo`` metadata's ``bbox``, else read
    from the footprints); None when it holds none."""
    try:
        meta = pq.read_metadata(path)
        geo = json.loads((meta.schema.to_arrow_schema().metadata or {}).get(b"geo", b"{}"))
        column = geo.get("primary_column", "geometry")
        if meta.num_rows == 0:
            return None
        box = geo.get("columns", {}).get(column, {}).get("bbox")
        if box is None or len(box) != 4:
            box = gpd.read_parquet(path, columns=[column]).total_bounds
    except Exception as exc:  # pyarrow raises many types for foreign files
        raise InputError(f"{path}: cannot read as GeoParquet ({first_line(exc)})") from None
    return (float(box[0]), float(box[1]), float(box[2]), float(box[3]))


__all__ = ["PARQUET_KEY", "fixed_size_list", "geoparquet_crs", "parquet_bounds", "read_parquet",
           "read_parquet_runs", "stored_runs", "write_parquet", "write_parquet_file"]
