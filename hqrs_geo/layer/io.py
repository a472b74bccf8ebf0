"""Tile layers on disk: GeoPackage (default), GeoParquet (``.parquet``), FlatGeobuf (``.fgb``).

A tile layer holds one polygon per tile (columns in :mod:`hqrs_geo.layer.columns`) and the
run records of every job that wrote to it (:mod:`hqrs_geo.layer.runs`).

Writes go through :func:`hqrs_geo.atomic.atomic_path`: a temporary file in the same folder,
checked and then moved over the target, so an interrupted or failed write leaves the previous
file untouched. Writing tiles of a scene again replaces that scene's tiles (no duplicates),
keeps other scenes' tiles, and keeps the result columns of tiles whose pixel window did not
change. :func:`open_layer` reads a layer and its run records once for a whole job.
"""
from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import pandas as pd

from ..atomic import atomic_path, check_nonempty, folder_lock
from ..errors import InputError, OutputError
from .columns import TILE_ID, WINDOW_COLUMNS, decode, embedding_columns
from .dataset import is_dataset, read_dataset_tiles, write_dataset_layer
from .runs import PARQUET_KEY, RUN_FIELDS, RUNS_TABLE, LayerRuns, read_runs, sidecar_path

FORMATS = {".gpkg": "GPKG", ".parquet": "Parquet", ".geoparquet": "Parquet", ".fgb": "FlatGeobuf"}
TILES_LAYER = "tiles"
PathLike = Union[str, "os.PathLike[str]"]


def layer_format(path: PathLike) -> str:
    """The driver for ``path`` by its extension (``Dataset`` for a dataset folder, see
    :mod:`hqrs_geo.layer.dataset`); a one-line error for unsupported ones."""
    if is_dataset(path):
        return "Dataset"
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise OutputError(f"{path}: unsupported layer format {suffix or '(none)'!r}; use .gpkg, .parquet or .fgb")
    return FORMATS[suffix]


def is_layer_path(path: PathLike) -> bool:
    """True when ``path`` names a tile-layer file by its extension, or is a dataset folder."""
    return Path(str(path)).suffix.lower() in FORMATS or is_dataset(path)


def check_writable(path: PathLike) -> None:
    """Fail early, before any work, when ``path`` cannot be written."""
    if layer_format(path) == "Dataset":
        if not os.access(path, os.W_OK):
            raise OutputError(f"{path}: not writable (permission denied); choose another output")
        return
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: folder {folder} does not exist; create it or choose another output")
    if target.exists() and target.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name ending in .gpkg, .parquet or .fgb")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise OutputError(f"{path}: not writable (permission denied); choose another output")


def read_tiles(path: PathLike, layer: str = TILES_LAYER) -> Any:
    """Read a tile layer as a GeoDataFrame ordered by ``tile_id`` (scene, row, column).

    One-line errors for missing or foreign files. A dataset folder is read whole.
    """
    import geopandas as gpd

    driver = layer_format(path)
    if driver == "Dataset":
        return read_dataset_tiles(path)
    if not Path(path).exists():
        raise InputError(f"{path}: file not found; tile a raster into a layer first")
    if Path(path).is_dir():
        raise InputError(f"{path}: is a folder, not a tile layer file")
    try:
        if driver == "Parquet":
            frame = gpd.read_parquet(path)
        else:
            import pyogrio

            frame = pyogrio.read_dataframe(path, layer=layer) if driver == "GPKG" else pyogrio.read_dataframe(path)
    except Exception as exc:  # pyogrio/pyarrow raise many types for foreign files
        raise InputError(f"{path}: cannot read layer {layer!r} ({str(exc).splitlines()[0]})") from None
    if TILE_ID not in frame.columns:
        raise InputError(f"{path}: not an hqrs_geo tile layer (no tile_id column); tile a raster into a layer first")
    return frame.sort_values(TILE_ID, kind="stable").reset_index(drop=True)


