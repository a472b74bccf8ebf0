"""Exact and approximate nearest-neighbour search over one embedding matrix.

A :class:`VectorIndex` holds the ``(N, D)`` embedding matrix of one model key of a tile layer
(float16 or float32, usually a read-only ``np.memmap``) and the tile id of every row. Scores
are dot products, i.e. cosine similarities for the L2-normalised vectors the layers hold.

Cache
    :meth:`VectorIndex.open` decodes the layer's embedding BLOBs once and stores them beside
    the layer as ``<layer>.emb_<key>.npy`` (the matrix, in the stored type), ``.ids.npy`` (tile
    ids, same row order) and ``.json`` (fingerprint: layer size, ``mtime_ns``, inode, key, shape,
    largest row norm). Later opens memory-map the ``.npy`` (``np.load(mmap_mode="r")``) while
    the fingerprint matches, so opening costs milliseconds and the pages are shared between
    processes; a changed layer is decoded again. Files are written to a temporary name and
    moved into place with ``os.replace``; the JSON is written last and is the commit marker.

Exact search (the default)
    Measured on 1,000,000 x 512 float16 rows (a 977 MiB memory-mapped cache), 2 cores
    (AMD EPYC, AVX-512), torch 2.14, numpy 2.4; see ``benchmarks/search.py``:

    * one query: torch's float16 matrix-vector kernel (``torch.mv`` on a tensor sharing the
      memory-mapped array via ``torch.from_numpy``, no copy) reads the float16 data directly
      and accumulates in float32; it is memory-bandwidth bound: ~35 ms (1 GB read), ~40 ms
      with top-k selection and re-scoring;
    * a float32 copy would cost 2 GB more memory and be *slower* for one query (twice the
      bytes to read: numpy/BLAS ``sgemv`` ~90 ms, ``torch.mv`` ~190 ms), so none is kept;
      numpy has no float16 BLAS (``float16 @`` is very slow) and its float16 -> float32
      conversion costs ~1 s per pass; a bfloat16 copy (1 GB more) multiplies in ~100 ms;
    * torch's float16 matrix-*matrix* product has no fast CPU kernel (time grows linearly
      with the number of queries), so from :data:`SMALL_BATCH` queries on, the matrix is
      converted in chunks of :data:`CHUNK_ROWS` rows into a reused float32 buffer and
      multiplied with the whole batch of queries by float32 GEMM: one pass over the matrix
      for the batch, ~13 ms per query for 200 queries (compute bound), with a running
      top-k per query so memory stays O(queries x chunk).

    The fast scores are approximate: the float16 kernel rounds the query and the result to
    float16. Their error bound ``eps = (2**-10 + D * 2**-23) * |q| * max_row_norm`` (float32
    GEMM: ``D * 2**-23 * |q| * max_row_norm``) is known, so every row whose fast score is
    within ``2 * eps`` of the k-th best is re-scored exactly, ``float32(row) . query`` (tens
    of rows), and the final order is by that exact score, ties broken by row order. Results
    therefore equal a brute-force float32 computation (scores to ~1e-7: summation order;
    the re-scoring sums every row the same way, so equal rows get equal scores). Should a kernel ever exceed its bound
    (checked on every re-scored row), the index warns once and uses the float32 GEMM path
    from then on. Without torch (it comes with the ``models`` extra) the same algorithm runs
    on numpy: correct, but float16 conversion makes it ~1 s per pass. Masks allowing at most
    1/8 of the rows (and at most :data:`SUBSET_ROWS`) are searched on those rows only.

Approximate search (optional, FAISS)
    :meth:`VectorIndex.build_ann` builds an inner-product FAISS index, ``"hnsw"``
    (``IndexHNSWFlat``) or ``"ivf"`` (``IndexIVFFlat``), measures its recall@10 against exact
    search and saves it beside the layer with the layer's fingerprint; :meth:`load_ann`
    reloads it while it is still valid. Both keep float32 vectors (4 * N * D bytes, on top of
    the memory-mapped matrix). Defaults (:data:`ANN_DEFAULTS`), measured on 1,000,000 x 512
    clustered vectors, 2 cores: HNSW ``M=32, efConstruction=64, efSearch=512`` builds in
    ~2.5 min (+2.4 GB), recall@10 0.97 at ~1 ms per query (``efSearch=128``: 0.93 at 0.5 ms,
    256: 0.95, the graph caps recall near 0.97 at this ``efConstruction``); IVF
    ``nlist=sqrt(N), nprobe=16`` builds in ~11 s (k-means on 40 * nlist rows), recall@10 1.0
    at ~2 ms per query on that data (IVF builds much faster and suits clustered embeddings;
    HNSW answers faster). ANN results are re-scored exactly like exact results. With a mask, the ANN index is asked for
    more neighbours than needed (``k / fraction_allowed * 2``, at most
    :data:`ANN_MAX_FETCH`), masked rows are dropped, and a query keeping fewer than ``k`` rows
    is answered by exact search over the allowed rows instead, so masked rows never appear.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, failure_code, output_error
from ..errors import InputError, OptionError, OutputError

PathLike = str | os.PathLike

CACHE_VERSION = 1
#: From this many queries on, float16 matrices are searched by one chunked float32 GEMM pass.
SMALL_BATCH = 8
#: Rows converted to float32 at a time in the GEMM pass (fits the L2 cache at D = 512).
CHUNK_ROWS = 4096
#: A mask allowing at most this many rows (and at most 1/8 of them) is searched on those rows only.
SUBSET_ROWS = 65536
#: Most neighbours fetched from an ANN index for a masked query before falling back to exact search.
ANN_MAX_FETCH = 4096
ANN_DEFAULTS: dict[str, dict[str, Any]] = {
    # 1M x 512 clustered, 2 cores: build ~2.5 min, recall@10 0.97 at ~1 ms per query
    "hnsw": {"M": 32, "efConstruction": 64, "efSearch": 512},
    # same data: build ~11 s, recall@10 1.0 at ~2 ms per query
    "ivf": {"nlist": None, "nprobe": 16},  # nlist None: about sqrt(N)
}
RECALL_QUERIES = 200
FAISS_HINT = "pip install faiss-cpu"


def _torch():
    """Torch when installed (the fast float16 kernels), else None."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is installed with the models extra
        return None
    return torch


