"""Nearest-neighbour search over one embedding matrix: the facade the rest of the package uses.

A :class:`VectorIndex` holds the ``(N, D)`` embedding matrix of one model key of a tile layer
(float16 or float32, usually a read-only ``np.memmap`` from :mod:`.cache`) and the tile id of
every row. Search is exact by default (:mod:`.exact`: results equal a brute-force float32
computation) or approximate with a FAISS index (:mod:`.ann`, candidates re-scored exactly).
Scores are dot products, i.e. cosine similarities for the L2-normalised vectors layers hold.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OptionError
from .ann import ANN_DEFAULTS, RECALL_QUERIES, AnnIndex
from .ann import recall_queries as _recall_queries
from .base import OverExact, Result, Searcher
from .cache import load_or_build, safe_key
from .choose import KINDS, choose_kind
from .exact import ExactSearch, row_blocks
from .ivfpq import CompressedIndex, CompressedSearch, EmbeddingPart

ANN_KINDS = (*ANN_DEFAULTS, "ivfpq")

PathLike = str | os.PathLike


class VectorIndex(OverExact):
    """Nearest-neighbour search over an ``(N, D)`` embedding matrix whose rows are tiles ``ids``:
    exact (:class:`~hqrs_geo.search.exact.ExactSearch`), or with ``use_ann`` the loaded FAISS or
    IVF-PQ index (:meth:`approximate`)."""

    NO_INDEX = ("no approximate (ANN) index is loaded: build one with build_ann() or 'hqrs-geo index', or "
                "search exactly")

    ids: np.ndarray
    matrix: np.ndarray
    exact: ExactSearch

    def __init__(self, matrix: np.ndarray, ids: np.ndarray, *, layer: PathLike | None = None, key: str | None = None,
                 fingerprint: dict | None = None, max_norm: float | None = None, cache_path: Path | None = None):
        """Use :meth:`from_matrix` or :meth:`open`; this stores already checked arguments."""
        self.matrix = matrix
        self.ids = ids
        self.layer = Path(layer) if layer is not None else None
        self.key = key
        self.fingerprint = fingerprint
        self.cache_path = cache_path
        self.exact = ExactSearch(matrix, max_norm)
        self._ann: AnnIndex | CompressedSearch | None = None
        self._ann_info: dict | None = None
        self._digest: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_matrix(cls, matrix: np.ndarray, ids: Any = None, fingerprint: dict | None = None) -> VectorIndex:
        """An index over ``matrix`` (float16 or float32 kept as is and not copied when C-contiguous,
        other types converted to float32); ``ids`` default to the row numbers as strings.
        ``fingerprint``: what identifies the matrix's source (e.g. its file's size and mtime), so
        saved indexes are matched without hashing every row."""
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
        return cls(matrix, ids, fingerprint=fingerprint)

    @classmethod
    def open(cls, layer: PathLike, key: str, frame: Any = None) -> VectorIndex:
        """The embeddings of model ``key`` in tile layer ``layer``, memory-mapped from the cache
        beside it (see :mod:`.cache`); ``frame``: the layer already read, to avoid reading it again.
        Rows without an embedding are left out."""
        loaded, fingerprint = load_or_build(Path(layer), key, frame)
        return cls(loaded.matrix, loaded.ids, layer=layer, key=key, fingerprint=fingerprint,
                   max_norm=loaded.max_norm, cache_path=loaded.path)

    def __repr__(self) -> str:
        ann = self._ann_info["kind"] if self._ann_info else None
        return f"VectorIndex(n={self.n}, dim={self.dim}, dtype={self.matrix.dtype.name}, ann={ann})"

    @property
    def max_norm(self) -> float:
        """Largest row norm (bounds the error of the fast scores); computed once."""
        return self.exact.max_norm

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int = 10, mask: Any = None, use_ann: bool | None = None) -> Result:
        """Top ``k`` rows by dot product (cosine similarity for normalised vectors).

        ``queries``: ``(D,)`` or ``(Q, D)`` (normalised by the caller). Returns ``(scores, rows)``,
        both ``(Q, k')`` (``Q = 1`` for a single query), best first, ``k' = min(k, candidates)``;
        ``rows`` index :attr:`matrix` / :attr:`ids`; ties are broken by row order. ``mask`` (N,)
        bool: rows where it is False never appear. Exact search unless ``use_ann`` is True,
        which needs an index from :meth:`build_ann` or :meth:`load_ann` (``None`` = exact).
        Scores are float32 ``float32(row) @ query`` either way.
        """
        return super().search(queries, k, mask, use_ann)

    def top(self, q: np.ndarray, k: int, mask: np.ndarray | None, allowed: int) -> Result:
        """Exact search (:class:`~hqrs_geo.search.exact.ExactSearch`)."""
        return self.exact.top(q, k, mask, allowed)

    def approximate(self) -> Searcher:
        """The loaded ANN or IVF-PQ index (one-line error when none is loaded)."""
        if self._ann is None:
            raise OptionError(self.NO_INDEX)
        return self._ann

    def _part(self) -> EmbeddingPart:
        """The matrix as the one part of a compressed index."""
        name = self.layer.name if self.layer is not None else "matrix"
        return EmbeddingPart(name, self._ann_fingerprint(), self.matrix)

    def scores(self, query: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """float32 scores of every row for one query, ``(N,)``; NaN where ``mask`` is False."""
        q = self.check_queries(query)
        if len(q) != 1:
            raise OptionError(f"scores() takes one query vector, got {len(q)}")
        return self.exact.scores(q, self.check_mask(mask))

    def recall_queries(self, count: int = RECALL_QUERIES, noise: float = 0.05, seed: int = 0) -> np.ndarray:
        """``count`` unit queries: random rows plus isotropic noise of norm about ``noise``."""
        return _recall_queries(self.matrix, count, noise, seed)

    # ------------------------------------------------------------------ ANN index
    def _ann_path(self, kind: str, path: PathLike | None) -> Path | None:
        if path is not None:
            return Path(path)
        if self.layer is None or self.fingerprint is None:
            return None
        suffix = "ivfpq" if kind == "ivfpq" else f"{kind}.faiss"
        return Path(f"{self.layer}.emb_{safe_key(str(self.key))}.{suffix}")

    def _ann_fingerprint(self) -> dict:
        """What a saved ANN index must have been built from: the layer (or the matrix's content)."""
        if self.fingerprint is not None:
            return {"layer": self.fingerprint, "n": self.n, "dim": self.dim}
        if self._digest is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"{self.n}x{self.dim}:{self.matrix.dtype.name}".encode())
            h.update(self.ids.tobytes())
            for _, rows in row_blocks(self.matrix):
                h.update(np.ascontiguousarray(rows).tobytes())
            self._digest = h.hexdigest()
        return {"digest": self._digest, "n": self.n, "dim": self.dim}

    def build_ann(self, kind: str = "hnsw", path: PathLike | None = None, **params: Any) -> dict:
        """Build an inner-product FAISS index, measure it, keep it loaded and save it.

        ``kind="hnsw"``: ``IndexHNSWFlat`` (params ``M``, ``efConstruction``, ``efSearch``);
        ``kind="ivf"``: ``IndexIVFFlat`` (``nlist``, default about sqrt(N); ``nprobe``). Defaults
        in :data:`~hqrs_geo.search.ann.ANN_DEFAULTS`. Saved to ``path`` (default
        ``<layer>.emb_<key>.<kind>.faiss`` for an index opened from a layer, not saved for one
        made with :meth:`from_matrix`) with a ``.json`` beside it holding the parameters and the
        fingerprint that :meth:`load_ann` checks. Returns ``{"kind", "n", "dim", "recall_at_10",
        "query_p50_ms", "build_seconds", "path", **params}``; recall@10 is measured against
        exact search on ~200 queries made from random rows plus a little noise.
        """
        if kind not in ANN_KINDS:
            raise OptionError(f"invalid index kind {kind!r}: use {', '.join(ANN_KINDS)}", option="kind")
        start = time.perf_counter()
        target = self._ann_path(kind, path)
        if kind == "ivfpq":
            if target is None:
                raise OptionError("an ivfpq index lives on disk: give a folder for it", option="path")
            compressed = CompressedIndex.build([self._part()], target, **params)
            build_seconds = time.perf_counter() - start
            self._ann = CompressedSearch(compressed, [self._part()], self.exact)
            truth = self._exact_truth()
            measured: dict[str, float] = {}

            def recall_now() -> float:
                measured["recall"], measured["p50"] = self._measure_ann(truth)
                return measured["recall"]

            compressed.calibrate(recall_now)
            recall, p50 = measured["recall"], measured["p50"]
            size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file() and "shards" not in f.parts)
            self._ann_info = {"kind": kind, "n": self.n, "dim": self.dim, "recall_at_10": recall,
                              "query_p50_ms": p50, "build_seconds": round(build_seconds, 3), "path": str(target),
                              "bytes_on_disk": size, **compressed.params}
            return dict(self._ann_info)
        ann = AnnIndex.build(self.exact, kind, **params)
        build_seconds = time.perf_counter() - start
        self._ann = ann
        recall, p50 = self._measure_ann(self._exact_truth())
        if target is not None:
            ann.save(target, self._ann_fingerprint())
        self._ann_info = {"kind": kind, "n": self.n, "dim": self.dim, "recall_at_10": recall,
                          "query_p50_ms": p50, "build_seconds": round(build_seconds, 3),
                          "path": str(target) if target is not None else None, **ann.params}
        return dict(self._ann_info)

    def build_index(self, kind: str = "auto", **params: Any) -> dict:
        """Build the index ``kind`` (``auto``: chosen by size and available memory, see
        :mod:`.choose`; ``exact``: none, exact search is measured) and return its report with
        the reason for the choice."""
        if kind not in KINDS:
            raise OptionError(f"invalid index kind {kind!r}: use {', '.join(KINDS)}", option="kind")
        reason = f"{kind} asked for"
        if kind == "auto":
            kind, reason = choose_kind(self.n, self.dim)
        if kind != "exact":
            return {**self.build_ann(kind, **params), "reason": reason}
        queries = self.recall_queries(count=50, seed=12345)
        times = []
        for q in queries:
            begin = time.perf_counter()
            self.search(q, 10)
            times.append(time.perf_counter() - begin)
        return {"kind": "exact", "n": self.n, "dim": self.dim, "recall_at_10": 1.0,
                "query_p50_ms": round(float(np.median(times)) * 1000, 3), "reason": reason}

    def _exact_truth(self) -> tuple[np.ndarray, np.ndarray]:
        """Held-out queries (rows plus noise, seeded apart from the build's training sample) and
        their exact top 10."""
        queries = self.recall_queries(seed=12345)
        return queries, self.exact.search_many(queries, 10, None)[1]

    def _measure_ann(self, truth: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
        """(recall@10 against exact search, median ms per query) of the loaded index on the
        queries of :meth:`_exact_truth`."""
        queries, truth_rows = truth
        k = min(10, self.n)
        hits, times = 0, []
        for i in range(len(queries)):
            begin = time.perf_counter()
            _, found = self.search(queries[i], k, use_ann=True)
            times.append(time.perf_counter() - begin)
            hits += len(np.intersect1d(found[0], truth_rows[i]))
        return round(hits / (k * len(queries)), 4), round(float(np.median(times)) * 1000, 3)

    def load_ann(self, path: PathLike | None = None, kind: str | None = None) -> bool:
        """Load a saved ANN index that still matches this matrix; False when missing or stale.

        ``path`` defaults to the layer's most recently built ``.hnsw.faiss`` / ``.ivf.faiss``
        (only ``kind``'s when given). Needs FAISS only when there is a valid index to load.
        """
        if path is not None:
            candidates = [Path(path)]
        else:  # the most recently built kind first
            kinds = [kind] if kind else list(ANN_KINDS)
            found = [p for p in (self._ann_path(kd, None) for kd in kinds) if p is not None]
            candidates = sorted((p for p in found if p.exists()), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for target in candidates:
            if target.is_dir():
                compressed = CompressedIndex.open(target)
                if compressed is not None and not compressed.stale_parts([self._part()]):
                    self._ann = CompressedSearch(compressed, [self._part()], self.exact)
                    self._ann_info = {"kind": "ivfpq", "n": self.n, "dim": self.dim, "path": str(target),
                                      **compressed.params}
                    return True
                continue
            ann = AnnIndex.load(target, self._ann_fingerprint(), self.exact)
            if ann is not None:
                self._ann = ann
                self._ann_info = {"kind": ann.kind, "n": self.n, "dim": self.dim, "path": str(target), **ann.params}
                return True
        return False

    @property
    def ann_info(self) -> dict | None:
        """Kind, parameters and path of the loaded ANN index (None when none is loaded)."""
        return dict(self._ann_info) if self._ann_info else None