def _file_state(path: PathLike) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


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
        return self.state is not None and _file_state(self.path) == self.state


def open_layer(path: PathLike) -> TileLayer:
    """Read the tiles and run records of the layer at ``path`` (one-line errors)."""
    state = _file_state(path)
    frame = read_tiles(path)
    runs = read_runs(path)
    return TileLayer(str(path), frame, runs, state if _file_state(path) == state else None)


def merge_tiles(existing: Any, new: Any, replace_sources: Sequence[str]) -> Any:
    """Combine an existing tile layer with new tiles without duplicates.

    Existing tiles of ``replace_sources`` are replaced by ``new``; extra columns (embeddings,
    captions…) of an existing tile are carried over when its id and pixel window are unchanged.
    Tiles of other sources are kept as they are.
    """
    import geopandas as gpd

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


def has_layer(path: PathLike, layer: str) -> bool:
    """True when the file exists and holds ``layer`` (always True for single-layer formats)."""
    if not Path(path).exists():
        return False
    if layer_format(path) != "GPKG":  # single-layer formats and datasets
        return True
    import pyogrio

    try:
        return layer in [name for name, _ in pyogrio.list_layers(path)]
    except Exception:  # pyogrio raises several types for foreign files
        raise InputError(f"{path}: exists but is not a readable GeoPackage; remove it or choose another output") \
            from None


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
    (see :func:`~hqrs_geo.layer.runs.new_run`) is appended to the file's run records.
    ``tables``: extra attribute tables ``{name: DataFrame}`` written in the same atomic step
    (GeoPackage tables; ``<layer>.<name>.csv`` beside other formats). ``known``: the layer as
    the job read it (:func:`open_layer`); used instead of reading it again while unchanged.
    """
    check_writable(path)
    driver = layer_format(path)
    if driver == "Dataset":
        return write_dataset_layer(path, tiles, run, replace_sources, layer, replace_all, tables)
    folder = Path(path).parent if str(Path(path).parent) else Path(".")
    with folder_lock(folder, path):  # another job's read-modify-write of this layer finishes first
        return _write_layer(path, driver, tiles, run, replace_sources, layer, replace_all, tables, known)


def _write_layer(path: PathLike, driver: str, tiles: Any, run: dict | None, replace_sources: Sequence[str] | None,
                 layer: str, replace_all: bool, tables: dict | None, known: TileLayer | None) -> TileLayer:
    """:func:`write_layer` of a layer file, under its folder's lock."""
    reuse = known is not None and layer == TILES_LAYER and Path(known.path) == Path(path) and known.unchanged()
    existing = None
    if reuse and known is not None:
        existing = known.frame
    elif not replace_all and has_layer(path, layer):
        existing = read_tiles(path, layer)
    if replace_all:
        existing = None
    sources = replace_sources if replace_sources is not None else tiles["source"].unique().tolist()
    merged = merge_tiles(existing, tiles, sources)
    if reuse and known is not None:
        runs = list(known.runs)
    else:
        runs = list(read_runs(path)) if Path(path).exists() else []
    if run is not None:
        runs.append({"run_id": len(runs) + 1, **run})
    if driver == "GPKG":
        _write_gpkg(path, merged, runs, layer, tables or {})
    elif driver == "Parquet":
        _write_parquet(path, merged, runs, tables or {})
    else:
        _write_fgb(path, merged, runs, tables or {})
    if TILE_ID in merged.columns:
        merged = merged.sort_values(TILE_ID, kind="stable").reset_index(drop=True)
    return TileLayer(str(path), merged, LayerRuns(runs, path), _file_state(path))


def _runs_table(runs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{**r, "params": json.dumps(r["params"], sort_keys=True)} for r in runs],
                        columns=list(RUN_FIELDS))


