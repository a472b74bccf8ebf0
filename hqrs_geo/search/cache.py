"""The embedding-matrix cache beside a layer: decoded once, memory-mapped afterwards.

:func:`load_or_build` decodes a layer's embedding BLOBs once and stores them beside the layer
as ``<layer>.emb_<key>.npy`` (the matrix, in the stored type), ``.ids.npy`` (tile ids, same
row order) and ``.json`` (fingerprint: layer size, ``mtime_ns``, inode, key; shape, largest row
norm). Later opens memory-map the ``.npy`` (``np.load(mmap_mode="r")``) while the fingerprint
matches, so opening costs milliseconds and the pages are shared between processes; a changed
layer is decoded again. Files are written atomically (:mod:`hqrs_geo.atomic`); the JSON is
written last and is the commit marker.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, write_text
from ..errors import InputError
from ..layer.columns import TILE_ID, embedding_column, read_embeddings
from ..layer.io import read_tiles
from .exact import max_row_norm

CACHE_VERSION = 1


def safe_key(key: str) -> str:
    """A model key usable in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def layer_fingerprint(layer: Path, key: str) -> dict | None:
    """What the cache of ``key`` must have been made from (None when the layer is missing)."""
    try:
        st = os.stat(layer)
    except OSError:
        return None
    # the inode too: layers are rewritten by replacing the file, which gives it a new one
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "key": key}


@dataclass(frozen=True)
class CachePaths:
    """The three files of one cache."""

    matrix: Path
    ids: Path
    meta: Path

    @classmethod
    def of(cls, layer: Path, key: str) -> CachePaths:
        """The cache files of model ``key`` beside ``layer``."""
        base = f"{layer}.emb_{safe_key(key)}"
        return cls(Path(f"{base}.npy"), Path(f"{base}.ids.npy"), Path(f"{base}.json"))


@dataclass
class Matrix:
    """A layer's embedding matrix with its tile ids (``path``: the cache file when memory-mapped)."""

    matrix: np.ndarray
    ids: np.ndarray
    max_norm: float
    path: Path | None = None


def _save_npy(path: Path, array: np.ndarray, dtype: np.dtype, chunk: int = 65536) -> None:
    """Write ``array`` as ``dtype`` to ``path`` atomically, chunk by chunk."""
    with atomic_path(path) as tmp:
        if array.dtype.kind in "US" or array.ndim == 1:
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(array, dtype=dtype), allow_pickle=False)
        else:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=array.shape)
            for s in range(0, len(array), chunk):
                out[s:s + chunk] = array[s:s + chunk]
            out.flush()
            del out


def stored_dtype(values: Sequence, dim: int) -> np.dtype:
    """float16 when the layer stores 2-byte values (so the cache is lossless and half the size)."""
    for value in values:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return np.dtype(np.float16) if len(value) == 2 * dim else np.dtype(np.float32)
        if isinstance(value, np.ndarray) and value.dtype == np.float16:
            return np.dtype(np.float16)
        if value is not None and not (isinstance(value, float) and np.isnan(value)):
            return np.dtype(np.float32)
    return np.dtype(np.float16)


def decode_layer(frame: Any, key: str, layer: Path) -> tuple[np.ndarray, np.ndarray, np.dtype]:
    """``(matrix, tile ids, stored dtype)`` of the rows of ``frame`` that have an embedding of ``key``."""
    try:
        present, matrix = read_embeddings(frame, key)
    except InputError as exc:
        raise InputError(f"{layer}: {exc}") from None
    values = frame[embedding_column(key)]
    dtype = stored_dtype(values[present].tolist()[:1], matrix.shape[1])
    ids = np.asarray(frame[TILE_ID].to_numpy()[present]).astype(str)
    return matrix, ids, dtype


def load_cache(paths: CachePaths, fingerprint: dict) -> Matrix | None:
    """The memory-mapped cache when it matches ``fingerprint``, else None."""
    try:
        meta = json.loads(paths.meta.read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint:
            return None
        matrix = np.load(paths.matrix, mmap_mode="r", allow_pickle=False)
        ids = np.load(paths.ids, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if matrix.shape != (meta["n"], meta["dim"]) or ids.shape != (meta["n"],) or matrix.dtype.name != meta["dtype"]:
        return None
    return Matrix(matrix, ids, meta["max_norm"], paths.matrix)


def load_or_build(layer: Path, key: str, frame: Any = None) -> tuple[Matrix, dict | None]:
    """The embedding matrix of ``key`` in ``layer`` (memory-mapped from the cache, rebuilt when
    stale) and the layer's fingerprint. ``frame``: the layer already read (else it is read).
    When the folder is not writable the matrix stays in memory (with a warning)."""
    fingerprint = layer_fingerprint(layer, key)
    if fingerprint is None and frame is None:
        raise InputError(f"{layer}: file not found; tile a raster into a layer first")
    paths = CachePaths.of(layer, key)
    if fingerprint is not None:
        cached = load_cache(paths, fingerprint)
        if cached is not None:
            return cached, fingerprint
    if frame is None:
        frame = read_tiles(layer)
    matrix, ids, dtype = decode_layer(frame, key, layer)
    max_norm = max_row_norm(matrix)
    if not math.isfinite(max_norm):
        raise InputError(f"{layer}: embeddings of {key} contain NaN or infinite values; embed the layer again")
    if fingerprint is not None:
        meta = {"version": CACHE_VERSION, "fingerprint": fingerprint, "n": int(len(matrix)),
                "dim": int(matrix.shape[1]), "dtype": dtype.name, "max_norm": max_norm}
        try:
            paths.meta.unlink(missing_ok=True)
            _save_npy(paths.matrix, matrix, dtype)
            _save_npy(paths.ids, ids, ids.dtype)
            write_text(paths.meta, json.dumps(meta, indent=1, sort_keys=True))
        except OSError as exc:
            warnings.warn(f"{layer}: cannot cache embeddings beside the layer ({exc}); keeping them in memory",
                          stacklevel=3)
        else:
            cached = load_cache(paths, fingerprint)
            if cached is not None:
                return cached, fingerprint
    return Matrix(np.ascontiguousarray(matrix, dtype=dtype), ids, max_norm), fingerprint
