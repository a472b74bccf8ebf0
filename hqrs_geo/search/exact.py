"""Exact top-k search over one embedding matrix: the kernels, no I/O.

:class:`ExactSearch` holds an ``(N, D)`` float16 or float32 matrix (usually a read-only
``np.memmap``); scores are dot products, i.e. cosine similarities for the L2-normalised
vectors the layers hold. Measured on 1,000,000 x 512 float16 rows (a 977 MiB memory-mapped
cache), 2 cores (AMD EPYC, AVX-512), torch 2.14, numpy 2.4; see ``benchmarks/search.py``:

* one query: torch's float16 matrix-vector kernel (``torch.mv`` on a tensor sharing the
  memory-mapped array via ``torch.from_numpy``, no copy) reads the float16 data directly and
  accumulates in float32; it is memory-bandwidth bound: ~35 ms (1 GB read), ~40 ms with top-k
  selection and re-scoring;
* a float32 copy would cost 2 GB more memory and be *slower* for one query (twice the bytes
  to read: numpy/BLAS ``sgemv`` ~90 ms, ``torch.mv`` ~190 ms), so none is kept; numpy has no
  float16 BLAS (``float16 @`` is very slow) and its float16 -> float32 conversion costs ~1 s
  per pass; a bfloat16 copy (1 GB more) multiplies in ~100 ms;
* torch's float16 matrix-*matrix* product has no fast CPU kernel (time grows linearly with
  the number of queries), so from :data:`SMALL_BATCH` queries on, the matrix is converted in
  chunks of :data:`CHUNK_ROWS` rows into a reused float32 buffer and multiplied with the whole
  batch of queries by float32 GEMM: one pass over the matrix for the batch, ~13 ms per query
  for 200 queries (compute bound), with a running top-k per query so memory stays
  O(queries x chunk).

The fast scores are approximate: the float16 kernel rounds the query and the result to
float16. Their error bound ``eps = (2**-10 + D * 2**-23) * |q| * max_row_norm`` (float32 GEMM:
``D * 2**-23 * |q| * max_row_norm``) is known, so every row whose fast score is within
``2 * eps`` of the k-th best is re-scored exactly, ``float32(row) . query`` (tens of rows),
and the final order is by that exact score, ties broken by row order. Results therefore equal
a brute-force float32 computation (scores to ~1e-7: summation order; the re-scoring sums every
row the same way, so equal rows get equal scores). Should a kernel ever exceed its bound
(checked on every re-scored row), the searcher warns once and uses the float32 GEMM path from
then on. Without torch (it comes with the ``models`` extra) the same algorithm runs on numpy:
correct, but float16 conversion makes it ~1 s per pass. Masks allowing at most 1/8 of the rows
(and at most :data:`SUBSET_ROWS`) are searched on those rows only.
"""
from __future__ import annotations

import math
import mmap
import os
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import InputError, OptionError
from .base import Result, Searcher, empty_result

#: From this many queries on, float16 matrices are searched by one chunked float32 GEMM pass.
SMALL_BATCH = 8
#: Rows converted to float32 at a time in the GEMM pass (fits the L2 cache at D = 512).
CHUNK_ROWS = 4096
#: The batch pass hands read pages back (:func:`drop_pages`) after this many chunks (65,536 rows).
DROP_EVERY = 16
#: A mask allowing at most this many rows (and at most 1/8 of them) is searched on those rows only.
SUBSET_ROWS = 65536