def _faiss():
    """Import FAISS lazily; a one-line OptionError with the install command when it is missing."""
    try:
        import faiss
    except ImportError:
        raise OptionError(
            f"approximate search needs FAISS, which is not installed: run '{FAISS_HINT}' "
            "(or pip install 'hqrs_geo[ann]'), or search exactly (without «ann»)"
        ) from None
    return faiss


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def _layer_fingerprint(layer: Path, key: str) -> dict | None:
    try:
        st = os.stat(layer)
    except OSError:
        return None
    # the inode too: layers are rewritten by replacing the file, which gives it a new one
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "key": key}


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))


def _save_npy(path: Path, array: np.ndarray, dtype: np.dtype, chunk: int = 65536) -> None:
    """Write ``array`` as ``dtype`` to ``path`` through a temporary file, chunk by chunk."""
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


def _stored_dtype(values: Sequence, dim: int) -> np.dtype:
    """float16 when the layer stores 2-byte values (so the cache is lossless and half the size)."""
    for value in values:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return np.dtype(np.float16) if len(value) == 2 * dim else np.dtype(np.float32)
        if isinstance(value, np.ndarray) and value.dtype == np.float16:
            return np.dtype(np.float16)
        if value is not None and not (isinstance(value, float) and np.isnan(value)):
            return np.dtype(np.float32)
    return np.dtype(np.float16)


def _dot(block: np.ndarray, query: np.ndarray) -> np.ndarray:
    """float32 ``block @ query`` computed the same way for every row (BLAS kernels may sum rows in
    different orders by position, which would give equal rows unequal scores and break ties)."""
    return np.einsum("ij,j->i", block, query, optimize=False)


def _max_norm(matrix: np.ndarray) -> float:
    """Largest row norm (NaN or inf when a row holds NaN or inf)."""
    torch = _torch()
    best = 0.0
    for s in range(0, len(matrix), 65536):
        if torch is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only memmap: only read
                block = torch.from_numpy(np.asarray(matrix[s:s + 65536])).float()
            value = float(torch.linalg.vector_norm(block, dim=1).max())
        else:
            block = np.asarray(matrix[s:s + 65536], dtype=np.float32)
            value = math.sqrt(float(np.einsum("ij,ij->i", block, block).max()))
        if not math.isfinite(value):
            return value
        best = max(best, value)
    return best


