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

Integrity (:meth:`CompressedIndex.open`): every file is checked before it is used.
``index.json`` against its schema (types, ranges: ``nprobe`` 1..nlist, ``rerank``
1..:data:`RERANK_LIMIT`, part numbers unique and matching their shards, rows adding up);
``trained.index`` and ``merged-<gen>.index`` against the size and CRC-32 recorded at build
time; ``merged-<gen>.ivfdata`` against its recorded size and the extent of every inverted list
*before* it is memory-mapped and searched (a file cut short would be a SIGBUS on the first
probe of a list past its end). Each inverted list also has a CRC-32 (``merged-<gen>.crc32``,
one per list), checked the first time a query probes the list: the cost follows the lists a
process reads, not the size of the index (crc32 runs at about 1 GB/s, a probed list is tens of
KB). A damaged index is never used: :meth:`open` returns None and a search that meets a
damaged list raises :class:`CorruptIndex`; both log a one-line warning naming the
``hqrs-geo index`` command that rebuilds it, and the callers search exactly instead. Shards
whose size or CRC-32 no longer match are encoded again by the next update.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, write_text
from ..errors import InputError, OptionError
from .ann import faiss_module
from .base import ANN_MAX_FETCH, ApproximateSearcher, CorruptIndex, Result, Searcher
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
#: the largest ``rerank`` accepted (given or in ``index.json``): each candidate is a row read from disk
RERANK_LIMIT = 100_000
#: the most coarse lists an index may have (FAISS's IVF is built for at most a few 10^5; ours default to <= 65536)
NLIST_LIMIT = 1 << 20
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

log = logging.getLogger(__name__)


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
    if merged["rerank"] > RERANK_LIMIT:
        raise OptionError(f"invalid ivfpq parameter rerank={merged['rerank']!r}: use 1..{RERANK_LIMIT:,} candidates "
                          "(each one is a row read from disk per query)")
    if merged["nlist"] > NLIST_LIMIT or merged["opq"] > 1:
        name = "nlist" if merged["nlist"] > NLIST_LIMIT else "opq"
        raise OptionError(f"invalid ivfpq parameter {name}={merged[name]!r}: "
                          + (f"use at most {NLIST_LIMIT:,} lists" if name == "nlist" else "use 0 or 1"))
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


def file_check(path: Path) -> dict:
    """``{"bytes", "crc32"}`` of the file at ``path`` (read in 1 MiB blocks)."""
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return {"bytes": path.stat().st_size, "crc32": crc}


def list_extents(index: Any) -> np.ndarray:
    """``(nlist, 3)`` int64: ``size, capacity, offset`` of every on-disk inverted list of ``index``
    (a list occupies ``capacity * code_size`` bytes of codes, then ``capacity * 8`` of ids)."""
    faiss = faiss_module()
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if not isinstance(invlists, faiss.OnDiskInvertedLists):
        raise ValueError(f"its inverted lists are {type(invlists).__name__}, not on disk")
    lists = invlists.lists
    out = np.empty((int(invlists.nlist), 3), dtype=np.int64)
    for i in range(len(out)):
        one = lists.at(i)
        out[i] = (one.size, one.capacity, one.offset)
    return out


