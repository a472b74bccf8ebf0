"""A compressed index for tens of millions of tiles: OPQ + IVF-PQ, inverted lists on disk,
exact re-ranking from the float16 vectors.

Layout (a folder beside the layer, or inside a dataset's search folder)::

    <name>.ivfpq/
      index.json              parameters, parts (name, fingerprint, part number, rows), build report
      trained.index           the trained, empty OPQ + IVF-PQ index (FAISS)
      shards/<part>.index     one IVF-PQ shard per part: its PQ codes, ids = part << 32 | row
      merged-<gen>.index      the search index: the trained one with the shards' inverted lists,
      merged-<gen>.ivfdata    merged into one memory-mapped on-disk file

How it is built (:meth:`CompressedIndex.build`): FAISS trains the OPQ rotation, the coarse
quantizer (``nlist`` centroids) and the product quantizer (``M`` sub-vectors of 8 bits) on a
sample of rows drawn from every part; each part is then encoded into its own shard, reading
its vectors in chunks (never all vectors at once); the shards' inverted lists are merged into
one on-disk file (``faiss.contrib.ondisk``), memory-mapped at query time, so a query touches
only the lists it probes. ``index.json`` is written last: it is the commit marker, and it
names the current merge generation, so a build killed half way leaves the previous index
usable.

Incremental (:meth:`CompressedIndex.update`): parts whose name and fingerprint are unchanged
keep their shard; new parts are encoded with the trained quantizers; removed or rewritten
parts' shards are deleted; the shards are merged again (I/O only, no training).

Search: the IVF-PQ index returns ``rerank`` candidates (asymmetric PQ distances over
``nprobe`` lists), which are re-scored exactly as ``float32(row) . query`` from the parts'
float16 vectors, so the scores returned are exact and only the candidate set is approximate.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, write_text
from ..errors import InputError, OptionError
from .ann import faiss_module
from .exact import dot, order_best, read_rows, row_blocks

VERSION = 1
PART_SHIFT = 32  # global id = part number << 32 | row in part
CHUNK = 65536
#: recall@10 the build aims for when it chooses ``nprobe`` itself (see CompressedIndex.calibrate)
TARGET_RECALL = 0.95
#: while calibrating, ``nprobe`` is doubled up to this many lists, while a doubling gains MIN_GAIN
MAX_NPROBE = 1024
#: ``rerank`` is doubled up to this many candidates (each one is a row read from the float16 vectors)
MAX_RERANK = 4096
MIN_GAIN = 0.005
#: OPQ rotation refinements (FAISS's default 50 costs most of the training time for little recall)
OPQ_ITERATIONS = 10
DEFAULTS: dict[str, int | None] = {
    "nlist": None,  # coarse lists; None: about sqrt(N), between 64 and 65536
    "m": 64,  # PQ sub-vectors (bytes per vector); the dimension must be a multiple
    "nprobe": 48,  # lists scanned per query
    "rerank": 256,  # candidates re-scored exactly
    "train_size": 200_000,  # rows sampled to train OPQ, the coarse quantizer and PQ
    "opq": 1,  # 1: learn an OPQ rotation before PQ (better codes for correlated dimensions); 0: plain PQ
}


@dataclass
class EmbeddingPart:
    """One part of the vectors an index covers: a layer, or one part file of a dataset.

    ``matrix`` is ``(n, D)`` float16 or float32 (usually memory-mapped); ``fingerprint`` changes
    whenever the part's file is rewritten.
    """

    name: str
    fingerprint: Any
    matrix: np.ndarray


@contextmanager
def quiet_native_output() -> Iterator[None]:
    """Silence what FAISS's C++ code prints to the process's stdout/stderr ("resizing …",
    clustering warnings): stdout may be a JSON-lines progress stream."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def default_nlist(n: int) -> int:
    """Coarse lists for ``n`` vectors: about ``sqrt(n)``, within 64..65536 (and at most n / 39).

    Encoding assigns every vector to its nearest list, a cost linear in ``nlist``: at 10M rows
    sqrt(N) = 3,162 lists keeps a 2-core build well under 30 minutes, and with ``nprobe`` 48 a
    query scans ~1.5 % of the codes."""
    return int(max(1, min(65536, max(64, round(math.sqrt(n))), n // 39)))


def check_params(params: dict, n: int, dim: int) -> dict:
    """The parameters with defaults filled in and checked (one-line OptionError)."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise OptionError(f"unknown ivfpq parameter {unknown[0]!r}: use {', '.join(DEFAULTS)}")
    merged = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    if merged["nlist"] is None:
        merged["nlist"] = default_nlist(n)
    for name, value in merged.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if name == "opq" else 1):
            raise OptionError(f"invalid ivfpq parameter {name}={value!r}: use a positive integer")
    if dim % int(merged["m"]):
        raise OptionError(f"ivfpq m={merged['m']} must divide the embedding dimension {dim}")
    merged["nprobe"] = min(int(merged["nprobe"]), int(merged["nlist"]))
    return {k: int(v) for k, v in merged.items()}


def _sample(parts: Sequence[EmbeddingPart], size: int, seed: int = 0) -> np.ndarray:
    """``size`` rows drawn evenly from all parts (sorted within each part, read by
    :func:`~.exact.read_rows`, so a sample of a memory map does not leave the map resident)."""
    total = sum(len(p.matrix) for p in parts)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=min(size, total), replace=False))
    out, start = [], 0
    for part in parts:
        n = len(part.matrix)
        local = picks[(picks >= start) & (picks < start + n)] - start
        if len(local):
            out.append(read_rows(part.matrix, local))
        start += n
    return np.ascontiguousarray(np.concatenate(out))


class CompressedIndex:
    """An OPQ + IVF-PQ index over named parts, stored in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path, meta: dict, index: Any):
        self.folder = folder
        self.meta = meta
        self.index = index
        self.params = meta["params"]
        self.part_numbers = {p["name"]: p["number"] for p in meta["parts"]}
        self.set_search(self.params["nprobe"], self.params["rerank"])

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, parts: Sequence[EmbeddingPart], folder: str | Path, progress: Callable[[str], None] | None = None,
              **params: Any) -> CompressedIndex:
        """Train on a sample of every part, encode each part into a shard, merge; returns the index."""
        folder = Path(folder)
        if not parts or sum(len(p.matrix) for p in parts) == 0:
            raise OptionError("cannot build an index without embeddings")
        dim = int(parts[0].matrix.shape[1])
        n = sum(len(p.matrix) for p in parts)
        given = dict(params)
        params = check_params(params, n, dim)
        if n < 39 * params["nlist"] or n < 256:
            raise OptionError(f"{n} vectors are too few for an ivfpq index with {params['nlist']} lists; "
                              "search exactly, or use fewer lists (nlist)")
        faiss = faiss_module()
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "shards").mkdir(parents=True)
        started = time.perf_counter()
        # "np": no polysemous training (FAISS's factory default for 8-bit PQ; costly and unused here)
        opq = f"OPQ{params['m']}," if params["opq"] else ""
        index = faiss.index_factory(dim, f"{opq}IVF{params['nlist']},PQ{params['m']}x8np", faiss.METRIC_INNER_PRODUCT)
        if params["opq"]:
            faiss.downcast_VectorTransform(index.chain.at(0)).niter = OPQ_ITERATIONS
        sample = _sample(parts, params["train_size"])
        if progress:
            progress(f"training {opq}IVF{params['nlist']},PQ{params['m']} on {len(sample):,} vectors")
        with quiet_native_output():
            index.train(sample)
        del sample
        with atomic_path(folder / "trained.index") as tmp:
            faiss.write_index(index, str(tmp))
        meta = {"version": VERSION, "dim": dim, "params": params, "parts": [], "generation": 0,
                "nprobe_given": given.get("nprobe") is not None, "rerank_given": given.get("rerank") is not None,
                "train_seconds": round(time.perf_counter() - started, 1)}
        built = cls._update(folder, meta, parts, progress)
        built.meta["build_seconds"] = round(time.perf_counter() - started, 1)
        built._write_meta()
        return built

    def update(self, parts: Sequence[EmbeddingPart], progress: Callable[[str], None] | None = None) -> dict:
        """Encode new and rewritten parts, drop removed ones, merge again; returns what changed."""
        before = {p["name"]: p["fingerprint"] for p in self.meta["parts"]}
        updated = self._update(self.folder, self.meta, parts, progress)
        self.__dict__.update(updated.__dict__)
        now = {p.name: p.fingerprint for p in parts}
        return {"added": sorted(set(now) - set(before)), "removed": sorted(set(before) - set(now)),
                "rewritten": sorted(k for k in now if k in before and before[k] != now[k])}

    @classmethod
    def _update(cls, folder: Path, meta: dict, parts: Sequence[EmbeddingPart],
                progress: Callable[[str], None] | None) -> CompressedIndex:
        faiss = faiss_module()
        if parts and int(parts[0].matrix.shape[1]) != meta["dim"]:
            raise OptionError(f"the embeddings have dimension {parts[0].matrix.shape[1]}, the index {meta['dim']}; "
                              "build the index again")
        kept = {p["name"]: p for p in meta["parts"]}
        numbers = [p["number"] for p in meta["parts"]]
        next_number = max(numbers) + 1 if numbers else 0
        entries = []
        for part in parts:
            old = kept.get(part.name)
            if old is not None and old["fingerprint"] == part.fingerprint and (folder / old["shard"]).exists():
                entries.append(old)
                continue
            number = old["number"] if old is not None else next_number
            next_number += 0 if old is not None else 1
            if number >= 1 << (63 - PART_SHIFT):
                raise OptionError("too many parts for one index; build it again")
            shard = f"shards/{number:06d}.index"
            if progress:
                progress(f"encoding {part.name} ({len(part.matrix):,} vectors)")
            index = faiss.read_index(str(folder / "trained.index"))
            for s, rows in row_blocks(part.matrix, CHUNK):
                block = np.ascontiguousarray(rows, dtype=np.float32)
                ids = (np.int64(number) << PART_SHIFT) + np.arange(s, s + len(block), dtype=np.int64)
                index.add_with_ids(block, ids)
            with atomic_path(folder / shard) as tmp:
                faiss.write_index(index, str(tmp))
            entries.append({"name": part.name, "fingerprint": part.fingerprint, "number": number,
                            "rows": int(len(part.matrix)), "shard": shard})
        live = {e["shard"] for e in entries}
        for old in meta["parts"]:
            if old["shard"] not in live:
                (folder / old["shard"]).unlink(missing_ok=True)
        generation = int(meta.get("generation", 0)) + 1
        if progress:
            progress(f"merging {len(entries)} shard(s) into the on-disk inverted lists")
        merged = cls._merge(folder, entries, generation)
        previous = int(meta.get("generation", 0))
        new_meta = {**meta, "parts": entries, "generation": generation, "ntotal": int(merged.ntotal)}
        built = cls(folder, new_meta, merged)
        built._write_meta()
        for suffix in (".index", ".ivfdata"):
            if previous:
                (folder / f"merged-{previous}{suffix}").unlink(missing_ok=True)
        return built

    @staticmethod
    def _merge(folder: Path, entries: list, generation: int) -> Any:
        faiss = faiss_module()
        from faiss.contrib.ondisk import merge_ondisk

        trained = faiss.read_index(str(folder / "trained.index"))
        ivfdata = folder / f"merged-{generation}.ivfdata"
        ivfdata.unlink(missing_ok=True)
        with quiet_native_output():
            if entries:
                merge_ondisk(trained, [str(folder / e["shard"]) for e in entries], str(ivfdata))
            with atomic_path(folder / f"merged-{generation}.index", verify=None) as tmp:
                faiss.write_index(trained, str(tmp))
            return faiss.read_index(str(folder / f"merged-{generation}.index"), faiss.IO_FLAG_ONDISK_SAME_DIR)

    def _write_meta(self) -> None:
        write_text(self.folder / "index.json", json.dumps(self.meta, indent=1, sort_keys=True, default=str))

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, folder: str | Path) -> CompressedIndex | None:
        """The index in ``folder`` (None when there is none or it was made by another version)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "index.json").read_text())
        except (OSError, ValueError):
            return None
        if meta.get("version") != VERSION:
            return None
        faiss = faiss_module()
        path = folder / f"merged-{meta['generation']}.index"
        try:
            with quiet_native_output():
                index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
        except RuntimeError:
            return None
        return cls(folder, meta, index)

    def stale_parts(self, parts: Sequence[EmbeddingPart]) -> list[str]:
        """Names of ``parts`` that are new or rewritten, plus indexed parts that are gone."""
        indexed = {p["name"]: p["fingerprint"] for p in self.meta["parts"]}
        now = {p.name: p.fingerprint for p in parts}
        return sorted({k for k in now if indexed.get(k) != now[k]} | (set(indexed) - set(now)))

    def calibrate(self, recall: Callable[[], float], target: float = TARGET_RECALL) -> float:
        """Choose ``nprobe`` and ``rerank``: while ``recall()`` — recall@10 against exact search on
        held-out queries, measured by the caller with the current setting — is below ``target``,
        try doubling each (``nprobe`` up to the lists there are and MAX_NPROBE, ``rerank`` up to
        MAX_RERANK) and keep the doubling that gains more, if it gains at least MIN_GAIN; stop
        when neither does. The choice is kept in the index's metadata; a setting the user gave
        is kept as is. Returns the recall of the setting chosen.

        The two knobs lose different neighbours: ``nprobe`` those in lists not scanned (the
        share of lists a query must scan falls slowly with the size of the index, so a fixed
        ``nprobe`` ample at 1M rows misses neighbours at 10M), ``rerank`` those the 8-bit codes
        cannot tell apart — near-duplicates, which archives hold many of (overlapping tiles,
        water, forest): when a query has more near-equal rows than ``rerank`` candidates, its
        exact top 10 are a lottery among them whatever the lists probed."""
        reached = recall()
        limits = {"nprobe": min(int(self.params["nlist"]), MAX_NPROBE), "rerank": MAX_RERANK}
        knobs = [k for k in ("nprobe", "rerank") if not self.meta.get(f"{k}_given")]
        tried = [{"nprobe": self.nprobe, "rerank": self.rerank, "recall_at_10": round(reached, 4)}]
        while reached < target:
            now = {"nprobe": self.nprobe, "rerank": self.rerank}
            best: tuple[float, dict] | None = None
            for knob in knobs:
                if now[knob] >= limits[knob]:
                    continue
                setting = {**now, knob: min(2 * now[knob], limits[knob])}
                self.set_search(setting["nprobe"], setting["rerank"])
                gained = recall()
                tried.append({**setting, "recall_at_10": round(gained, 4)})
                if gained - reached >= MIN_GAIN and (best is None or gained > best[0]):
                    best = (gained, setting)
            if best is None:
                self.set_search(now["nprobe"], now["rerank"])
                break
            reached, setting = best
            self.set_search(setting["nprobe"], setting["rerank"])
        if tried[-1] != {"nprobe": self.nprobe, "rerank": self.rerank, "recall_at_10": round(reached, 4)}:
            reached = recall()  # measured again, so the caller's figures are the chosen setting's
        self.params["nprobe"], self.params["rerank"] = self.nprobe, self.rerank
        self.meta["calibrated"] = {"nprobe": self.nprobe, "rerank": self.rerank, "recall_at_10": round(reached, 4),
                                   "target": target, "tried": tried}
        self._write_meta()
        return reached

    # ------------------------------------------------------------------ search
    def set_search(self, nprobe: int, rerank: int) -> None:
        """Lists probed and candidates re-scored per query."""
        faiss = faiss_module()
        faiss.extract_index_ivf(self.index).nprobe = int(nprobe)
        self.nprobe, self.rerank = int(nprobe), int(rerank)

    def candidates(self, queries: np.ndarray, fetch: int) -> np.ndarray:
        """Global ids (``part << 32 | row``, -1 when missing) of the best ``fetch`` PQ candidates per query."""
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), int(fetch))
        return ids

    def search(self, parts: dict[str, EmbeddingPart], queries: np.ndarray, k: int,
               allowed: Callable[[np.ndarray], np.ndarray] | None = None, fetch: int | None = None
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per query, ``(exact scores, global ids)`` of the best ``k``, best first (ties by id).

        ``parts``: the parts by name (their vectors re-score the candidates); ``allowed``: a
        function of global ids -> bool mask (spatial filters, exclusions).
        """
        number_to_part = {p["number"]: parts.get(p["name"]) for p in self.meta["parts"]}
        found = self.candidates(queries, fetch or max(self.rerank, k))
        out = []
        for q, cand in zip(queries, found):
            cand = np.unique(cand[cand >= 0])
            if allowed is not None and len(cand):
                cand = cand[allowed(cand)]
            scores = np.empty(len(cand), dtype=np.float32)
            numbers, rows = cand >> PART_SHIFT, cand & ((1 << PART_SHIFT) - 1)
            for number in np.unique(numbers):
                part = number_to_part.get(int(number))
                if part is None:
                    raise InputError(f"{self.folder}: the index names a part that is gone; update the index")
                sel = np.flatnonzero(numbers == number)  # rows ascending: ids are sorted
                scores[sel] = dot(read_rows(part.matrix, rows[sel]), q)
            out.append(order_best(scores, cand, k))
        return out
