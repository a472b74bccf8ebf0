"""Counts of the archive fault suite (partitioned datasets, IVF-PQ indexes, catalog and HTTP
inputs, MpGI back ends, the Ray engine), printed at the end of a run by ``conftest.py``.

Each fault test calls :func:`record` once per case with what happened, e.g.
``record(clean=1)`` for a clean one-line error, ``record(credentials_stored=1)`` when a secret
reached a file or an output line (the test then fails). Targets: every key after ``clean`` is 0
except ``recovered`` and ``node_losses_survived``.
"""
from __future__ import annotations

REPORT: dict[str, int] = {
    "tried": 0,                 # cases tried
    "clean": 0,                 # ended as a clean one-line error or a stated warning
    "recovered": 0,             # a fault recovered: re-run/repair/fallback gave the right result
    "node_losses_survived": 0,  # Ray: a node killed mid-job, the job still finished right
    "internal": 0,              # tracebacks / internal errors (target 0)
    "crashes": 0,               # signals such as SIGBUS, hard exits without a message (target 0)
    "data_lost": 0,             # rows lost or overwritten, silently wrong results (target 0)
    "credentials_stored": 0,    # a secret written to a file or printed (target 0)
    "past_deadline": 0,         # waits that ran past their stated deadline (target 0)
}


def record(**counts: int) -> None:
    """Count one case: ``tried`` goes up by one, plus each named count."""
    REPORT["tried"] += 1
    for key, value in counts.items():
        if key not in REPORT or key == "tried":
            raise KeyError(f"unknown archive fault count {key!r}")
        REPORT[key] += value
