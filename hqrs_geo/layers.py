"""Tile layers on disk: GeoPackage (default), GeoParquet (``.parquet``), FlatGeobuf (``.fgb``).

A tile layer holds one polygon per tile (columns in :data:`hqrs_geo.tiling.TILE_COLUMNS`)
and a record of every run that wrote to it, so a layer explains how it was made:

* GeoPackage: attribute table ``hqrs_runs`` (run_id, created, command, version, layer, params JSON);
* GeoParquet: the ``hqrs_geo`` key of the file's schema metadata (JSON list of runs);
* FlatGeobuf: a sidecar ``<file>.hqrs.json``.

Writes go to a temporary file in the same folder that replaces the target atomically, so an
interrupted write leaves the previous file untouched. Writing tiles of a scene again replaces
that scene's tiles (no duplicates) and keeps other scenes' tiles.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import pandas as pd

from .errors import InputError, OutputError

FORMATS = {".gpkg": "GPKG", ".parquet": "Parquet", ".geoparquet": "Parquet", ".fgb": "FlatGeobuf"}
TILES_LAYER = "tiles"
RUNS_TABLE = "hqrs_runs"
WINDOW_COLUMNS = ("source", "x_off", "y_off", "width", "height", "out_width", "out_height")
PathLike = Union[str, os.PathLike]


def layer_format(path: PathLike) -> str:
    """The driver for ``path`` by its extension; a one-line error for unsupported ones."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise OutputError(f"{path}: unsupported layer format {suffix or '(none)'!r}; use .gpkg, .parquet or .fgb")
    return FORMATS[suffix]


def check_writable(path: PathLike) -> None:
    """Fail early, before any work, when ``path`` cannot be written."""
    layer_format(path)
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: folder {folder} does not exist; create it or choose another output")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise OutputError(f"{path}: not writable (permission denied); choose another output")


def _sidecar(path: PathLike) -> Path:
    return Path(f"{path}.hqrs.json")