def _list_crc(fd: int, extent: np.ndarray, code_size: int) -> int | None:
    """CRC-32 of one list's codes and ids (None when the file ends before them)."""
    size, capacity, offset = (int(v) for v in extent)
    codes = os.pread(fd, size * code_size, offset)
    ids = os.pread(fd, size * 8, offset + capacity * code_size)
    if len(codes) != size * code_size or len(ids) != size * 8:
        return None
    return zlib.crc32(ids, zlib.crc32(codes))


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def meta_problem(meta: Any) -> str | None:
    """What is wrong with the contents of an ``index.json`` (None when its schema, types and
    ranges hold): the checks :meth:`CompressedIndex.open` makes before touching any other file."""
    if not isinstance(meta, dict):
        return f"index.json holds a JSON {type(meta).__name__}, not an object"
    if meta.get("version") != VERSION:
        return f"index.json has version {str(meta.get('version'))[:20]!r}, this version of hqrs_geo reads {VERSION}"
    dim, params = meta.get("dim"), meta.get("params")
    if not _whole(dim, 1, 1 << 16):
        return f"index.json: dim {str(dim)[:20]!r} is not a whole number in 1..65536"
    if not isinstance(params, dict) or set(params) != set(DEFAULTS):
        return f"index.json: params must hold exactly {', '.join(DEFAULTS)}"
    assert isinstance(dim, int)
    limits = {"nlist": (1, NLIST_LIMIT), "m": (1, dim), "train_size": (1, 1 << 40), "opq": (0, 1),
              "rerank": (1, RERANK_LIMIT)}
    for name, (low, high) in limits.items():
        if not _whole(params[name], low, high):
            return f"index.json: {name} {str(params[name])[:20]!r} is not a whole number in {low}..{high:,}"
    if not _whole(params["nprobe"], 1, params["nlist"]):
        return (f"index.json: nprobe {str(params['nprobe'])[:20]!r} is not a whole number in "
                f"1..{params['nlist']} (nlist)")
    if dim % params["m"]:
        return f"index.json: m {params['m']} does not divide dim {dim}"
    if not _whole(meta.get("generation"), 1, 1 << 62):
        return f"index.json: generation {str(meta.get('generation'))[:20]!r} is not a whole number >= 1"
    parts = meta.get("parts")
    if not isinstance(parts, list):
        return "index.json: parts is not a list"
    names, numbers = set(), set()
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("name"), str) or not part["name"]:
            return f"index.json: part {i} has no name"
        number = part.get("number")
        if not _whole(number, 0, (1 << (63 - PART_SHIFT)) - 1):
            return f"index.json: part {part['name'][:80]!r} has number {str(number)[:20]!r}, not a whole number >= 0"
        if part.get("shard") != f"shards/{number:06d}.index":
            return (f"index.json: part {part['name'][:80]!r} has number {number} but shard "
                    f"{str(part.get('shard'))[:60]!r} (numbers edited or swapped?)")
        if not _whole(part.get("rows"), 0, (1 << PART_SHIFT) - 1):
            return f"index.json: part {part['name'][:80]!r} has rows {str(part.get('rows'))[:20]!r}"
        if part["name"] in names or number in numbers:
            return f"index.json: part {part['name'][:80]!r} or its number {number} appears twice"
        names.add(part["name"])
        numbers.add(number)
    if "ntotal" in meta and meta["ntotal"] != sum(p["rows"] for p in parts):
        return f"index.json: ntotal {str(meta['ntotal'])[:20]!r} is not the sum of the parts' rows"
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and _whole(v.get("bytes"), 0, 1 << 62) and _whole(v.get("crc32", 0), 0, (1 << 32) - 1)
            for v in files.values()):
        return "index.json: files holds something other than sizes and CRC-32s"
    return None


def _file_problem(path: Path, recorded: dict) -> str | None:
    """Why the file at ``path`` is not the one recorded (size, then CRC-32), or None."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != recorded["bytes"]:
        return f"{path.name} has {size:,} bytes, the index wrote {recorded['bytes']:,} (cut short or replaced?)"
    if "crc32" in recorded and file_check(path)["crc32"] != recorded["crc32"]:
        return f"{path.name} does not match its checksum (garbled?)"
    return None


def _shard_problem(folder: Path, entry: dict) -> str | None:
    """Why a part's shard cannot be merged again (missing, cut short, garbled, unreadable), or None."""
    path = folder / entry["shard"]
    if "shard_file" in entry:
        return _file_problem(path, entry["shard_file"])
    if not path.is_file():  # an index written before shards had checksums: can FAISS read it?
        return f"{entry['shard']} is missing"
    try:
        with quiet_native_output():
            ntotal = faiss_module().read_index(str(path)).ntotal
    except RuntimeError:
        return f"{entry['shard']} is not readable"
    return None if ntotal == entry.get("rows") else f"{entry['shard']} holds {ntotal} vectors, not {entry.get('rows')}"


def rebuild_command(folder: Path) -> str:
    """The ``hqrs-geo index`` command that rebuilds the index in ``folder`` (a dataset's
    ``_search/emb_<key>.ivfpq`` or a layer's ``<layer>.emb_<key>.ivfpq``)."""
    if folder.parent.name == "_search":
        target = str(folder.parent.parent)
    else:
        target = str(folder.parent / folder.name.split(".emb_")[0]) if ".emb_" in folder.name else str(folder)
    return f"hqrs-geo index {target} --kind ivfpq"


