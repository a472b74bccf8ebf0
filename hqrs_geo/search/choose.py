"""Which index a layer or dataset needs (``hqrs-geo index --kind auto``), and why.

The rule, from the measurements in ``benchmarks/search.py`` (2 cores, 512-d float16):

* up to :data:`EXACT_MAX_ROWS` rows: **exact** search (memory-bandwidth bound, ~40 ms per
  million rows): no index to build or keep up to date, results are exact;
* more rows, and a float32 copy of the vectors (4 x N x D bytes) fits in
  :data:`IVF_MEMORY_SHARE` of the available memory: **ivf** (IVF-Flat: recall@10 ~1.0 at ~2 ms
  per query at 1M rows, builds in seconds);
* otherwise: **ivfpq** (OPQ + IVF-PQ with on-disk inverted lists: ~m + 8 bytes per vector on
  disk, memory-mapped; exact re-ranking from the float16 vectors).
"""
from __future__ import annotations

import os

EXACT_MAX_ROWS = 500_000
IVF_MEMORY_SHARE = 0.25
KINDS = ("auto", "exact", "hnsw", "ivf", "ivfpq")


def available_memory() -> int:
    """Bytes of memory available to new work (``MemAvailable``; total physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def choose_kind(n: int, dim: int, memory: int | None = None) -> tuple[str, str]:
    """``(kind, reason)`` for ``n`` vectors of dimension ``dim`` (see the module docstring)."""
    memory = available_memory() if memory is None else memory
    gib = 1 << 30
    if n <= EXACT_MAX_ROWS:
        return "exact", (f"{n:,} rows: exact search answers in about {max(1, round(40 * n / 1e6))} ms per query "
                         f"(~40 ms per million rows), so no index is needed")
    float32 = 4 * n * dim
    if float32 <= IVF_MEMORY_SHARE * memory:
        return "ivf", (f"{n:,} rows: an IVF-Flat index needs a float32 copy of {float32 / gib:.1f} GiB, within a "
                       f"quarter of the {memory / gib:.1f} GiB available; it gives exact-quality recall at a few ms")
    return "ivfpq", (f"{n:,} rows: a float32 copy would need {float32 / gib:.1f} GiB of the {memory / gib:.1f} GiB "
                     f"available; the compressed OPQ + IVF-PQ index keeps ~72 bytes per vector on disk, "
                     f"memory-mapped, and re-ranks its candidates exactly")
