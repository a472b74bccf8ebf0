"""The one search interface: top ``k`` rows by dot product, with masks and the fallback to exact search.

A :class:`Searcher` answers over ``n`` rows of embeddings of dimension ``dim``: one matrix
(:class:`~hqrs_geo.search.exact.ExactSearch`, the facade
:class:`~hqrs_geo.search.index.VectorIndex`) or the parts of a dataset one after the other
(:class:`~hqrs_geo.search.partitioned.DatasetIndex`, whose rows are numbered part after part).
Results are ``(scores, rows)``, both ``(Q, k')``, best first, ``k' = min(k, rows allowed)``,
ties by ascending row; a ``mask`` (``(n,)`` bool) keeps the rows where it is True.

What every searcher shares is written here once: the argument checks, ``k`` clamped to the
rows the mask allows, the empty answer when it allows none, and for the approximate searchers
(:class:`ApproximateSearcher`: FAISS HNSW / IVF in :mod:`.ann`, the compressed IVF-PQ index in
:mod:`.ivfpq`) the rule that keeps masked rows out without losing results: the index is asked
for more candidates when a mask leaves only part of the rows (``2 * wanted * n / allowed``),
a mask too selective for that (more than the searcher's fetch limit) is answered by exact
search over the allowed rows, and so is every query left with fewer than ``k`` allowed
candidates, or any query when the index turns out to be damaged (:class:`CorruptIndex`).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import InputError, OptionError

#: Most candidates fetched from an approximate index for a masked query before exact search answers instead.
ANN_MAX_FETCH = 4096

Result = tuple[np.ndarray, np.ndarray]


class CorruptIndex(InputError):
    """A file of an index is damaged or inconsistent (the message says which and how to
    rebuild it); searches fall back to exact search."""


def check_k(k: Any) -> int:
    """``k`` as an int >= 1 (one-line :class:`OptionError` otherwise)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise OptionError(f"invalid k {k!r}: ask for at least one result", option="k")
    return int(k)


def empty_result(queries: int, k: int) -> Result:
    """``(scores, rows)`` of ``queries`` rows of ``k`` zeros (float32, int64), to be filled in."""
    return np.zeros((queries, k), dtype=np.float32), np.zeros((queries, k), dtype=np.int64)


class Searcher(ABC):
    """Top-``k`` search by dot product over ``n`` rows (see the module docstring)."""

    #: what :meth:`search` says when an approximate search is asked for and no index is loaded
    NO_INDEX = "no approximate (ANN) index is loaded: build one with 'hqrs-geo index', or search exactly"

    @property
    @abstractmethod
    def n(self) -> int:
        """Number of rows."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Vector dimension."""

    def __len__(self) -> int:
        return self.n

    # ------------------------------------------------------------------ argument checks
    def check_queries(self, queries: Any) -> np.ndarray:
        """``queries`` ``(D,)`` or ``(Q, D)`` as a C-contiguous ``(Q, D)`` float32 array (one-line errors)."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise OptionError(f"query vectors have shape {np.shape(queries)}; "
                              f"expected ({self.dim},) or (Q, {self.dim})")
        if not np.isfinite(q).all():
            raise OptionError("query vectors contain NaN or infinite values")
        return np.ascontiguousarray(q)

    def check_mask(self, mask: Any) -> np.ndarray | None:
        """``mask`` as an ``(n,)`` bool array, or None (one-line error for another shape or type)."""
        if mask is None:
            return None
        mask = np.asarray(mask)
        if mask.shape != (self.n,) or mask.dtype != bool:
            raise OptionError(f"mask must be a boolean array of {self.n} values (one per row), "
                              f"got {mask.dtype} {mask.shape}")
        return mask

    # ------------------------------------------------------------------ search
    def search(self, queries: Any, k: int = 10, mask: Any = None, use_ann: bool | None = None) -> Result:
        """Top ``k`` rows of one query ``(D,)`` or several ``(Q, D)`` (normalised by the caller):
        ``(scores, rows)``, both ``(Q, k')``; ``mask`` keeps the rows where it is True. With
        ``use_ann`` the searcher's approximate index answers (:meth:`approximate`; scores are
        exact float32 dot products either way). Arguments are checked (one-line errors)."""
        q, k, mask = self.check_queries(queries), check_k(k), self.check_mask(mask)
        searcher = self.approximate() if use_ann else self
        return searcher.search_many(q, k, mask)

    def search_many(self, q: np.ndarray, k: int, mask: np.ndarray | None) -> Result:
        """:meth:`search` of checked queries ``q`` ``(Q, D)`` float32: ``k`` clamped to the rows
        ``mask`` allows, nothing when it allows none, else the searcher's own :meth:`top`."""
        allowed = self.n if mask is None else int(mask.sum())
        k = min(int(k), allowed)
        if k == 0:
            return empty_result(len(q), 0)
        return self.top(q, k, mask, allowed)

    @abstractmethod
    def top(self, q: np.ndarray, k: int, mask: np.ndarray | None, allowed: int) -> Result:
        """The best ``k`` (1 <= k <= ``allowed``, the rows ``mask`` keeps) of every query of ``q``."""

    def approximate(self) -> Searcher:
        """The approximate searcher over the same rows (its index loaded); one-line error when none is."""
        raise OptionError(self.NO_INDEX)


