"""Finished model results kept while a long run is under way, so it can resume.

A SQLite file beside the layer (``<layer>.hqrs-partial.sqlite``) receives each batch in one
transaction. If the run is killed, what was committed is kept and skipped on re-run; when
the run completes, the results are written into the layer and the file is removed.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterable, Optional, Sequence


class ResultStore:
    """``(tile_id, field) -> value`` with one transaction per :meth:`put` call."""

    def __init__(self, layer: str | Path):
        self.path = Path(f"{layer}.hqrs-partial.sqlite")
        self._db: Optional[sqlite3.Connection] = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(self.path)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS results (tile_id TEXT, field TEXT, value, PRIMARY KEY (tile_id, field))"
            )
        return self._db

    def done(self, fields: Sequence[str]) -> dict[str, set[str]]:
        """Tile ids with a stored value, per field."""
        if not self.path.exists():
            return {f: set() for f in fields}
        out: dict[str, set[str]] = {f: set() for f in fields}
        for tile_id, field in self._conn().execute("SELECT tile_id, field FROM results"):
            if field in out:
                out[field].add(tile_id)
        return out

    def put(self, rows: Iterable[tuple[str, str, object]]) -> None:
        """Store ``(tile_id, field, value)`` rows atomically."""
        with self._conn() as db:
            db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?)", list(rows))

    def load(self, field: str) -> dict[str, object]:
        """All stored values of one field."""
        if not self.path.exists():
            return {}
        return dict(self._conn().execute("SELECT tile_id, value FROM results WHERE field = ?", (field,)))

    def close(self) -> None:
        """Close the connection (keeps the file)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def remove(self) -> None:
        """Delete the file once its results are in the layer."""
        self.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
