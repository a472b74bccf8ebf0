"""The column contract of tile layers: every column name hqrs_geo reads or writes, and how
embeddings are stored.

Tiles: :data:`TILE_COLUMNS` (then the footprint geometry). Scenes found by URL or in a STAC
catalog (:mod:`hqrs_geo.raster.catalog`), and every tile of a partitioned dataset
(:mod:`hqrs_geo.layer.dataset`), also carry :data:`PROVENANCE_COLUMNS`: ``source_url`` (the
scene's URL — ``https://…``, ``s3://…`` — or the absolute path of a local file) and
``stac_item`` (the STAC item id, empty otherwise). Results added later: ``caption``
and ``caption_model``; ``label``, ``label_score``, ``label_top`` (zero-shot classes);
``mpgi_caption``, ``mpgi_short``, ``mpgi_facts``, ``mpgi_recipe`` (MpGI). For a model with key
``K`` (:attr:`hqrs_geo.models.registry.ModelSpec.key`):

* ``emb_K`` – the L2-normalised image embedding: in GeoPackage and FlatGeobuf a BLOB of
  little-endian float16 (default) or float32 values; in GeoParquet a fixed-size list;
* ``emb_K_model`` – the model name; ``emb_K_dim`` – the dimension.

The value type and the model's checkpoint sha256 and preprocessing are in the run records
(:mod:`hqrs_geo.layer.runs`). Several models can be stored side by side. Reading back returns
exactly what was written.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError, OptionError

# -- the tiles ------------------------------------------------------------------------------
TILE_ID = "tile_id"
SOURCE = "source"
#: Columns every tile layer has, in this order (then the geometry).
TILE_COLUMNS = (
    TILE_ID, SOURCE, "row", "col", "x_off", "y_off", "width", "height",
    "out_width", "out_height", "valid_fraction", "gsd",
)
SOURCE_URL = "source_url"
STAC_ITEM = "stac_item"
#: Where a tile's scene was found: its URL (or path) and STAC item id (see the module docstring).
PROVENANCE_COLUMNS = (SOURCE_URL, STAC_ITEM)
#: The columns that locate a tile's pixels: a tile keeps its results only while these are unchanged.
WINDOW_COLUMNS = (SOURCE, "x_off", "y_off", "width", "height", "out_width", "out_height")

# -- results of the model engine, search and MpGI --------------------------------------------
CAPTION = "caption"
CAPTION_MODEL = "caption_model"
LABEL = "label"
LABEL_SCORE = "label_score"
LABEL_TOP = "label_top"
SCORE = "score"
RANK = "rank"
MPGI_CAPTION = "mpgi_caption"
MPGI_SHORT = "mpgi_short"
MPGI_FACTS = "mpgi_facts"
MPGI_RECIPE = "mpgi_recipe"

EMBEDDING_PREFIX = "emb_"
DTYPES: dict[str, np.dtype] = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def embedding_column(key: str) -> str:
    """Name of the embedding column of model ``key`` (``emb_<key>``)."""
    return f"{EMBEDDING_PREFIX}{key}"


def embedding_model_column(key: str) -> str:
    """Name of the column holding the model name beside the embeddings of ``key``."""
    return f"{EMBEDDING_PREFIX}{key}_model"


def embedding_dim_column(key: str) -> str:
    """Name of the column holding the dimension beside the embeddings of ``key``."""
    return f"{EMBEDDING_PREFIX}{key}_dim"


def embedding_columns(columns: Sequence[str]) -> list[str]:
    """The embedding vector columns (``emb_<key>`` with an ``emb_<key>_dim`` beside it) among ``columns``."""
    names = set(columns)
    return [c for c in columns if c.startswith(EMBEDDING_PREFIX) and f"{c}_dim" in names]


def key_of_column(name: str) -> str | None:
    """The model key of an embedding column name (``emb_<key>``), or None for other columns."""
    return name[len(EMBEDDING_PREFIX):] if name.startswith(EMBEDDING_PREFIX) else None


def has_value(value: Any) -> bool:
    """True for a stored result (not None / NaN)."""
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def encode(vectors: np.ndarray, dtype: str = "float16") -> list[bytes]:
    """Rows of ``vectors`` as little-endian BLOBs."""
    if dtype not in DTYPES:
        raise OptionError(f"invalid embedding type {dtype!r}: use float16 or float32", option="embedding_dtype")
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
            out[i] = np.frombuffer(bytes(value), dtype=DTYPES["float16" if width == 2 else "float32"])
        else:
            out[i] = np.asarray(value, dtype=np.float32)
    return out


def embedding_keys(frame: Any) -> list[str]:
    """Model keys of the embedding columns present in a tile layer frame."""
    return [c[len(EMBEDDING_PREFIX):] for c in embedding_columns(list(frame.columns))]


def read_embeddings(frame: Any, key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
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
    dims = frame[embedding_dim_column(key)].dropna().unique()
    if len(dims) != 1:
        raise InputError(f"embeddings of {key} have inconsistent dimensions {list(dims)}")
    values = frame[embedding_column(key)].tolist()
    present = np.array([has_value(v) for v in values], dtype=bool)
    matrix = decode([v for v, ok in zip(values, present) if ok], int(dims[0]))
    return present, matrix
