"""A long-lived ``hqrs-geo serve-search`` child process for the dock: the layer, embedding
matrix and model are loaded once, so queries after the first answer in milliseconds."""
from __future__ import annotations

import json
import queue
import subprocess
import threading
from typing import Optional

from .engine import interpreter


class SearchClientError(Exception):
    """The search process could not start or answer; the message is one line."""


class SearchClient:
    """JSON-lines requests to one search session process (started on first use)."""

    def __init__(self, layer_path: str, python: Optional[str] = None, startup_timeout: float = 120.0):
        self.layer_path = layer_path
        self.python = python or interpreter()
        self.startup_timeout = startup_timeout
        self._child: Optional[subprocess.Popen] = None
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._stderr: list = []
        self._next_id = 0
        self.info: dict = {}

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._child is not None and self._child.poll() is None

    def start(self) -> dict:
        """Start the session process and wait until it is ready; returns its ready message."""
        if self.running:
            return self.info
        try:
            self._child = subprocess.Popen(
                [self.python, "-m", "hqrs_geo", "serve-search", self.layer_path],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            )
        except OSError as exc:
            raise SearchClientError(f"cannot start {self.python}: {exc}") from None
        self._lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self._child.stderr), daemon=True).start()
        self.info = self._read(self.startup_timeout)
        return self.info

    def _pump(self) -> None:
        for line in self._child.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _read(self, timeout: float) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise SearchClientError(f"the search process did not answer within {timeout:.0f} s") from None
        if line is None:
            self._child.wait(timeout=5)
            errors = [l.strip() for l in self._stderr if l.startswith("hqrs-geo: error:")]
            raise SearchClientError(errors[-1][len("hqrs-geo: error: "):] if errors else "the search process ended")
        return json.loads(line)

    def request(self, payload: dict, timeout: float = 60.0) -> dict:
        """Send one request and return its response (``{"results": [...]}`` or ``{"error": ...}``)."""
        self.start()
        self._next_id += 1
        payload = {"id": self._next_id, **payload}
        self._child.stdin.write(json.dumps(payload) + "\n")
        self._child.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        """Stop the process (politely, then by force)."""
        if self._child is None:
            return
        if self._child.poll() is None:
            try:
                self._child.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self._child.stdin.flush()
                self._child.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self._child.kill()
                self._child.wait(timeout=5)
        self._child = None