class OverExact(Searcher):
    """A searcher over the rows of an exact searcher ``exact``: its size and dimension are those."""

    exact: Searcher

    @property
    def n(self) -> int:
        """Number of rows (those of the exact searcher)."""
        return self.exact.n

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self.exact.dim


class ApproximateSearcher(OverExact):
    """Candidates from an approximate index, re-scored exactly; ``exact`` (a searcher over the
    same rows) answers what the index cannot (see the module docstring)."""

    def approximate(self) -> Searcher:
        """The searcher itself: it is the approximate one."""
        return self

    @abstractmethod
    def wanted(self, k: int) -> int:
        """Candidates asked of the index for ``k`` results when no row is masked."""

    @abstractmethod
    def fetch_limit(self) -> int:
        """The most candidates the index is asked for; a mask that needs more is answered exactly."""

    @abstractmethod
    def candidates(self, q: np.ndarray, k: int, mask: np.ndarray | None, fetch: int) -> Iterable[Result]:
        """Per query, the best (at most ``k``) of ``fetch`` candidates the mask allows, exactly
        re-scored: ``(scores, rows)`` best first, ties by row. Fewer than ``k``: the query is
        answered by exact search. May raise :class:`CorruptIndex`."""

    def fetch(self, k: int, allowed: int) -> int:
        """Candidates to fetch so that ``k`` of them are likely among the ``allowed`` rows."""
        wanted = self.wanted(k)
        return wanted if allowed == self.n else math.ceil(2 * wanted * self.n / allowed)

    def top(self, q: np.ndarray, k: int, mask: np.ndarray | None, allowed: int) -> Result:
        """The index's candidates; exact search when the mask is too selective, the index is
        damaged, or a query kept fewer than ``k`` candidates."""
        fetch = self.fetch(k, allowed)
        if fetch > self.fetch_limit():  # too selective for the index: exact over the allowed rows
            return self.exact.search_many(q, k, mask)
        scores, rows = empty_result(len(q), k)
        short = []
        try:
            for i, (found_scores, found_rows) in enumerate(self.candidates(q, k, mask, fetch)):
                if len(found_rows) < k:
                    short.append(i)
                    continue
                scores[i], rows[i] = found_scores, found_rows
        except CorruptIndex:  # damaged (warned once, naming the command that rebuilds it): exact search
            return self.exact.search_many(q, k, mask)
        if short:
            scores[short], rows[short] = self.exact.search_many(q[short], k, mask)
        return scores, rows
