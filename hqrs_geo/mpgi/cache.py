"""The call cache of the MpGI pipeline: every model answer, in SQLite next to the output.

A call is keyed by (tile, stage, source, prompt, back end identity, model, input digest), so a
re-run answers finished calls from the cache and a killed run loses at most the calls that
were in flight. Each answer is committed as soon as it arrives (WAL journal, safe against a
kill). The same rows are the provenance written to the ``mpgi_sources`` side table.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Iterable, Optional

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    tile_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    source TEXT NOT NULL,
    prompt TEXT NOT NULL,
    backend TEXT NOT NULL,
    text TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_tile ON calls (tile_id);
"""


def cache_path(output: str) -> Path:
    """``<output>.hqrs-mpgi.sqlite`` beside the output layer."""
    return Path(f"{output}.hqrs-mpgi.sqlite")


def call_key(tile_id: str, stage: str, source: str, prompt: str, backend: str, extra: str = "") -> str:
    """The cache key of one model call (``extra``: a digest of other inputs, e.g. the image)."""
    blob = json.dumps([tile_id, stage, source, prompt, backend, extra], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class CallCache:
    """SQLite store of model answers (``get``/``put``), committed per answer."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self.db.commit()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Optional[str]:
        """The cached answer for ``key``, or None (counts hits and misses)."""
        row = self.db.execute("SELECT text FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return row[0]

    def put(self, key: str, tile_id: str, stage: str, source: str, prompt: str, backend: str, text: str) -> None:
        """Store one answer and commit it."""
        self.db.execute("INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (key, tile_id, stage, source, prompt, backend, text, time.time()))
        self.db.commit()

    def count(self) -> int:
        """Number of stored answers."""
        return int(self.db.execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    def rows(self, keys: Iterable[str]) -> list[dict]:
        """The stored rows for ``keys`` (for the provenance table), in the given order."""
        out = []
        for key in keys:
            row = self.db.execute("SELECT tile_id, stage, source, prompt, backend, text FROM calls WHERE key = ?",
                                  (key,)).fetchone()
            if row is not None:
                out.append(dict(zip(("tile_id", "stage", "source", "prompt", "backend", "text"), row)))
        return out

    def close(self) -> None:
        """Close the database."""
        self.db.close()
