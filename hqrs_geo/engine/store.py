"""The resume store: finished results of a long job, kept in SQLite beside its output.

A job that runs models over many tiles commits what it finishes here as it goes (WAL journal,
one transaction per batch or answer, without an fsync each: ``synchronous=NORMAL``), so a killed
or cancelled job loses at most the work in flight (a power cut, at most the last commits), and
running the same command again skips what is stored. Two kinds of records:

* model results (table ``results``): ``(tile_id, field) -> value`` for the model engine
  (``<layer>.hqrs-partial.sqlite``; the file is removed once the results are in the layer);
* model calls (table ``calls``): ``key -> text`` with provenance (tile, stage, source, prompt,
  back end) for the MpGI pipeline (``<output>.hqrs-mpgi.sqlite``, kept as a call cache).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..atomic import failure_code, output_error
from ..errors import OutputError
from ..redact import redact

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (tile_id TEXT, field TEXT, value, PRIMARY KEY (tile_id, field));
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


def partial_path(layer: str | Path) -> Path:
    """``<layer>.hqrs-partial.sqlite``: the model engine's store beside a layer."""
    return Path(f"{layer}.hqrs-partial.sqlite")


def call_cache_path(output: str | Path) -> Path:
    """``<output>.hqrs-mpgi.sqlite``: the MpGI call cache beside the output layer."""
    return Path(f"{output}.hqrs-mpgi.sqlite")


def call_key(tile_id: str, stage: str, source: str, prompt: str, backend: str, extra: str = "") -> str:
    """The key of one model call (``extra``: a digest of other inputs, e.g. the image)."""
    blob = json.dumps([tile_id, stage, source, prompt, backend, extra], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResumeStore:
    """A SQLite file of finished results; opened lazily, committed per :meth:`put` / :meth:`put_call`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self.hits = 0  # calls answered by get_call
        self.misses = 0

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            with self._writing():
                self._db = sqlite3.connect(self.path, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                # no fsync per commit (WAL syncs at checkpoints): a killed process still loses nothing
                # committed, a power cut at most the last commits; half the cost of a batch's commit
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(SCHEMA)
                self._db.commit()
        return self._db

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """SQLite failures (full disk, read-only folder, a damaged file) as one-line errors."""
        try:
            yield
        except sqlite3.Error as exc:
            if self._db is not None and "unable to open" in str(exc).lower():
                self.close()
            text = str(exc).lower()
            if "unable to open" in text or "not a database" in text or "malformed" in text:
                raise OutputError(f"{self.path}: cannot use this results store ({exc}); check the folder's "
                                  "permissions, or remove the file to start over") from None
            raise output_error(self.path, exc, failure_code(exc, self.path.parent)) from None

    # -- model results -------------------------------------------------------------------------
    def done(self, fields: Sequence[str]) -> dict[str, set[str]]:
        """Tile ids with a stored value, per field."""
        out: dict[str, set[str]] = {f: set() for f in fields}
        if not self.path.exists():
            return out
        with self._writing():
            rows = list(self._conn().execute("SELECT tile_id, field FROM results"))
        for tile_id, field in rows:
            if field in out:
                out[field].add(tile_id)
        return out

    def put(self, rows: Iterable[tuple[str, str, object]]) -> None:
        """Store ``(tile_id, field, value)`` rows in one transaction."""
        rows = list(rows)
        with self._writing(), self._conn() as db:
            db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", rows)

    def load(self, field: str) -> dict[str, object]:
        """All stored values of one field."""
        if not self.path.exists():
            return {}
        with self._writing():
            return dict(self._conn().execute("SELECT tile_id, value FROM results WHERE field = ?", (field,)))

    # -- model calls ---------------------------------------------------------------------------
    def get_call(self, key: str) -> str | None:
        """The stored answer of call ``key``, or None (counts hits and misses)."""
        with self._writing():
            row = self._conn().execute("SELECT text FROM calls WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return str(row[0])

    def put_call(self, key: str, tile_id: str, stage: str, source: str, prompt: str, backend: str,
                 text: str) -> None:
        """Store one answer with its provenance and commit it (secrets masked, see :mod:`hqrs_geo.redact`)."""
        with self._writing(), self._conn() as db:
            db.execute("INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (key, tile_id, stage, redact(source), redact(prompt), redact(backend), redact(text),
                        time.time()))

    def count_calls(self) -> int:
        """Number of stored answers."""
        return int(self._conn().execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    # -- the file ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (keeps the file)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def remove(self) -> None:
        """Delete the file (and its journal) once its results are in the output."""
        self.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