class CompressedIndex:
    """An OPQ + IVF-PQ index over named parts, stored in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path, meta: dict, index: Any, extents: np.ndarray | None = None,
                 list_crcs: np.ndarray | None = None):
        self.folder = folder
        self.meta = meta
        self.index = index
        self.params = meta["params"]
        self.part_numbers = {p["name"]: p["number"] for p in meta["parts"]}
        self.part_rows = {p["number"]: p["rows"] for p in meta["parts"]}
        self.extents = extents
        self.list_crcs = list_crcs
        self.verified: set[int] = set()  # lists whose CRC-32 matched in this process
        self.broken: str | None = None  # the damage found, once found
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
                "files": {"trained": file_check(folder / "trained.index")},
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
        trained = meta.get("files", {}).get("trained")
        if trained is not None and _file_problem(folder / "trained.index", trained):
            raise CorruptIndex(f"{folder}: {_file_problem(folder / 'trained.index', trained)}; the index cannot be "
                               f"updated: delete {folder} and run '{rebuild_command(folder)}' to build it anew")
        for part in parts:
            old = kept.get(part.name)
            if old is not None and old["fingerprint"] == part.fingerprint and old.get("rows") == len(part.matrix):
                problem = _shard_problem(folder, old)
                if problem is None:
                    entries.append(old)
                    continue
                log.warning("%s: %s; encoding part %s again", folder, problem, part.name)
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
                            "rows": int(len(part.matrix)), "shard": shard, "shard_file": file_check(folder / shard)})
        live = {e["shard"] for e in entries}
        for old in meta["parts"]:
            if old["shard"] not in live:
                (folder / old["shard"]).unlink(missing_ok=True)
        generation = int(meta.get("generation", 0)) + 1
        if progress:
            progress(f"merging {len(entries)} shard(s) into the on-disk inverted lists")
        merged, files, extents, crcs = cls._merge(folder, entries, generation)
        previous = int(meta.get("generation", 0))
        new_meta = {**meta, "parts": entries, "generation": generation, "ntotal": int(merged.ntotal),
                    "files": {**meta.get("files", {}), **files}}
        built = cls(folder, new_meta, merged, extents, crcs)
        built._write_meta()
        for suffix in (".index", ".ivfdata", ".crc32"):
            if previous:
                (folder / f"merged-{previous}{suffix}").unlink(missing_ok=True)
        return built

    @staticmethod
    def _merge(folder: Path, entries: list, generation: int) -> tuple[Any, dict, np.ndarray, np.ndarray]:
        """Merge the shards into ``merged-<generation>.*``; returns the index, the sizes and
        CRC-32s to record, the lists' extents and their CRC-32s (also written to ``.crc32``)."""
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
            merged = faiss.read_index(str(folder / f"merged-{generation}.index"), faiss.IO_FLAG_ONDISK_SAME_DIR)
        extents = list_extents(merged)
        code_size = int(faiss.extract_index_ivf(merged).code_size)
        crcs = np.zeros(len(extents), dtype="<u4")
        if ivfdata.exists():
            fd = os.open(ivfdata, os.O_RDONLY)
            try:
                for i, extent in enumerate(extents):
                    crcs[i] = _list_crc(fd, extent, code_size) or 0
            finally:
                os.close(fd)
        crc_path = folder / f"merged-{generation}.crc32"
        with atomic_path(crc_path, verify=None) as tmp:
            tmp.write_bytes(crcs.tobytes())
        files = {"index": file_check(folder / f"merged-{generation}.index"), "crc32": file_check(crc_path),
                 "ivfdata": {"bytes": ivfdata.stat().st_size if ivfdata.exists() else 0}}
        return merged, files, extents, crcs

    def _write_meta(self) -> None:
        write_text(self.folder / "index.json", json.dumps(self.meta, indent=1, sort_keys=True, default=str))

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, folder: str | Path) -> CompressedIndex | None:
        """The index in ``folder``, every file checked first (see the module docstring); None
        when there is none, or when it is damaged or from another version: then a one-line
        warning names the ``hqrs-geo index`` command that rebuilds it."""
        folder = Path(folder)
        if not (folder / "index.json").exists():
            return None
        try:
            return cls._open_checked(folder)
        except CorruptIndex as err:
            log.warning("%s", err)
            return None

    @classmethod
    def _damage(cls, folder: Path, problem: str) -> CorruptIndex:
        return CorruptIndex(f"{folder}: {problem}; the index is not used (searches are exact) until "
                            f"'{rebuild_command(folder)}' rebuilds it")

    @classmethod
    def _open_checked(cls, folder: Path) -> CompressedIndex:
        try:
            meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise cls._damage(folder, f"index.json is not readable JSON ({' '.join(str(exc).split())[:80]})") from None
        problem = meta_problem(meta)
        if problem:
            raise cls._damage(folder, problem)
        generation, files = meta["generation"], meta.get("files", {})
        index_path = folder / f"merged-{generation}.index"
        ivfdata = folder / f"merged-{generation}.ivfdata"
        crc_path = folder / f"merged-{generation}.crc32"
        for key, path in (("trained", folder / "trained.index"), ("index", index_path), ("crc32", crc_path)):
            if key in files and (problem := _file_problem(path, files[key])):
                raise cls._damage(folder, problem)
        if not index_path.is_file():
            raise cls._damage(folder, f"{index_path.name} is missing")
        size = ivfdata.stat().st_size if ivfdata.is_file() else None
        if size is None or ("ivfdata" in files and size != files["ivfdata"]["bytes"]):
            expected = files.get("ivfdata", {}).get("bytes")
            raise cls._damage(folder, f"{ivfdata.name} is missing" if size is None else
                              f"{ivfdata.name} has {size:,} bytes, the index wrote {expected:,} "
                              "(cut short or replaced?)")
        faiss = faiss_module()
        try:
            with quiet_native_output():
                index = faiss.read_index(str(index_path), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
            ivf = faiss.extract_index_ivf(index)
            extents = list_extents(index)
            totsize = int(faiss.downcast_InvertedLists(ivf.invlists).totsize)
        except (RuntimeError, ValueError) as exc:
            raise cls._damage(folder, f"{index_path.name} is not a readable on-disk IVF-PQ index "
                                      f"({' '.join(str(exc).split())[:80]})") from None
        code_size = int(ivf.code_size)
        params = meta["params"]
        if int(index.d) != meta["dim"] or int(ivf.nlist) != params["nlist"] or code_size != params["m"]:
            raise cls._damage(folder, f"{index_path.name} has dimension {index.d}, {ivf.nlist} lists of "
                                      f"{code_size}-byte codes; index.json says {meta['dim']}, {params['nlist']}, "
                                      f"{params['m']}")
        if int(index.ntotal) != sum(p["rows"] for p in meta["parts"]):
            raise cls._damage(folder, f"{index_path.name} holds {index.ntotal:,} vectors, the parts in index.json "
                                      f"{sum(p['rows'] for p in meta['parts']):,}")
        ends = extents[:, 2] + extents[:, 1] * (code_size + 8)
        if len(extents) and (np.any(extents[:, 0] > extents[:, 1]) or np.any(extents < 0) or ends.max() > totsize
                             or int(extents[:, 0].sum()) != int(index.ntotal)):
            raise cls._damage(folder, f"{index_path.name}: its inverted lists do not fit their {totsize:,} bytes")
        if size < totsize:  # checked before any list is read: a shorter file is a SIGBUS on the first probe
            raise cls._damage(folder, f"{ivfdata.name} has {size:,} bytes, its lists need {totsize:,} (cut short?)")
        crcs = None
        if "crc32" in files:
            crcs = np.fromfile(crc_path, dtype="<u4")
            if len(crcs) != len(extents):
                raise cls._damage(folder, f"{crc_path.name} has {len(crcs)} checksums for {len(extents)} lists")
        return cls(folder, meta, index, extents, crcs)

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

    def fail(self, problem: str) -> CorruptIndex:
        """Mark the index damaged (warned once) and return the error to raise."""
        if self.broken is None:
            self.broken = str(self._damage(self.folder, problem))
            log.warning("%s", self.broken)
        return CorruptIndex(self.broken)

    def probed_lists(self, queries: np.ndarray) -> np.ndarray:
        """The inverted lists a search of ``queries`` scans (its ``nprobe`` nearest coarse centroids)."""
        faiss = faiss_module()
        x = np.ascontiguousarray(queries, dtype=np.float32)
        if isinstance(self.index, faiss.IndexPreTransform):
            for i in range(self.index.chain.size()):
                x = faiss.downcast_VectorTransform(self.index.chain.at(i)).apply(x)
        ivf = faiss.extract_index_ivf(self.index)
        _, lists = ivf.quantizer.search(np.ascontiguousarray(x), int(self.nprobe))
        return np.unique(lists[lists >= 0])

    def verify_lists(self, lists: np.ndarray) -> None:
        """Check the CRC-32 of each list not checked yet in this process; a mismatch (or a file
        shorter than a list) raises :class:`CorruptIndex` and marks the index damaged."""
        if self.list_crcs is None or self.extents is None:
            return
        todo = [int(i) for i in lists if int(i) not in self.verified]
        if not todo:
            return
        faiss = faiss_module()
        code_size = int(faiss.extract_index_ivf(self.index).code_size)
        path = self.folder / f"merged-{self.meta['generation']}.ivfdata"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise self.fail(f"{path.name} cannot be read ({exc.strerror})") from None
        try:
            for i in todo:
                if _list_crc(fd, self.extents[i], code_size) != int(self.list_crcs[i]):
                    raise self.fail(f"inverted list {i} of {path.name} does not match its checksum (garbled?)")
                self.verified.add(i)
        finally:
            os.close(fd)

    def candidates(self, queries: np.ndarray, fetch: int) -> np.ndarray:
        """Global ids (``part << 32 | row``, -1 when missing) of the best ``fetch`` PQ candidates per
        query, after the lists the queries probe passed their checksums (:meth:`verify_lists`)."""
        if self.broken is not None:
            raise CorruptIndex(self.broken)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.verify_lists(self.probed_lists(queries))
        _, ids = self.index.search(queries, int(fetch))
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
                if int(number) not in self.part_rows or int(rows[numbers == number].max()) >= \
                        self.part_rows[int(number)]:
                    raise self.fail(f"the lists hold ids of part {int(number)} that index.json does not have "
                                    "(garbled?)")
                part = number_to_part.get(int(number))
                if part is None:
                    raise InputError(f"{self.folder}: the index names a part that is gone; update the index")
                sel = np.flatnonzero(numbers == number)  # rows ascending: ids are sorted
                scores[sel] = dot(read_rows(part.matrix, rows[sel]), q)
            out.append(order_best(scores, cand, k))
        return out


class CompressedSearch(ApproximateSearcher):
    """A :class:`CompressedIndex` searched over the rows of ``exact``: the vectors of ``parts``
    one after the other (a row is its part's first row plus its row in the part). The index's
    candidates are re-scored exactly from the parts' vectors; ``exact`` answers what the index
    cannot (see :class:`~hqrs_geo.search.base.ApproximateSearcher`)."""

    def __init__(self, index: CompressedIndex, parts: Sequence[EmbeddingPart], exact: Searcher):
        self.index, self.parts, self.exact = index, list(parts), exact
        self.starts = np.cumsum([0] + [len(p.matrix) for p in self.parts[:-1]], dtype=np.int64)

    def wanted(self, k: int) -> int:
        """The index's ``rerank`` candidates (at least ``k``) when no row is masked."""
        return max(self.index.rerank, k)

    def fetch_limit(self) -> int:
        """At most :data:`~hqrs_geo.search.base.ANN_MAX_FETCH` candidates (or ``rerank`` when larger)."""
        return max(ANN_MAX_FETCH, self.index.rerank)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """The rows of global ids (``part << 32 | row``); -1 for an id no part of ours holds."""
        places = {self.index.part_numbers.get(p.name): (int(start), len(p.matrix))
                  for p, start in zip(self.parts, self.starts)}
        numbers, local = ids >> PART_SHIFT, ids & ((1 << PART_SHIFT) - 1)
        out = np.full(len(ids), -1, dtype=np.int64)
        for number in np.unique(numbers):
            place = places.get(int(number))
            if place is not None:
                ours = (numbers == number) & (local < place[1])
                out[ours] = place[0] + local[ours]
        return out

    def candidates(self, q: np.ndarray, k: int, mask: np.ndarray | None, fetch: int) -> Iterator[Result]:
        """The index's best ``k`` of ``fetch`` candidates per query that the mask allows."""
        keep = None
        if mask is not None:
            def keep(ids: np.ndarray) -> np.ndarray:
                rows = self.rows_of(ids)  # an id no part holds is kept for the index's own checks to refuse
                return np.where(rows >= 0, mask[np.maximum(rows, 0)], True)

        by_name = {p.name: p for p in self.parts}
        for scores, ids in self.index.search(by_name, q, k, keep, fetch):
            yield scores, self.rows_of(ids)
