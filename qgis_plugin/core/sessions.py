"""Long-lived ``hqrs-geo serve-search`` processes, shared by the dock and the Processing searches.

A session loads the layer, its embedding matrix and the model once (seconds); every query after
that answers in milliseconds. Sessions are kept in one pool keyed by (interpreter, layer file,
embeddings, device, checkpoint), so a Processing search on a layer the dock already searched (or
the other way round) reuses the running process. Methods block: call them from a task or a
Processing algorithm, never from the GUI thread. Settings that change what a session does
(interpreter, device, checkpoint) close the pool; the next query starts a new session.
"""
from __future__ import annotations

import atexit
import json
import threading
from dataclasses import dataclass

from . import settings
from .runner import ChildProcess, EngineError

STARTUP_TIMEOUT_S = 600.0  # a first model download can take minutes
REQUEST_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class SessionKey:
    """What a session process was started with."""

    python: str
    layer: str
    embeddings: str = ""  # model name or key when the layer holds several; '' for the only one
    device: str = "cpu"
    checkpoint: str = ""

    def argv(self) -> list:
        """The command line of the session process."""
        args = [self.python, "-m", "hqrs_geo", "serve-search", self.layer, "--device", self.device]
        if self.embeddings:
            args += [f"--model={self.embeddings}"]
        if self.checkpoint:
            args += [f"--checkpoint={self.checkpoint}"]
        return args


class SearchSession:
    """JSON-lines requests to one ``serve-search`` process (started on first use, thread-safe)."""

    def __init__(self, key: SessionKey):
        self.key = key
        self.info: dict = {}
        self._child: ChildProcess | None = None
        self._lock = threading.RLock()
        self._next_id = 0
        self._closed = False

    @property
    def running(self) -> bool:
        """True while the process is up and ready."""
        return self._child is not None and self._child.running and bool(self.info)

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> dict:
        """Start the process and wait until the model is loaded; returns its ready message."""
        with self._lock:
            if self.running:
                return self.info
            self._stop_child()
            self._closed = False
            self._child = ChildProcess(self.key.argv(), stdin=True).start()
            self.info = self._read(timeout)
            return self.info

    def _read(self, timeout: float) -> dict:
        child = self._child
        if child is None:
            raise EngineError("the search session was stopped", "cancelled")
        try:
            line = child.read_line(timeout=timeout)
        except TimeoutError:
            self._stop_child()
            raise EngineError(f"the search process did not answer within {timeout:.0f} s", "internal") from None
        if line is None:  # the process ended: its stderr says why
            cancelled = self._closed
            child.finish(timeout=5)
            self._child, self.info = None, {}
            if cancelled:
                raise EngineError("the search session was stopped", "cancelled")
            raise child.error(self.key.python)
        return json.loads(line)

    def request(self, payload: dict, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        """Send one request; returns ``{"results": [...], "seconds": …}``; raises EngineError for
        an error answer (kind ``user``) or a process that ended."""
        with self._lock:
            self.start()
            child = self._child
            if child is None:  # closed from another thread since
                raise EngineError("the search session was stopped", "cancelled")
            self._next_id += 1
            child.send({"id": self._next_id, **payload})
            response = self._read(timeout)
        if "error" in response:
            from .runner import humanize

            raise EngineError(humanize(str(response["error"])), "user")
        return response

    def stop(self) -> None:
        """Stop the process now (from any thread): a start or request in progress raises
        EngineError of kind ``cancelled``."""
        self._closed = True
        child = self._child
        if child is not None:
            child.kill()

    def _stop_child(self) -> None:
        child, self._child, self.info = self._child, None, {}
        if child is None:
            return
        if child.running:
            try:
                child.send({"op": "quit"})
            except EngineError:
                pass
        child.finish(timeout=5)

    def close(self) -> None:
        """Stop the process politely (``quit``), then by force."""
        self._closed = True
        with self._lock:
            self._stop_child()


_pool: dict[SessionKey, SearchSession] = {}
_pool_lock = threading.Lock()


def session_key(layer: str, embeddings: str = "", python: str | None = None, model: str = "") -> SessionKey:
    """The key of the session for ``layer`` with the current settings.

    The checkpoint setting applies when ``model`` (the model that made the embeddings) is the
    settings' embedding model: it is where that model's weights now are.
    """
    from .engine import interpreter

    checkpoint = str(settings.value("checkpoint") or "")
    if checkpoint and model and model.split(":")[0] != settings.value("model"):
        checkpoint = ""
    device = str(settings.value("device") or "auto")
    return SessionKey(python or interpreter(), str(layer), embeddings or "", device, checkpoint)


def get_session(key: SessionKey) -> SearchSession:
    """The pooled session for ``key`` (created, not started)."""
    with _pool_lock:
        session = _pool.get(key)
        if session is None:
            session = _pool[key] = SearchSession(key)
        return session


def running_sessions() -> list:
    """Keys of the sessions whose process is up."""
    with _pool_lock:
        return [key for key, session in _pool.items() if session.running]


def close_all() -> None:
    """Stop every session process (settings changed, plugin unload, QGIS exit)."""
    with _pool_lock:
        sessions = list(_pool.values())
        _pool.clear()
    for session in sessions:
        session.stop()
        session.close()


def _on_settings_changed(names: list) -> None:
    if set(names) & set(settings.SESSION_SETTINGS):
        close_all()


settings.notifier.changed.connect(_on_settings_changed)
atexit.register(close_all)
