"""Progress reporting for long jobs: a terminal bar, JSON lines for programs, or nothing.

``--progress json`` prints one JSON object per line on stdout:
``{"stage": "tile", "done": 40, "total": 120, "message": ""}``; a final object has
``"stage": "done"`` and a failure ``"stage": "error"`` with the one-line message.
"""
from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from tqdm import tqdm

MODES = ("auto", "bar", "json", "none")


class Progress:
    """Counts work done in named stages and reports it in the chosen mode."""

    def __init__(self, mode: str = "auto", stream: TextIO | None = None, interval: float = 0.25):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "none"
        self.mode = mode
        self.stream = stream
        self.interval = interval
        self.stage = ""
        self.done = 0
        self.total: int | None = None
        self._bar = None
        self._last = 0.0

    def _out(self) -> TextIO:
        return self.stream or sys.stdout

    def emit(self, stage: str, message: str = "", **extra) -> None:
        """Write one JSON progress object (json mode only)."""
        if self.mode == "json":
            record = {"stage": stage, "done": self.done, "total": self.total, "message": message, **extra}
            self._out().write(json.dumps(record) + "\n")
            self._out().flush()

    def start(self, stage: str, total: int | None, message: str = "", unit: str = "tile", initial: int = 0) -> None:
        """Begin a stage of ``total`` steps (``None`` when unknown), ``initial`` of them already done."""
        self.close_bar()
        self.stage, self.total, self.done = stage, total, initial
        if self.mode == "bar":
            self._bar = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, dynamic_ncols=True, initial=initial,
                             disable=False)  # $TQDM_DISABLE (set by the CLI) silences library bars only
        self.emit(stage, message)
        self._last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        """Record ``n`` more steps done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "json":
            now = time.monotonic()
            if now - self._last >= self.interval or (self.total is not None and self.done >= self.total):
                self._last = now
                self.emit(self.stage)

    def postfix(self, **values) -> None:
        """Show running values (e.g. the loss) beside the bar, or in the JSON objects."""
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)
        elif self.mode == "json":
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self.emit(self.stage, **values)

    def message(self, text: str) -> None:
        """A human message: printed to stderr (bar mode) or as a JSON object."""
        if self.mode == "json":
            self.emit(self.stage or "info", text)
        elif self.mode == "bar":
            (self._bar.write if self._bar else lambda t: print(t, file=sys.stderr))(text)

    def close_bar(self) -> None:
        """Finish the current terminal bar, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def finish(self, message: str = "", **extra) -> None:
        """End the job successfully."""
        self.close_bar()
        self.emit("done", message, **extra)

    def fail(self, message: str, **extra) -> None:
        """End the job with a one-line error (json mode reports it as an object too, with
        ``extra`` fields such as the ``option`` at fault)."""
        self.close_bar()
        self.emit("error", message, **{k: v for k, v in extra.items() if v is not None})