def torch_or_none() -> Any:
    """Torch when installed (the fast float16 kernels), else None."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is installed with the models extra
        return None
    return torch


def dot(block: np.ndarray, query: np.ndarray) -> np.ndarray:
    """float32 ``block @ query`` computed the same way for every row (BLAS kernels may sum rows in
    different orders by position, which would give equal rows unequal scores and break ties)."""
    return np.einsum("ij,j->i", block, query, optimize=False)


def drop_pages(matrix: np.ndarray) -> None:
    """Hand the pages of a memory-mapped ``matrix`` that this process has read back to the kernel
    (``MADV_DONTNEED``; they stay in the page cache). Without it one pass over a 10 GB map leaves
    10 GB resident in the process. No-op for matrices in memory."""
    mapped = getattr(matrix, "_mmap", None)  # np.memmap and its slices
    if getattr(matrix, "mode", None) != "r":  # copy-on-write maps would lose their changes
        return
    if mapped is not None and hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapped.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed map, or a platform without it: memory is only held longer
            pass


#: (device major, minor, inode) of the file each memory map maps, read once from /proc/self/maps
_MAPPED_FILES: weakref.WeakKeyDictionary[mmap.mmap, tuple[int, int, int] | None] = weakref.WeakKeyDictionary()


def _mapped_file(mapped: mmap.mmap, base: int) -> tuple[int, int, int] | None:
    """The kernel's record of which file the map starting at address ``base`` maps (the path may
    have been replaced by a newer file since); None where /proc/self/maps cannot tell."""
    if mapped not in _MAPPED_FILES:
        found = None
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split()
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    if start <= base < end and len(fields) >= 5:
                        major, minor = (int(x, 16) for x in fields[3].split(":"))
                        found = (major, minor, int(fields[4]))
                        break
        except (OSError, ValueError):
            found = None
        _MAPPED_FILES[mapped] = found
    return _MAPPED_FILES[mapped]


def _file_position(matrix: np.ndarray) -> tuple[str, int, tuple[int, int, int]] | None:
    """(file, byte offset of row 0, the mapped file's identity) of a read-only, C-contiguous
    memory-mapped 2-D matrix (a ``np.memmap`` or a slice of one); None for anything else."""
    mapped, name = getattr(matrix, "_mmap", None), getattr(matrix, "filename", None)
    if not isinstance(matrix, np.memmap) or matrix.mode != "r" or matrix.ndim != 2 \
            or not matrix.flags.c_contiguous or mapped is None or not name or not hasattr(os, "preadv"):
        return None
    try:
        base = np.frombuffer(mapped, dtype=np.uint8).ctypes.data  # where the map starts in memory
    except (ValueError, TypeError):  # a closed map
        return None
    identity = _mapped_file(mapped, base)
    if identity is None:
        return None
    start = matrix.offset - matrix.offset % mmap.ALLOCATIONGRANULARITY  # the file offset numpy mapped from
    return os.fspath(name), start + matrix.ctypes.data - base, identity


def read_rows(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``float32(matrix[rows])`` for scattered ``rows``. Rows of a read-only memory map are read
    from its file with ``pread``, not through the map: touching scattered rows of a map makes the
    kernel map their neighbours' pages into the process as well (fault-around), which leaves the
    process holding much of the file and costs about 3x the time (measured on a 2M x 512 float16
    map in the page cache, 2,048 rows: 19.4 ms through the map, 6.1 ms by pread). Requests for more
    than a sixteenth of the rows are dense enough to read through the map (pages dropped after)."""
    rows = np.asarray(rows, dtype=np.int64)
    where = _file_position(matrix) if len(rows) else None
    if where is None or rows.min() < 0 or rows.max() >= len(matrix):
        return np.asarray(matrix[rows], dtype=np.float32)
    if len(rows) > max(len(matrix) // 16, 4096):
        out32 = np.asarray(matrix[rows], dtype=np.float32)
        drop_pages(matrix)
        return out32
    path, first, identity = where
    width = matrix.shape[1] * matrix.dtype.itemsize
    out = np.empty((len(rows), matrix.shape[1]), dtype=matrix.dtype)
    view = out.data.cast("B")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # the file is gone (the map keeps its data): read through the map
        return np.asarray(matrix[rows], dtype=np.float32)
    try:
        now = os.fstat(fd)
        if (os.major(now.st_dev), os.minor(now.st_dev), now.st_ino) != identity:
            return np.asarray(matrix[rows], dtype=np.float32)  # replaced by a newer file: the map holds ours
        for i, row in enumerate(rows.tolist()):
            if os.preadv(fd, [view[i * width:(i + 1) * width]], first + row * width) != width:
                raise InputError(f"{path}: shorter than its rows; the embeddings cache is damaged: build it again")
    finally:
        os.close(fd)
    return out.astype(np.float32)


def row_blocks(matrix: np.ndarray, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, block)`` over ``matrix`` in blocks of ``rows``, pages dropped after each block (see
    :func:`drop_pages`): the one way to pass over a whole matrix with flat memory."""
    for start in range(0, len(matrix), rows):
        yield start, np.asarray(matrix[start:start + rows])
        drop_pages(matrix)


def max_row_norm(matrix: np.ndarray) -> float:
    """Largest row norm (NaN or inf when a row holds NaN or inf)."""
    torch = torch_or_none()
    best = 0.0
    for _, rows in row_blocks(matrix):
        if torch is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only memmap: only read
                block = torch.from_numpy(rows).float()
            value = float(torch.linalg.vector_norm(block, dim=1).max())
        else:
            block = rows.astype(np.float32)
            value = math.sqrt(float(np.einsum("ij,ij->i", block, block).max()))
        if not math.isfinite(value):
            return value
        best = max(best, value)
    return best


def order_best(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` by descending score, ties by ascending row (stable)."""
    order = np.lexsort((rows, -scores))[:k]
    return scores[order], rows[order]


class ExactSearch(Searcher):
    """Exact top-k by dot product over an ``(N, D)`` matrix (float16 or float32, maybe memory-mapped)."""

    def __init__(self, matrix: np.ndarray, max_norm: float | None = None):
        self.matrix = matrix
        self._max_norm = max_norm
        self._tensor: Any = None
        self._kernel = "mv16" if matrix.dtype == np.float16 else "mv32"

    @property
    def n(self) -> int:
        """Number of rows."""
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.matrix.shape[1])

    @property
    def max_norm(self) -> float:
        """Largest row norm (bounds the error of the fast scores); computed once."""
        if self._max_norm is None:
            self._max_norm = max_row_norm(self.matrix)
            if not math.isfinite(self._max_norm):
                self._max_norm = None
                raise OptionError("the embedding matrix contains NaN or infinite values; recompute the embeddings")
        return self._max_norm

    def _tensor_view(self):
        """The matrix as a torch tensor sharing its memory (never written to)."""
        if self._tensor is None:
            torch = torch_or_none()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only memmap: torch only reads it
                self._tensor = torch.from_numpy(self.matrix)
        return self._tensor

    def score_rows(self, rows: np.ndarray, query: np.ndarray) -> np.ndarray:
        """float32 scores of ``rows`` (ascending row numbers) for one query: the reference values."""
        out = np.empty(len(rows), dtype=np.float32)
        for s in range(0, len(rows), 65536):
            out[s:s + 65536] = dot(read_rows(self.matrix, rows[s:s + 65536]), query)
        return out

    def _eps(self, norm: float, kernel: str) -> float:
        """Bound on |fast score - float32 score| for a query of norm ``norm``."""
        scale = norm * self.max_norm
        if kernel == "mv16":
            return (2.0 ** -10 + self.dim * 2.0 ** -23) * scale + 2.0 ** -24
        return self.dim * 2.0 ** -23 * scale + 2.0 ** -40

    def _mv(self, query: np.ndarray, norm: float) -> np.ndarray:
        """Fast (N,) scores of one query with the per-query kernel."""
        torch = torch_or_none()
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
        torch = torch_or_none()
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
        torch = torch_or_none()
        if torch is not None:
            return torch.topk(torch.from_numpy(scores), k, dim=1, sorted=False).values.min(dim=1).values.numpy()
        return np.partition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k]

    def _select(self, fast: np.ndarray, query: np.ndarray, kth: float, eps: float, k: int
                ) -> tuple[np.ndarray, np.ndarray] | None:
        """Re-score rows whose fast score may be in the top k; None when the bound was broken."""
        rows = np.flatnonzero(fast >= kth - 2 * eps)
        exact = self.score_rows(rows, query)
        if len(rows) and float(np.abs(fast[rows] - exact).max()) > eps * 1.001:
            return None
        return order_best(exact, rows, k)

    def top(self, q: np.ndarray, k: int, mask: np.ndarray | None, allowed: int) -> Result:
        """Top ``k`` rows of every query in ``q`` ``(Q, D)`` float32 (see :meth:`Searcher.search_many`)."""
        n_q, n = len(q), self.n
        scores, rows = empty_result(n_q, k)
        norms = np.linalg.norm(q, axis=1)
        if mask is not None and allowed <= min(SUBSET_ROWS, n // 8):
            subset = np.flatnonzero(mask)
            block = np.asarray(self.matrix[subset], dtype=np.float32)
            for i in range(n_q):
                scores[i], rows[i] = order_best(dot(block, q[i]), subset, k)
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
                    return self.top(q, k, mask, allowed)
                scores[i], rows[i] = result
            return scores, rows
        for i, (cand, fast) in zip(map(int, todo), self._batch_candidates(q[todo], k, mask, norms[todo])):
            exact = self.score_rows(cand, q[i])
            if len(cand) and float(np.abs(fast - exact).max()) > self._eps(float(norms[i]), "gemm") * 1.001:
                cand = np.flatnonzero(mask) if mask is not None else np.arange(n)  # pragma: no cover
                exact = self.score_rows(cand, q[i])  # pragma: no cover - float32 GEMM stays within its bound
            scores[i], rows[i] = order_best(exact, cand, k)
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
        torch = torch_or_none()
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

    def scores(self, q: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """float32 scores of every row for one query ``q`` ``(1, D)``, ``(N,)``; NaN where ``mask`` is False."""
        out = self._gemm(q)[0]
        if mask is not None:
            out[~mask] = np.nan
        return out

    def _torch_float32_chunks(self) -> Iterator[tuple[int, Any]]:
        """``(first row, float32 tensor)`` blocks of :data:`CHUNK_ROWS` rows; float16 rows are
        converted into one reused buffer (each block is valid until the next is yielded)."""
        import torch

        matrix = self._tensor_view()
        buf = torch.empty((min(CHUNK_ROWS, self.n), self.dim), dtype=torch.float32)
        try:
            for s in range(0, self.n, CHUNK_ROWS):
                chunk = matrix[s:s + CHUNK_ROWS]
                if chunk.dtype != torch.float32:
                    buf[:len(chunk)].copy_(chunk)
                    chunk = buf[:len(chunk)]
                yield s, chunk
                if (s // CHUNK_ROWS) % DROP_EVERY == DROP_EVERY - 1:
                    drop_pages(self.matrix)  # one pass over a 10 GB map must not leave 10 GB resident
        finally:
            drop_pages(self.matrix)  # the last group's pages too, and those of a pass stopped early