@contextmanager
def atomic_path(path: PathLike, copy_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (a copy of it with ``copy_existing``, else not yet
    created); when the block succeeds it replaces ``path`` atomically, otherwise it is removed."""
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if copy_existing and target.exists():
            shutil.copy2(target, tmp)
        else:
            tmp.unlink()
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_runs(path: PathLike) -> list[dict]:
    """The run records of a layer, oldest first (empty when it has none)."""
    driver = layer_format(path)
    if not Path(path).exists():
        return []
    if driver == "GPKG":
        import pyogrio

        names = [name for name, _ in pyogrio.list_layers(path)]
        if RUNS_TABLE not in names:
            return []
        table = pyogrio.read_dataframe(path, layer=RUNS_TABLE)
        runs = table.to_dict("records")
        for run in runs:
            run["params"] = json.loads(run["params"])
        return runs
    if driver == "Parquet":
        import pyarrow.parquet as pq

        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta.get(b"hqrs_geo", b"[]"))
    sidecar = _sidecar(path)
    return json.loads(sidecar.read_text()) if sidecar.exists() else []


def read_tiles(path: PathLike, layer: str = TILES_LAYER):
    """Read a tile layer as a GeoDataFrame ordered by ``tile_id`` (scene, row, column).

    One-line errors for missing or foreign files.
    """
    import geopandas as gpd
    import pyogrio

    driver = layer_format(path)
    if not Path(path).exists():
        raise InputError(f"{path}: file not found; make a tile layer with 'hqrs-geo tile'")
    try:
        if driver == "Parquet":
            frame = gpd.read_parquet(path)
        elif driver == "GPKG":
            frame = pyogrio.read_dataframe(path, layer=layer)
        else:
            frame = pyogrio.read_dataframe(path)
    except Exception as exc:  # pyogrio/pyarrow raise many types for foreign files
        raise InputError(f"{path}: cannot read layer {layer!r} ({str(exc).splitlines()[0]})") from None
    if "tile_id" not in frame.columns:
        raise InputError(f"{path}: not an hqrs_geo tile layer (no tile_id column); make one with 'hqrs-geo tile'")
    return frame.sort_values("tile_id", kind="stable").reset_index(drop=True)


def new_run(command: str, layer: str, params: dict) -> dict:
    """A run record for ``params`` (JSON-serialisable) made now by this package version."""
    from . import __version__

    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "version": __version__,
        "layer": layer,
        "params": params,
    }


def merge_tiles(existing, new, replace_sources: Sequence[str]):
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
            f"write a new file or pass --crs {existing.crs.to_string() if existing.crs else '(none)'}"
        )
    replaced = existing["source"].isin(list(replace_sources))
    old = existing[replaced]
    extra = [c for c in existing.columns if c not in new.columns and c != existing.geometry.name]
    if extra and not old.empty:
        carry = old[["tile_id", *WINDOW_COLUMNS, *extra]]
        new = new.merge(carry, on=["tile_id", *WINDOW_COLUMNS], how="left")
    merged = pd.concat([existing[~replaced], new], ignore_index=True)
    return gpd.GeoDataFrame(merged, geometry=existing.geometry.name if new.empty else new.geometry.name,
                            crs=existing.crs if new.empty else new.crs)


def write_tiles(
    path: PathLike,
    tiles,
    run: Optional[dict] = None,
    replace_sources: Optional[Sequence[str]] = None,
    layer: str = TILES_LAYER,
    replace_all: bool = False,
):
    """Write ``tiles`` to ``path`` atomically, merging with an existing layer; returns what was written.

    ``replace_sources``: sources whose existing tiles are replaced (default: the sources in
    ``tiles``); ``replace_all``: the layer becomes exactly ``tiles`` (result layers). ``run``
    (see :func:`new_run`) is appended to the file's run records.
    """
    check_writable(path)
    driver = layer_format(path)
    existing = None
    if not replace_all and Path(path).exists() and _has_layer(path, layer):
        existing = read_tiles(path, layer)
    sources = replace_sources if replace_sources is not None else tiles["source"].unique().tolist()
    merged = merge_tiles(existing, tiles, sources)
    runs = read_runs(path) if Path(path).exists() else []
    if run is not None:
        runs.append({"run_id": len(runs) + 1, **run})
    try:
        if driver == "GPKG":
            _write_gpkg(path, merged, runs, layer)
        elif driver == "Parquet":
            _write_parquet(path, merged, runs)
        else:
            _write_fgb(path, merged, runs)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); check free space and permissions") from None
    return merged


def _has_layer(path: PathLike, layer: str) -> bool:
    if layer_format(path) != "GPKG":
        return True
    import pyogrio

    try:
        return layer in [name for name, _ in pyogrio.list_layers(path)]
    except Exception:
        raise InputError(f"{path}: exists but is not a readable GeoPackage; remove it or choose another output") from None


def _write_gpkg(path: PathLike, frame, runs: list[dict], layer: str) -> None:
    import pyogrio

    table = pd.DataFrame(
        [{**r, "params": json.dumps(r["params"], sort_keys=True)} for r in runs],
        columns=["run_id", "created", "command", "version", "layer", "params"],
    )
    with atomic_path(path, copy_existing=True) as tmp:
        # through Arrow, so bytes columns (embeddings) become real BLOBs
        pyogrio.write_dataframe(frame, tmp, layer=layer, driver="GPKG", geometry_type="Polygon", use_arrow=True)
        pyogrio.write_dataframe(table, tmp, layer=RUNS_TABLE, driver="GPKG")


def _write_parquet(path: PathLike, frame, runs: list[dict]) -> None:
    import pyarrow.parquet as pq

    vectors = {c: frame[c] for c in frame.columns if c.startswith("emb_") and f"{c}_dim" in frame.columns}
    with atomic_path(path, copy_existing=False) as tmp:
        frame.drop(columns=list(vectors)).to_parquet(tmp, index=False)
        table = pq.read_table(tmp)
        for name, values in vectors.items():
            table = table.append_column(name, _fixed_size_list(values, frame[f"{name}_dim"]))
        meta = dict(table.schema.metadata or {})
        meta[b"hqrs_geo"] = json.dumps(runs).encode()
        pq.write_table(table.replace_schema_metadata(meta), tmp)


def _fixed_size_list(values, dims):
    """Embedding BLOBs (or arrays read back from Parquet) as an Arrow fixed-size list column."""
    import numpy as np
    import pyarrow as pa

    from .embeddings import decode

    present = values.map(lambda v: v is not None and not (isinstance(v, float) and np.isnan(v))).to_numpy()
    dim = int(dims[present].iloc[0]) if present.any() else 1
    first = values[present].iloc[0] if present.any() else b""
    width = (len(first) // dim) if isinstance(first, (bytes, bytearray)) else np.asarray(first).dtype.itemsize
    dtype = np.float16 if width == 2 else np.float32
    matrix = np.zeros((len(values), dim), dtype=dtype)
    if present.any():
        matrix[present] = decode(values[present].tolist(), dim).astype(dtype)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), dim, mask=pa.array(~present))


def _write_fgb(path: PathLike, frame, runs: list[dict]) -> None:
    import pyogrio

    with atomic_path(_sidecar(path), copy_existing=False) as side_tmp, atomic_path(path, copy_existing=False) as tmp:
        pyogrio.write_dataframe(frame, tmp, driver="FlatGeobuf", geometry_type="Polygon", use_arrow=True)
        side_tmp.write_text(json.dumps(runs, indent=1))
