"""Embedding columns on tile layers.

For a model with key ``K`` (``hqrs_geo.models.registry.ModelSpec.key``) a layer holds:

* ``emb_K`` – the L2-normalised image embedding: in GeoPackage and FlatGeobuf a BLOB of
  little-endian float16 (default) or float32 values; in GeoParquet a fixed-size list;
* ``emb_K_model`` – the model name; ``emb_K_dim`` – the dimension.

The value type and the model's checkpoint sha256 and preprocessing are in the run metadata.
Several models can be stored side by side. Reading back returns exactly what was written.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .errors import InputError, OptionError

DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def column(key: str) -> str:
    """Name of the embedding column of model ``key``."""
    return f"emb_{key}"


def encode(vectors: np.ndarray, dtype: str = "float16") -> list[bytes]:
    """Rows of ``vectors`` as little-endian BLOBs."""
    if dtype not in DTYPES:
        raise OptionError(f"invalid embedding type {dtype!r}: use float16 or float32")
    data = np.ascontiguousarray(vectors, dtype=DTYPES[dtype])
    return [row.tobytes() for row in data]


def decode(values: Sequence, dim: int) -> np.ndarray:
    """BLOBs (or fixed-size lists from GeoParquet) back into an ``(N, dim)`` array.

    BLOB width tells float16 from float32; missing values become rows of NaN.
    """
    out = np.full((len(values), dim), np.nan, dtype=np.float32)
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        if isinstance(value, (bytes, bytearray, memoryview)):
            width = len(value) // dim
            if width not in (2, 4) or len(value) != width * dim:
                raise InputError(f"embedding of {len(value)} bytes does not hold {dim} float16/float32 values")
            out[i] = np.frombuffer(value, dtype=DTYPES["float16" if width == 2 else "float32"])
        else:
            out[i] = np.asarray(value, dtype=np.float32)
    return out


def embedding_keys(frame) -> list[str]:
    """Model keys of the embedding columns present in a tile layer frame."""
    return [c[len("emb_"):-len("_dim")] for c in frame.columns if c.startswith("emb_") and c.endswith("_dim")]


def read_embeddings(frame, key: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(mask of rows that have one, float32 matrix of those rows)`` for model ``key``.

    With ``key=None`` the layer must hold exactly one model's embeddings.
    """
    keys = embedding_keys(frame)
    if key is None:
        if len(keys) != 1:
            raise InputError(
                "layer holds embeddings of " + (", ".join(keys) if keys else "no model")
                + "; name the model (run 'hqrs-geo embed' first if none)"
            )
        key = keys[0]
    if key not in keys:
        raise InputError(f"layer has no embeddings of model key {key!r} (has: {', '.join(keys) or 'none'})")
    dims = frame[f"emb_{key}_dim"].dropna().unique()
    if len(dims) != 1:
        raise InputError(f"embeddings of {key} have inconsistent dimensions {list(dims)}")
    values = frame[column(key)].tolist()
    present = np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in values], dtype=bool)
    matrix = decode([v for v, ok in zip(values, present) if ok], int(dims[0]))
    return present, matrix
