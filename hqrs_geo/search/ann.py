"""Approximate nearest-neighbour indexes (FAISS) over one embedding matrix.

:class:`AnnIndex` wraps an inner-product FAISS index, ``"hnsw"`` (``IndexHNSWFlat``) or
``"ivf"`` (``IndexIVFFlat``). Both keep float32 vectors (4 * N * D bytes, on top of the
memory-mapped matrix). Defaults (:data:`ANN_DEFAULTS`), measured on 1,000,000 x 512 clustered
vectors, 2 cores: HNSW ``M=32, efConstruction=64, efSearch=512`` builds in ~2.5 min (+2.4 GB),
recall@10 0.97 at ~1 ms per query (``efSearch=128``: 0.93 at 0.5 ms, 256: 0.95; the graph caps
recall near 0.97 at this ``efConstruction``); IVF ``nlist=sqrt(N), nprobe=16`` builds in ~11 s
(k-means on 40 * nlist rows), recall@10 1.0 at ~2 ms per query on that data (IVF builds much
faster and suits clustered embeddings; HNSW answers faster).

ANN candidates are re-scored exactly (:class:`~hqrs_geo.search.exact.ExactSearch`), so scores
are exact float32 dot products. With a mask, the index is asked for more neighbours than
needed (``k / fraction_allowed * 2``, at most :data:`ANN_MAX_FETCH`), masked rows are dropped,
and a query keeping fewer than ``k`` rows is answered by exact search over the allowed rows
instead, so masked rows never appear. A saved index has a ``.json`` beside it with its kind,
parameters and the fingerprint of the matrix it was built from; :meth:`AnnIndex.load` refuses
a stale one.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, failure_code, output_error, write_text
from ..errors import OptionError
from .base import ANN_MAX_FETCH, ApproximateSearcher, Result
from .exact import ExactSearch, order_best

ANN_VERSION = 1
ANN_DEFAULTS: dict[str, dict[str, Any]] = {
    # 1M x 512 clustered, 2 cores: build ~2.5 min, recall@10 0.97 at ~1 ms per query
    "hnsw": {"M": 32, "efConstruction": 64, "efSearch": 512},
    # same data: build ~11 s, recall@10 1.0 at ~2 ms per query
    "ivf": {"nlist": None, "nprobe": 16},  # nlist None: about sqrt(N)
}
RECALL_QUERIES = 200
log = logging.getLogger(__name__)
FAISS_HINT = "pip install faiss-cpu"


def faiss_module() -> Any:
    """Import FAISS lazily; a one-line OptionError with the install command when it is missing."""
    try:
        import faiss
    except ImportError:
        raise OptionError(
            f"approximate search needs FAISS, which is not installed: run '{FAISS_HINT}' "
            "(or pip install 'hqrs_geo[ann]'), or search exactly (without «ann»)"
        ) from None
    return faiss


def ann_params(kind: str, params: dict, n: int) -> dict:
    """The checked parameters of an index of ``kind`` over ``n`` rows (defaults filled in)."""
    if kind not in ANN_DEFAULTS:
        raise OptionError(f"invalid ANN index kind {kind!r}: use hnsw or ivf", option="kind")
    unknown = sorted(set(params) - set(ANN_DEFAULTS[kind]))
    if unknown:
        raise OptionError(f"unknown {kind} parameter {unknown[0]!r}: use {', '.join(ANN_DEFAULTS[kind])}")
    merged = {**ANN_DEFAULTS[kind], **{k: v for k, v in params.items() if v is not None}}
    if kind == "ivf" and merged["nlist"] is None:
        merged["nlist"] = int(max(1, min(round(math.sqrt(n)), n // 39)))
    for name, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise OptionError(f"invalid {kind} parameter {name}={value!r}: use a positive integer")
    if kind == "ivf":
        merged["nlist"] = min(int(merged["nlist"]), n)
        merged["nprobe"] = min(int(merged["nprobe"]), merged["nlist"])
    return {k: int(v) for k, v in merged.items()}


def float32_chunks(matrix: np.ndarray, chunk: int = 65536) -> Iterator[np.ndarray]:
    """The rows of ``matrix`` as float32 blocks (FAISS takes float32)."""
    for s in range(0, len(matrix), chunk):
        yield np.ascontiguousarray(matrix[s:s + chunk], dtype=np.float32)


def recall_queries(matrix: np.ndarray, count: int = RECALL_QUERIES, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """``count`` unit queries: random rows plus isotropic noise of norm about ``noise``."""
    n, dim = matrix.shape
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=min(count, n), replace=False))
    q = np.asarray(matrix[pick], dtype=np.float32)
    q = q + rng.standard_normal(q.shape).astype(np.float32) * np.float32(noise / math.sqrt(dim))
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    return q / np.where(norms == 0, 1, norms)


class AnnIndex(ApproximateSearcher):
    """A FAISS index of ``kind`` with its parameters over the rows of ``exact``, which re-scores
    its candidates and answers what it cannot (see :class:`~hqrs_geo.search.base.ApproximateSearcher`)."""

    exact: ExactSearch

    def __init__(self, index: Any, kind: str, params: dict, exact: ExactSearch):
        self.index = index
        self.kind = kind
        self.params = params
        self.exact = exact
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = self.params["efSearch"]
        else:
            self.index.nprobe = self.params["nprobe"]

    @classmethod
    def build(cls, exact: ExactSearch, kind: str = "hnsw", **params: Any) -> AnnIndex:
        """Build an index of ``kind`` over the matrix of ``exact`` (see :data:`ANN_DEFAULTS` for the parameters)."""
        faiss = faiss_module()
        matrix = exact.matrix
        n, dim = matrix.shape
        params = ann_params(kind, params, n)
        if n == 0:
            raise OptionError("cannot build an ANN index over an empty embedding matrix")
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = params["efConstruction"]
        else:
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            sample = np.sort(rng.choice(n, size=min(n, 40 * params["nlist"]), replace=False))
            index.train(np.ascontiguousarray(matrix[sample], dtype=np.float32))
        for block in float32_chunks(matrix):
            index.add(block)
        return cls(index, kind, params, exact)

    def wanted(self, k: int) -> int:
        """``k`` neighbours when no row is masked."""
        return k

    def fetch_limit(self) -> int:
        """At most :data:`ANN_MAX_FETCH` neighbours, and never more than there are rows."""
        return min(ANN_MAX_FETCH, self.n)

    def candidates(self, q: np.ndarray, k: int, mask: np.ndarray | None, fetch: int) -> Iterator[Result]:
        """The index's ``fetch`` neighbours of each query, masked rows dropped, re-scored exactly."""
        _, found = self.index.search(q, fetch)
        for i in range(len(q)):
            cand = found[i][found[i] >= 0]
            if mask is not None:
                cand = cand[mask[cand]]
            if len(cand) < k:
                yield np.empty(0, dtype=np.float32), cand
                continue
            cand = np.sort(cand)
            yield order_best(self.exact.score_rows(cand, q[i]), cand, k)

    def save(self, target: Path, fingerprint: dict) -> None:
        """Write the index and its ``.json`` (kind, parameters, ``fingerprint``) atomically."""
        faiss = faiss_module()
        meta_path = Path(f"{target}.json")
        meta_path.unlink(missing_ok=True)
        try:
            with atomic_path(target) as tmp:
                faiss.write_index(self.index, str(tmp))
        except RuntimeError as exc:
            raise output_error(target, exc, failure_code(exc, target.parent)) from None
        write_text(meta_path, json.dumps({"version": ANN_VERSION, "kind": self.kind, "params": self.params,
                                          "fingerprint": fingerprint}, indent=1, sort_keys=True))

    @classmethod
    def load(cls, target: Path, fingerprint: dict, exact: ExactSearch) -> AnnIndex | None:
        """The index saved at ``target`` over the rows of ``exact``, when its fingerprint, size and
        dimension still match, else
        None: silently when it is missing or was built from other embeddings (stale), with a
        one-line warning naming the command that rebuilds it when its files are damaged."""
        def damaged(problem: str) -> AnnIndex | None:
            kind = meta.get("kind") if isinstance(meta, dict) and meta.get("kind") in ANN_DEFAULTS else "hnsw"
            layer = str(target).split(".emb_")[0]
            log.warning("%s: %s; the index is not used (searches are exact) until 'hqrs-geo index %s --kind %s' "
                        "rebuilds it", target, problem, layer, kind)
            return None

        meta: Any = None
        n, dim = exact.n, exact.dim
        try:
            meta = json.loads(Path(f"{target}.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            return damaged(f"its .json is not readable JSON ({' '.join(str(exc).split())[:80]})")
        if not isinstance(meta, dict) or meta.get("version") != ANN_VERSION or meta.get("kind") not in ANN_DEFAULTS:
            return damaged("its .json is not an index description of this version")
        if not target.exists():
            return None
        if meta.get("fingerprint") != fingerprint:
            return None
        try:
            saved = meta.get("params")
            params = ann_params(meta["kind"], saved if isinstance(saved, dict) else {}, n)
        except OptionError as exc:
            return damaged(f"its .json holds {exc}")
        faiss = faiss_module()
        try:
            index = faiss.read_index(str(target))
        except RuntimeError as exc:
            return damaged(f"FAISS cannot read it ({' '.join(str(exc).split())[:80]})")
        if index.ntotal != n or index.d != dim:
            return damaged(f"it holds {index.ntotal} vectors of dimension {index.d}, the layer {n} of {dim}")
        return cls(index, meta["kind"], params, exact)