def _verifier(driver: str, rows: int, layer: str | None = None) -> Callable[[Path], None]:
    """A check of a written layer file: it opens, and ``layer`` holds ``rows`` features."""
    def verify(tmp: Path) -> None:
        check_nonempty(tmp)
        try:
            if driver == "Parquet":
                import pyarrow.parquet as pq

                found = pq.read_metadata(tmp).num_rows
            else:
                import pyogrio

                found = pyogrio.read_info(tmp, layer=layer)["features"]
        except Exception as exc:  # pyogrio/pyarrow raise many types for damaged files
            raise OSError(errno.EIO, f"the written file cannot be read back ({str(exc).splitlines()[0][:120]})") \
                from None
        if found != rows:
            raise OSError(errno.EIO, f"the written file holds {found} features instead of {rows}")
    return verify


def _write_gpkg(path: PathLike, frame: Any, runs: list[dict], layer: str, tables: dict) -> None:
    import pyogrio

    with atomic_path(path, copy_existing=True, verify=_verifier("GPKG", len(frame), layer)) as tmp:
        # through Arrow, so bytes columns (embeddings) become real BLOBs
        pyogrio.write_dataframe(frame, tmp, layer=layer, driver="GPKG", geometry_type="Polygon", use_arrow=True)
        pyogrio.write_dataframe(_runs_table(runs), tmp, layer=RUNS_TABLE, driver="GPKG")
        for name, table in tables.items():
            pyogrio.write_dataframe(table, tmp, layer=name, driver="GPKG")


def _write_sidecar_tables(path: PathLike, tables: dict) -> None:
    from ..safe_paths import file_name, frame_to_csv

    for name, table in tables.items():
        frame_to_csv(Path(f"{path}.{file_name(str(name), 'table name')}.csv"), table)


def _write_parquet(path: PathLike, frame: Any, runs: list[dict], tables: dict) -> None:
    import pyarrow.parquet as pq

    vectors = {c: frame[c] for c in embedding_columns(list(frame.columns))}
    _write_sidecar_tables(path, tables)
    with atomic_path(path, copy_existing=False, verify=_verifier("Parquet", len(frame))) as tmp:
        frame.drop(columns=list(vectors)).to_parquet(tmp, index=False)
        table = pq.read_table(tmp)
        for name, values in vectors.items():
            table = table.append_column(name, _fixed_size_list(values, frame[f"{name}_dim"]))
        meta = dict(table.schema.metadata or {})
        meta[PARQUET_KEY] = json.dumps(runs).encode()
        pq.write_table(table.replace_schema_metadata(meta), tmp)


def _fixed_size_list(values: Any, dims: Any) -> Any:
    """Embedding BLOBs (or arrays read back from Parquet) as an Arrow fixed-size list column."""
    import numpy as np
    import pyarrow as pa

    from .columns import has_value

    present = values.map(has_value).to_numpy()
    dim = int(dims[present].iloc[0]) if present.any() else 1
    first = values[present].iloc[0] if present.any() else b""
    width = (len(first) // dim) if isinstance(first, (bytes, bytearray)) else np.asarray(first).dtype.itemsize
    dtype = np.float16 if width == 2 else np.float32
    matrix = np.zeros((len(values), dim), dtype=dtype)
    if present.any():
        matrix[present] = decode(values[present].tolist(), dim).astype(dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), dim, mask=pa.array(~present))


def _write_fgb(path: PathLike, frame: Any, runs: list[dict], tables: dict) -> None:
    import pyogrio

    from ..atomic import write_text

    _write_sidecar_tables(path, tables)
    with atomic_path(path, copy_existing=False, verify=_verifier("FlatGeobuf", len(frame))) as tmp:
        pyogrio.write_dataframe(frame, tmp, driver="FlatGeobuf", geometry_type="Polygon", use_arrow=True)
        write_text(sidecar_path(path), json.dumps(runs, indent=1))


__all__ = ["FORMATS", "TILES_LAYER", "TileLayer", "check_writable", "has_layer",
           "is_layer_path", "layer_format", "merge_tiles", "open_layer", "read_tiles", "write_layer", "write_tiles"]