def _order(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` by descending score, ties by ascending row (stable)."""
    order = np.lexsort((rows, -scores))[:k]
    return scores[order], rows[order]


class VectorIndex:
    """Nearest-neighbour search over an ``(N, D)`` embedding matrix whose rows are tiles ``ids``."""

    ids: np.ndarray
    matrix: np.ndarray

    def __init__(self, matrix: np.ndarray, ids, *, layer: PathLike | None = None, key: str | None = None,
                 fingerprint: dict | None = None, max_norm: float | None = None):
        """Use :meth:`from_matrix` or :meth:`open`; this stores already checked arguments."""
        self.matrix = matrix
        self.ids = ids
        self.layer = Path(layer) if layer is not None else None
        self.key = key
        self.fingerprint = fingerprint
        self._max_norm = max_norm
        self._tensor = None
        self._kernel = "mv16" if matrix.dtype == np.float16 else "mv32"
        self._ann: Any = None
        self._ann_info: dict | None = None
        self._digest: str | None = None
        self.cache_path: Path | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_matrix(cls, matrix: np.ndarray, ids=None) -> VectorIndex:
        """An index over ``matrix`` (float16 or float32 kept as is and not copied when C-contiguous,
        other types converted to float32); ``ids`` default to the row numbers as strings."""
        if not isinstance(matrix, np.ndarray):
            matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[1] == 0:
            raise OptionError(f"embedding matrix must be 2-D (rows x dimension), got shape {matrix.shape}")
        if matrix.dtype not in (np.float16, np.float32) or not matrix.dtype.isnative:
            matrix = matrix.astype(np.float32 if matrix.dtype != np.float16 else np.float16)
        if not matrix.flags.c_contiguous:
            matrix = np.ascontiguousarray(matrix)
        if ids is None:
            ids = np.arange(len(matrix)).astype(str)
        ids = np.asarray(ids)
        if ids.dtype.kind not in "U":
            ids = ids.astype(str)
        if ids.shape != (len(matrix),):
            raise OptionError(f"{len(ids)} ids for {len(matrix)} embedding rows: give one id per row")
        return cls(matrix, ids)

    @classmethod
    def open(cls, layer: PathLike, key: str, frame=None) -> VectorIndex:
        """The embeddings of model ``key`` in tile layer ``layer``, memory-mapped from a cache beside it.

        The cache (``<layer>.emb_<key>.npy`` / ``.ids.npy`` / ``.json``) is reused while the
        layer's size and modification time match its fingerprint, otherwise (re)built from
        ``frame`` (the layer as read by :func:`hqrs_geo.read_tiles`, to avoid reading it again)
        or from the file. Rows without an embedding are left out. When the folder is not
        writable the index stays in memory (with a warning).
        """
        layer = Path(layer)
        fingerprint = _layer_fingerprint(layer, key)
        if fingerprint is None and frame is None:
            raise InputError(f"{layer}: file not found; tile a raster into a layer first")
        base = Path(f"{layer}.emb_{_safe(key)}")
        paths = cls._cache_paths(base)
        if fingerprint is not None:
            index = cls._load_cache(paths, fingerprint, layer, key)
            if index is not None:
                return index
        if frame is None:
            from ..layer.io import read_tiles

            frame = read_tiles(layer)
        matrix, ids, dtype = cls._decode(frame, key, layer)
        max_norm = _max_norm(matrix)
        if not math.isfinite(max_norm):
            raise InputError(f"{layer}: embeddings of {key} contain NaN or infinite values; "
                             f"embed the layer again")
        if fingerprint is not None:
            meta = {"version": CACHE_VERSION, "fingerprint": fingerprint, "n": int(len(matrix)),
                    "dim": int(matrix.shape[1]), "dtype": dtype.name, "max_norm": max_norm}
            try:
                paths["json"].unlink(missing_ok=True)
                _save_npy(paths["matrix"], matrix, dtype)
                _save_npy(paths["ids"], ids, ids.dtype)
                _write_json(paths["json"], meta)
            except OSError as exc:
                warnings.warn(f"{layer}: cannot cache embeddings beside the layer ({exc.strerror or exc}); "
                              "keeping them in memory", stacklevel=2)
            else:
                index = cls._load_cache(paths, fingerprint, layer, key)
                if index is not None:
                    return index
        index = cls(np.ascontiguousarray(matrix, dtype=dtype), ids, layer=layer, key=key,
                    fingerprint=fingerprint, max_norm=max_norm)
        return index

    @staticmethod
    def _cache_paths(base: Path) -> dict:
        return {"matrix": Path(f"{base}.npy"), "ids": Path(f"{base}.ids.npy"), "json": Path(f"{base}.json")}

    @classmethod
    def _load_cache(cls, paths: dict, fingerprint: dict, layer: Path, key: str) -> VectorIndex | None:
        try:
            meta = json.loads(paths["json"].read_text())
            if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != fingerprint:
                return None
            matrix = np.load(paths["matrix"], mmap_mode="r", allow_pickle=False)
            ids = np.load(paths["ids"], allow_pickle=False)
        except (OSError, ValueError):
            return None
        if matrix.shape != (meta["n"], meta["dim"]) or ids.shape != (meta["n"],) or matrix.dtype.name != meta["dtype"]:
            return None
        index = cls(matrix, ids, layer=layer, key=key, fingerprint=fingerprint, max_norm=meta["max_norm"])
        index.cache_path = paths["matrix"]
        return index

    @staticmethod
    def _decode(frame, key: str, layer: Path) -> tuple[np.ndarray, np.ndarray, np.dtype]:
        from ..layer.columns import embedding_column, read_embeddings

        try:
            present, matrix = read_embeddings(frame, key)
        except InputError as exc:
            raise InputError(f"{layer}: {exc}") from None
        values = frame[embedding_column(key)]
        dtype = _stored_dtype(values[present].tolist()[:1], matrix.shape[1])
        ids = np.asarray(frame["tile_id"].to_numpy()[present]).astype(str)
        return matrix, ids, dtype

    # ------------------------------------------------------------------ properties
    @property
    def n(self) -> int:
        """Number of rows (tiles with an embedding)."""
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        ann = self._ann_info["kind"] if self._ann_info else None
        return f"VectorIndex(n={self.n}, dim={self.dim}, dtype={self.matrix.dtype.name}, ann={ann})"

    @property
    def max_norm(self) -> float:
        """Largest row norm (bounds the error of the fast scores); computed once."""
        if self._max_norm is None:
            self._max_norm = _max_norm(self.matrix)
            if not math.isfinite(self._max_norm):
                self._max_norm = None
                raise OptionError("the embedding matrix contains NaN or infinite values; recompute the embeddings")
        return self._max_norm

    def _tensor_view(self):
        """The matrix as a torch tensor sharing its memory (never written to)."""
        if self._tensor is None:
            torch = _torch()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only memmap: torch only reads it
                self._tensor = torch.from_numpy(self.matrix)
        return self._tensor

    # ------------------------------------------------------------------ argument checks
    def _check_queries(self, queries) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise OptionError(f"query vectors have shape {np.shape(queries)}; "
                              f"expected ({self.dim},) or (Q, {self.dim})")
        if not np.isfinite(q).all():
            raise OptionError("query vectors contain NaN or infinite values")
        return np.ascontiguousarray(q)

    def _check_mask(self, mask) -> np.ndarray | None:
        if mask is None:
            return None
        mask = np.asarray(mask)
        if mask.shape != (self.n,) or mask.dtype != bool:
            raise OptionError(f"mask must be a boolean array of {self.n} values (one per row), "
                              f"got {mask.dtype} {mask.shape}")
        return mask

    @staticmethod
    def _check_k(k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise OptionError(f"invalid k {k!r}: ask for at least one result")
        return int(k)

    # ------------------------------------------------------------------ scoring kernels
    def _exact(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
        """float32 scores of ``rows`` (ascending row numbers) for one query: the reference values."""
        out = np.empty(len(rows), dtype=np.float32)
        for s in range(0, len(rows), 65536):
            block = np.asarray(self.matrix[rows[s:s + 65536]], dtype=np.float32)
            out[s:s + 65536] = _dot(block, query)
        return out

    def _eps(self, norm: float, kernel: str) -> float:
        """Bound on |fast score - float32 score| for a query of norm ``norm``."""
        scale = norm * self.max_norm
        if kernel == "mv16":
            return (2.0 ** -10 + self.dim * 2.0 ** -23) * scale + 2.0 ** -24
        return self.dim * 2.0 ** -23 * scale + 2.0 ** -40

    def _mv(self, query: np.ndarray, norm: float) -> np.ndarray:
        """Fast (N,) scores of one query with the per-query kernel."""
        torch = _torch()
        if self._kernel == "mv16" and torch is not None and self.max_norm < 1024:  # no float16 overflow
            unit = torch.from_numpy(query / norm).to(torch.float16)
            scores = torch.mv(self._tensor_view(), unit).float().numpy()
            return scores * np.float32(norm)
        if self.matrix.dtype == np.float32:
            return np.asarray(self.matrix @ query, dtype=np.float32)
        return self._gemm(query[None, :])[0]

    def _gemm(self, queries: np.ndarray) -> np.ndarray:
        """(Q, N) float32 scores in one pass over the matrix (float16 chunks converted to float32)."""
        n, q = self.n, len(queries)
        out = np.empty((q, n), dtype=np.float32)
        qt = np.ascontiguousarray(queries.T)
        torch = _torch()
        if torch is not None:
            qt_t = torch.from_numpy(qt)
            tmp = torch.empty((min(CHUNK_ROWS, n), q), dtype=torch.float32)
            for s, chunk in self._torch_float32_chunks():
                m = len(chunk)
                torch.mm(chunk, qt_t, out=tmp[:m])
                out[:, s:s + m] = tmp[:m].numpy().T
        else:  # pragma: no cover - exercised only without torch
            for s in range(0, n, CHUNK_ROWS):
                chunk = np.asarray(self.matrix[s:s + CHUNK_ROWS], dtype=np.float32)
                out[:, s:s + len(chunk)] = (chunk @ qt).T
        return out

    @staticmethod
    def _kth(scores: np.ndarray, k: int) -> np.ndarray:
        """k-th largest value of every row of a 2-D array."""
        torch = _torch()
        if torch is not None:
            return torch.topk(torch.from_numpy(scores), k, dim=1, sorted=False).values.min(dim=1).values.numpy()
        return np.partition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k]

    def _select(self, fast: np.ndarray, query: np.ndarray, kth: float, eps: float, k: int
                ) -> tuple[np.ndarray, np.ndarray] | None:
        """Re-score rows whose fast score may be in the top k; None when the bound was broken."""
        rows = np.flatnonzero(fast >= kth - 2 * eps)
        exact = self._exact(rows, query)
        if len(rows) and float(np.abs(fast[rows] - exact).max()) > eps * 1.001:
            return None
        return _order(exact, rows, k)

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int = 10, mask: np.ndarray | None = None,
               use_ann: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows by dot product (cosine similarity for normalised vectors).

        ``queries``: ``(D,)`` or ``(Q, D)`` (normalised by the caller). Returns ``(scores, rows)``,
        both ``(Q, k')`` (``Q = 1`` for a single query), best first, ``k' = min(k, candidates)``;
        ``rows`` index :attr:`matrix` / :attr:`ids`; ties are broken by row order. ``mask`` (N,)
        bool: rows where it is False never appear. Exact search unless ``use_ann`` is True,
        which needs an index from :meth:`build_ann` or :meth:`load_ann` (``None`` = exact).
        Scores are float32 ``float32(row) @ query`` either way.
        """
        q = self._check_queries(queries)
        k = self._check_k(k)
        mask = self._check_mask(mask)
        if use_ann:
            if self._ann is None:
                raise OptionError("no approximate (ANN) index is loaded: build one with build_ann() or "
                                  "'hqrs-geo index', or search exactly")
            return self._search_ann(q, k, mask)
        return self._search_exact(q, k, mask)

    def _search_exact(self, q: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n_q, n = len(q), self.n
        allowed = n if mask is None else int(mask.sum())
        k = min(k, allowed)
        scores = np.zeros((n_q, k), dtype=np.float32)
        rows = np.zeros((n_q, k), dtype=np.int64)
        if k == 0:
            return scores, rows
        norms = np.linalg.norm(q, axis=1)
        if mask is not None and allowed <= min(SUBSET_ROWS, n // 8):
            subset = np.flatnonzero(mask)
            block = np.asarray(self.matrix[subset], dtype=np.float32)
            for i in range(n_q):
                scores[i], rows[i] = _order(_dot(block, q[i]), subset, k)
            return scores, rows
        blocked = None if mask is None else ~mask
        zero = np.flatnonzero(norms == 0)
        if len(zero):  # every score is 0: the first allowed rows
            first = np.flatnonzero(mask)[:k] if mask is not None else np.arange(k)
            rows[zero] = first
        todo = np.flatnonzero(norms > 0)
        if self._kernel in ("mv16", "mv32") and len(todo) < SMALL_BATCH:
            for i in map(int, todo):
                fast = self._mv(q[i], float(norms[i]))
                if blocked is not None:
                    fast[blocked] = -np.inf
                kth = float(self._kth(fast[None, :], k)[0])
                result = self._select(fast, q[i], kth, self._eps(float(norms[i]), self._kernel), k)
                if result is None:
                    warnings.warn("fast float16 scores exceeded their error bound; using float32 GEMM from now on",
                                  RuntimeWarning, stacklevel=3)
                    self._kernel = "gemm"
                    return self._search_exact(q, k, mask)
                scores[i], rows[i] = result
            return scores, rows
        for i, (cand, fast) in zip(map(int, todo), self._batch_candidates(q[todo], k, mask, norms[todo])):
            exact = self._exact(cand, q[i])
            if len(cand) and float(np.abs(fast - exact).max()) > self._eps(float(norms[i]), "gemm") * 1.001:
                cand = np.flatnonzero(mask) if mask is not None else np.arange(n)  # pragma: no cover
                exact = self._exact(cand, q[i])  # pragma: no cover - float32 GEMM stays within its bound
            scores[i], rows[i] = _order(exact, cand, k)
        return scores, rows

    def _batch_candidates(self, q: np.ndarray, k: int, mask: np.ndarray | None, norms: np.ndarray):
        """One pass over the matrix for all queries: per query, the rows (ascending) whose float32
        GEMM score is within ``2 * eps`` of its k-th best, with those scores.

        Chunks of :data:`CHUNK_ROWS` rows are converted to float32 and multiplied with the whole
        block of queries; a running top-k per query sets the threshold, so memory stays
        O(queries x chunk) whatever the number of rows.
        """
        n, n_q = self.n, len(q)
        tol = np.asarray([2 * self._eps(float(v), "gemm") for v in norms], dtype=np.float32)
        torch = _torch()
        found_q, found_r, found_s = [], [], []
        if torch is not None:
            queries = torch.from_numpy(q)
            tol_t = torch.from_numpy(tol)
            blocked = torch.from_numpy(~mask) if mask is not None else None
            best = torch.full((n_q, k), -np.inf)
            for s, chunk in self._torch_float32_chunks():
                m = len(chunk)
                block = torch.mm(queries, chunk.T)  # (Q, m)
                if blocked is not None:
                    block.masked_fill_(blocked[s:s + m], -np.inf)
                top = torch.topk(block, min(k, m), dim=1, sorted=False).values
                best = torch.topk(torch.cat([best, top], dim=1), k, dim=1, sorted=False).values
                threshold = best.min(dim=1).values - tol_t
                qi, col = torch.nonzero((block >= threshold[:, None]) & (block > -np.inf), as_tuple=True)
                found_q.append(qi.numpy())
                found_r.append(col.numpy() + s)
                found_s.append(block[qi, col].numpy())
            final = (best.min(dim=1).values - tol_t).numpy()
        else:  # pragma: no cover - exercised with torch hidden in the tests
            best = np.full((n_q, k), -np.inf, dtype=np.float32)
            for s in range(0, n, CHUNK_ROWS):
                block = q @ np.asarray(self.matrix[s:s + CHUNK_ROWS], dtype=np.float32).T
                m = block.shape[1]
                if mask is not None:
                    block[:, ~mask[s:s + m]] = -np.inf
                top = np.partition(block, m - min(k, m), axis=1)[:, m - min(k, m):]
                both = np.concatenate([best, top], axis=1)
                best = np.partition(both, both.shape[1] - k, axis=1)[:, both.shape[1] - k:]
                threshold = best.min(axis=1) - tol
                qi, col = np.nonzero((block >= threshold[:, None]) & (block > -np.inf))
                found_q.append(qi)
                found_r.append(col + s)
                found_s.append(block[qi, col])
            final = best.min(axis=1) - tol
        qi, rows, fast = (np.concatenate(parts) for parts in (found_q, found_r, found_s))
        keep = fast >= final[qi]
        qi, rows, fast = qi[keep], rows[keep], fast[keep]
        order = np.argsort(qi, kind="stable")  # rows stay ascending within a query
        bounds = np.searchsorted(qi[order], np.arange(n_q + 1))
        for j in range(n_q):
            part = order[bounds[j]:bounds[j + 1]]
            yield rows[part], fast[part]

    def scores(self, query: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """float32 scores of every row for one query, ``(N,)``; NaN where ``mask`` is False."""
        q = self._check_queries(query)
        if len(q) != 1:
            raise OptionError(f"scores() takes one query vector, got {len(q)}")
        mask = self._check_mask(mask)
        out = self._gemm(q)[0]
        if mask is not None:
            out[~mask] = np.nan
        return out

    def _search_ann(self, q: np.ndarray, k: int, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = self.n
        allowed = n if mask is None else int(mask.sum())
        k = min(k, allowed)
        scores = np.zeros((len(q), k), dtype=np.float32)
        rows = np.zeros((len(q), k), dtype=np.int64)
        if k == 0:
            return scores, rows
        fetch = k if mask is None else math.ceil(2 * k * n / allowed)
        if fetch > min(ANN_MAX_FETCH, n):  # too selective for the ANN index: exact over the allowed rows
            return self._search_exact(q, k, mask)
        _, found = self._ann.search(q, fetch)
        fallback = []
        for i in range(len(q)):
            cand = found[i][found[i] >= 0]
            if mask is not None:
                cand = cand[mask[cand]]
            if len(cand) < k:
                fallback.append(i)
                continue
            cand = np.sort(cand)
            scores[i], rows[i] = _order(self._exact(cand, q[i]), cand, k)
        if fallback:
            scores[fallback], rows[fallback] = self._search_exact(q[fallback], k, mask)
        return scores, rows

    # ------------------------------------------------------------------ ANN index
    def _ann_path(self, kind: str, path: PathLike | None) -> Path | None:
        if path is not None:
            return Path(path)
        if self.layer is None or self.fingerprint is None:
            return None
        return Path(f"{self.layer}.emb_{_safe(str(self.key))}.{kind}.faiss")

    def _ann_fingerprint(self) -> dict:
        """What a saved ANN index must have been built from: the layer (or the matrix's content)."""
        if self.fingerprint is not None:
            return {"layer": self.fingerprint, "n": self.n, "dim": self.dim}
        if self._digest is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{self.n}x{self.dim}:{self.matrix.dtype.name}".encode())
            h.update(self.ids.tobytes())
            for s in range(0, self.n, 65536):
                h.update(np.ascontiguousarray(self.matrix[s:s + 65536]).tobytes())
            self._digest = h.hexdigest()
        return {"digest": self._digest, "n": self.n, "dim": self.dim}

    def _ann_params(self, kind: str, params: dict) -> dict:
        if kind not in ANN_DEFAULTS:
            raise OptionError(f"invalid ANN index kind {kind!r}: use hnsw or ivf")
        unknown = sorted(set(params) - set(ANN_DEFAULTS[kind]))
        if unknown:
            raise OptionError(f"unknown {kind} parameter {unknown[0]!r}: use {', '.join(ANN_DEFAULTS[kind])}")
        merged = {**ANN_DEFAULTS[kind], **{k: v for k, v in params.items() if v is not None}}
        if kind == "ivf" and merged["nlist"] is None:
            merged["nlist"] = int(max(1, min(round(math.sqrt(self.n)), self.n // 39)))
        for name, value in merged.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise OptionError(f"invalid {kind} parameter {name}={value!r}: use a positive integer")
        if kind == "ivf":
            merged["nlist"] = min(int(merged["nlist"]), self.n)
            merged["nprobe"] = min(int(merged["nprobe"]), merged["nlist"])
        return {k: int(v) for k, v in merged.items()}

    @staticmethod
    def _apply_search_params(index, kind: str, params: dict) -> None:
        if kind == "hnsw":
            index.hnsw.efSearch = params["efSearch"]
        else:
            index.nprobe = params["nprobe"]

    def _torch_float32_chunks(self):
        """``(first row, float32 tensor)`` blocks of :data:`CHUNK_ROWS` rows; float16 rows are
        converted into one reused buffer (each block is valid until the next is yielded)."""
        import torch

        matrix = self._tensor_view()
        buf = torch.empty((min(CHUNK_ROWS, self.n), self.dim), dtype=torch.float32)
        for s in range(0, self.n, CHUNK_ROWS):
            chunk = matrix[s:s + CHUNK_ROWS]
            if chunk.dtype != torch.float32:
                buf[:len(chunk)].copy_(chunk)
                chunk = buf[:len(chunk)]
            yield s, chunk

    def _float32_chunks(self, chunk: int = 65536):
        for s in range(0, self.n, chunk):
            yield np.ascontiguousarray(self.matrix[s:s + chunk], dtype=np.float32)

    def build_ann(self, kind: str = "hnsw", path: PathLike | None = None, **params) -> dict:
        """Build an inner-product FAISS index, measure it, keep it loaded and save it.

        ``kind="hnsw"``: ``IndexHNSWFlat`` (params ``M``, ``efConstruction``, ``efSearch``);
        ``kind="ivf"``: ``IndexIVFFlat`` (``nlist``, default about sqrt(N); ``nprobe``). Defaults
        in :data:`ANN_DEFAULTS`. Saved to ``path`` (default ``<layer>.emb_<key>.<kind>.faiss``
        for an index opened from a layer, not saved for one made with :meth:`from_matrix`)
        with a ``.json`` beside it holding the parameters and the fingerprint that
        :meth:`load_ann` checks. Returns ``{"kind", "n", "dim", "recall_at_10",
        "query_p50_ms", "build_seconds", "path", **params}``; recall@10 is measured against
        exact search on ~200 queries made from random rows plus a little noise.
        """
        faiss = _faiss()
        params = self._ann_params(kind, params)
        if self.n == 0:
            raise OptionError("cannot build an ANN index over an empty embedding matrix")
        start = time.perf_counter()
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, params["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params["efConstruction"]
            for block in self._float32_chunks():
                index.add(block)
        else:
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            sample = np.sort(rng.choice(self.n, size=min(self.n, 40 * params["nlist"]), replace=False))
            index.train(np.ascontiguousarray(self.matrix[sample], dtype=np.float32))
            for block in self._float32_chunks():
                index.add(block)
        self._apply_search_params(index, kind, params)
        build_seconds = time.perf_counter() - start
        self._ann = index
        recall, p50 = self._measure_ann()
        target = self._ann_path(kind, path)
        if target is not None:
            self._save_ann(index, target, kind, params)
        self._ann_info = {"kind": kind, "n": self.n, "dim": self.dim, "recall_at_10": recall,
                          "query_p50_ms": p50, "build_seconds": round(build_seconds, 3),
                          "path": str(target) if target is not None else None, **params}
        return dict(self._ann_info)

    def recall_queries(self, count: int = RECALL_QUERIES, noise: float = 0.05, seed: int = 0) -> np.ndarray:
        """``count`` unit queries: random rows plus isotropic noise of norm about ``noise``."""
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(self.n, size=min(count, self.n), replace=False))
        q = np.asarray(self.matrix[pick], dtype=np.float32)
        q = q + rng.standard_normal(q.shape).astype(np.float32) * np.float32(noise / math.sqrt(self.dim))
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        return q / np.where(norms == 0, 1, norms)

    def _measure_ann(self) -> tuple[float, float]:
        queries = self.recall_queries()
        k = min(10, self.n)
        _, truth = self._search_exact(queries, k, None)
        hits, times = 0, []
        for i in range(len(queries)):
            start = time.perf_counter()
            _, found = self._search_ann(queries[i:i + 1], k, None)
            times.append(time.perf_counter() - start)
            hits += len(np.intersect1d(found[0], truth[i]))
        return round(hits / (k * len(queries)), 4), round(float(np.median(times)) * 1000, 3)

    def _save_ann(self, index, target: Path, kind: str, params: dict) -> None:
        faiss = _faiss()
        meta_path = Path(f"{target}.json")
        try:
            meta_path.unlink(missing_ok=True)
            with atomic_path(target) as tmp:
                faiss.write_index(index, str(tmp))
            _write_json(meta_path, {"version": CACHE_VERSION, "kind": kind, "params": params,
                                    "fingerprint": self._ann_fingerprint()})
        except OutputError:
            raise
        except (OSError, RuntimeError) as exc:
            raise output_error(target, exc, failure_code(exc, target.parent)) from None

    def load_ann(self, path: PathLike | None = None, kind: str | None = None) -> bool:
        """Load a saved ANN index that still matches this matrix; False when missing or stale.

        ``path`` defaults to the layer's most recently built ``.hnsw.faiss`` / ``.ivf.faiss``
        (only ``kind``'s when given). Needs FAISS only when there is a valid index to load.
        """
        if path is not None:
            candidates = [Path(path)]
        else:  # the most recently built kind first
            kinds = [kind] if kind else list(ANN_DEFAULTS)
            found = [p for p in (self._ann_path(kd, None) for kd in kinds) if p is not None]
            candidates = sorted((p for p in found if p.exists()), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for target in candidates:
            try:
                meta = json.loads(Path(f"{target}.json").read_text())
            except (OSError, ValueError):
                continue
            if meta.get("version") != CACHE_VERSION or meta.get("kind") not in ANN_DEFAULTS or not target.exists():
                continue
            if meta.get("fingerprint") != self._ann_fingerprint():
                continue
            faiss = _faiss()
            try:
                index = faiss.read_index(str(target))
            except RuntimeError:
                continue
            if index.ntotal != self.n or index.d != self.dim:
                continue
            self._apply_search_params(index, meta["kind"], meta["params"])
            self._ann = index
            self._ann_info = {"kind": meta["kind"], "n": self.n, "dim": self.dim, "path": str(target), **meta["params"]}
            return True
        return False

    @property
    def ann_info(self) -> dict | None:
        """Kind, parameters and path of the loaded ANN index (None when none is loaded)."""
        return dict(self._ann_info) if self._ann_info else None
