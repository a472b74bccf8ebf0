"""Long-lived ``hqrs-geo serve-search`` processes, shared by the dock and the Processing searches.

A search process loads a model once (seconds); every query after that answers in milliseconds.
One process serves every layer embedded by the same model: it is kept per (interpreter, model,
device, checkpoint), started on the first layer searched, and every other layer is opened in it
with ``{"op": "open", "layer": PATH}`` and searched with requests that carry ``"layer"`` (no model
reload per layer). A layer the process cannot serve (embedded by another model or with another
checkpoint, or an engine too old to take ``"layer"``) gets a process of its own.

:class:`SearchSession` is one layer's handle on its process (what callers hold: ``start``,
``request``, ``info``, ``stop``); :func:`get_session` gives the pooled handle of a
:class:`SessionKey`. Methods block: call them from a task or a Processing algorithm, never from
the GUI thread. Settings that change what a process does (interpreter, model, device,
checkpoint) close them all; the next query starts a new one.
"""
from __future__ import annotations

import atexit
import json
import os
import threading
import time
from dataclasses import dataclass

from . import settings
from .engine import interpreter
from .runner import ChildProcess, EngineError, humanize

STARTUP_TIMEOUT_S = 600.0  # a first model download can take minutes
REQUEST_TIMEOUT_S = 300.0
OPEN_TIMEOUT_S = 600.0  # opening a large dataset builds its vector caches


@dataclass(frozen=True)
class SessionKey:
    """What a layer is searched with: its file, the embeddings searched, and the process settings.

    ``model`` is the model that made the embeddings (a registry name; '' when the caller does not
    know it): layers of the same model share one process.
    """

    python: str
    layer: str
    embeddings: str = ""  # model name or key when the layer holds several; '' for the only one
    device: str = "cpu"
    checkpoint: str = ""
    model: str = ""

    @property
    def process_key(self) -> tuple:
        """The shared process this layer is searched in: (python, model, device, checkpoint)."""
        return (self.python, self.model, self.device, self.checkpoint)

    def argv(self) -> list:
        """The command line of a process started on this layer."""
        args = [self.python, "-m", "hqrs_geo", "serve-search", self.layer, "--device", self.device]
        if self.model or self.embeddings:
            args += [f"--model={self.model or self.embeddings}"]
        if self.checkpoint:
            args += [f"--checkpoint={self.checkpoint}"]
        return args


def same_path(a: str, b: str) -> bool:
    """True when two layer paths name the same file or folder."""
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _own_session_needed(message: str) -> bool:
    """An answer saying this process cannot serve another layer (another model, or an engine from
    before requests carried ``layer``)."""
    return "in its own session" in message or message.startswith("unknown key 'layer'")


class SearchProcess:
    """One ``serve-search`` process (JSON lines; thread-safe) and the layers opened in it."""

    def __init__(self, key: SessionKey):
        self.key = key  # the layer it was started on
        self.layers: dict[str, dict] = {}  # path -> its ready / opened message
        self.single = False  # True: serves only its first layer (old engine, or another model refused)
        self.loading = False
        self._child: ChildProcess | None = None
        self.lock = threading.RLock()
        self._next_id = 0
        self._closed = False

    @property
    def running(self) -> bool:
        """True while the process is up and its model loaded."""
        return self._child is not None and self._child.running and bool(self.layers)

    def has(self, layer: str) -> bool:
        """True when ``layer`` is open in the running process."""
        return self.running and any(same_path(layer, path) for path in self.layers)

    def info(self, layer: str) -> dict:
        """The ready / opened message of ``layer`` ({} when it is not open)."""
        for path, info in self.layers.items():
            if same_path(layer, path):
                return info
        return {}

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> dict:
        """Start the process on its first layer and wait until the model is loaded."""
        with self.lock:
            if self.running:
                return self.layers[self.key.layer]
            self._stop_child()
            self._closed = False
            self.loading = True
            try:
                self._child = ChildProcess(self.key.argv(), stdin=True).start()
                if self._closed:  # stopped while the process was being started
                    self._child.kill()
                ready = self._read(timeout)
            finally:
                self.loading = False
            self.layers = {self.key.layer: ready}
            return ready

    def open(self, layer: str) -> dict:
        """Open ``layer`` in the running process (no model load); EngineError when it cannot
        serve it (kind ``user``; :func:`_own_session_needed` tells when another process can)."""
        with self.lock:
            found = self.info(layer)
            if found and self.running:
                return found
            response = self.call({"op": "open", "layer": layer}, OPEN_TIMEOUT_S)
            if "error" in response:
                raise EngineError(str(response["error"]), "user")
            opened = dict(response.get("opened") or {})
            self.layers[layer] = opened
            return opened

    def call(self, payload: dict, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        """One request, its answer (an ``error`` answer is returned, not raised)."""
        with self.lock:
            child = self._child
            if child is None or not child.running:
                raise EngineError("the search session was stopped", "cancelled")
            self._next_id += 1
            child.send({"id": self._next_id, **payload})
            return self._read(timeout)

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
            self._child, self.layers = None, {}
            if cancelled:
                raise EngineError("the search session was stopped", "cancelled")
            raise child.error(self.key.python)
        return json.loads(line)

    def kill(self) -> None:
        """Stop the process now (from any thread): a start or request waiting on it raises
        EngineError of kind ``cancelled``."""
        self._closed = True
        child = self._child
        if child is not None:
            child.kill()

    def _stop_child(self) -> None:
        child, self._child, self.layers = self._child, None, {}
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
        with self.lock:
            self._stop_child()


class SearchSession:
    """One layer's handle on the search process that serves it (what the dock and the Processing
    searches hold). ``info`` is the layer's ready message: layer, model, tiles, crs, kind,
    embeddings (+ parts, score_scale)."""

    def __init__(self, key: SessionKey):
        self.key = key
        self.info: dict = {}
        self.process: SearchProcess | None = None
        self.opened_seconds: float | None = None  # how long opening it in a running process took

    @property
    def running(self) -> bool:
        """True while the layer is open in a running process (a query answers at once)."""
        process = self.process
        return process is not None and process.has(self.key.layer)

    @property
    def model_loaded(self) -> bool:
        """True when a process that can serve this layer already has its model loaded (the first
        query opens the layer only: no model load)."""
        process = self.process or _find_process(self.key)
        return process is not None and process.running and (process.has(self.key.layer) or not process.single)

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> dict:
        """Make sure the layer is open in a running process; returns its ready message. Starts a
        process (the model loads: seconds) only when no process of this model runs."""
        for _attempt in range(2):
            process = self.process
            if process is None or not (process.running or process.single and same_path(process.key.layer,
                                                                                         self.key.layer)):
                process = self.process = _process_for(self.key)
            with process.lock:
                if not process.running:
                    if not same_path(process.key.layer, self.key.layer):  # a dead shared process: restart here
                        process = self.process = _replace_process(self.key)
                    self.info = process.start(timeout)
                    _register(process)
                    return self.info
                started = time.perf_counter()
                try:
                    self.info = process.open(self.key.layer)
                except EngineError as exc:
                    if not _own_session_needed(str(exc)):
                        raise EngineError(humanize(str(exc)), exc.kind) from None
                    if str(exc).startswith("unknown key"):
                        process.single = True  # an engine without "layer": one process per layer
                    self.process = _own_process(self.key)
                    continue
                self.opened_seconds = time.perf_counter() - started
                return self.info
        process = self.process
        assert process is not None
        with process.lock:
            self.info = process.start(timeout)
            return self.info

    def request(self, payload: dict, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        """Send one request about this layer; returns ``{"results": [...], "seconds": …}``; raises
        EngineError for an error answer (kind ``user``) or a process that ended."""
        self.start()
        process = self.process
        if process is None:  # closed from another thread since
            raise EngineError("the search session was stopped", "cancelled")
        with process.lock:
            if not process.has(self.key.layer):
                self.start()
                process = self.process
                assert process is not None
            if not same_path(process.key.layer, self.key.layer):
                payload = {**payload, "layer": self.key.layer}
            response = process.call(payload, timeout)
        if "error" in response:
            raise EngineError(humanize(str(response["error"])), "user")
        return response

    def stop(self) -> None:
        """Cancel (from any thread): a process still loading its model for this layer is stopped
        (its start raises EngineError of kind ``cancelled``); a process that already serves
        layers keeps running (a query takes milliseconds; the caller's task drops its answer)."""
        process = self.process or _find_process(self.key)
        if process is not None and process.loading:
            process.kill()

    def close(self) -> None:
        """Close this layer (``{"op": "close"}``) in a shared process, or stop a process of its own."""
        process, self.process, self.info = self.process, None, {}
        if process is None:
            return
        if same_path(process.key.layer, self.key.layer):
            _forget_process(process)
            process.close()
        elif process.has(self.key.layer):
            try:
                process.call({"op": "close", "layer": self.key.layer}, 30)
            except EngineError:
                pass
            process.layers = {p: i for p, i in process.layers.items() if not same_path(p, self.key.layer)}


_handles: dict[SessionKey, SearchSession] = {}
_processes: dict[tuple, SearchProcess] = {}  # shared ones by process_key; own ones by (process_key, layer)
_pool_lock = threading.Lock()


def session_key(layer: str, embeddings: str = "", python: str | None = None, model: str = "") -> SessionKey:
    """The key of the session for ``layer`` with the current settings.

    The checkpoint setting applies when ``model`` (the model that made the embeddings) is the
    settings' embedding model: it is where that model's weights now are.
    """
    checkpoint = str(settings.value("checkpoint") or "")
    if checkpoint and model and model.split(":")[0] != settings.value("model"):
        checkpoint = ""
    device = str(settings.value("device") or "auto")
    return SessionKey(python or interpreter(), str(layer), embeddings or "", device, checkpoint, model or "")


def get_session(key: SessionKey) -> SearchSession:
    """The pooled handle of ``key`` (created, not started)."""
    with _pool_lock:
        session = _handles.get(key)
        if session is None:
            session = _handles[key] = SearchSession(key)
        return session


def _find_process(key: SessionKey) -> SearchProcess | None:
    """A running process that serves ``key``'s layer, or can open it (same model and settings)."""
    with _pool_lock:
        own = _processes.get((key.process_key, key.layer))
        if own is not None and own.running:
            return own
        for process in _processes.values():  # the layer already open somewhere (a caller without model)
            if process.has(key.layer) and process.key.process_key[0] == key.python and \
                    process.key.process_key[2:] == key.process_key[2:] and \
                    (not key.model or key.model in (process.key.model, process.info(key.layer).get("model"))) and \
                    (not key.embeddings or process.key.embeddings in ("", key.embeddings)
                     or process.key.model == key.embeddings):
                return process
        if key.model:
            shared = _processes.get(key.process_key)
            if shared is not None and shared.running and not shared.single:
                return shared
        return None


def _process_for(key: SessionKey) -> SearchProcess:
    """The process that serves ``key``: a running one that can (:func:`_find_process`), else the
    shared process of its model (created, started on this layer), else one of its own."""
    found = _find_process(key)
    if found is not None:
        return found
    with _pool_lock:
        if key.model:
            shared = _processes.get(key.process_key)
            if shared is None or (not shared.running and not shared.loading):
                shared = _processes[key.process_key] = SearchProcess(key)
            if not shared.single:
                return shared
        own = _processes.get((key.process_key, key.layer))
        if own is None:
            own = _processes[(key.process_key, key.layer)] = SearchProcess(key)
        return own


def _replace_process(key: SessionKey) -> SearchProcess:
    """A new process started on ``key``'s layer, in the place of a dead one."""
    with _pool_lock:
        process = SearchProcess(key)
        _processes[key.process_key if key.model else (key.process_key, key.layer)] = process
        return process


def _own_process(key: SessionKey) -> SearchProcess:
    """A process for ``key``'s layer alone (its model differs from the shared process's)."""
    with _pool_lock:
        own = _processes.get((key.process_key, key.layer))
        if own is None or not same_path(own.key.layer, key.layer):
            own = _processes[(key.process_key, key.layer)] = SearchProcess(key)
        own.single = True
        return own


def _register(process: SearchProcess) -> None:
    """A process started without knowing its model: also the shared process of the model its ready
    message names, when that model has none running."""
    model = str(process.info(process.key.layer).get("model") or "")
    if process.key.model or not model or process.single:
        return
    key = process.key
    shared_key = (key.python, model, key.device, key.checkpoint)
    with _pool_lock:
        current = _processes.get(shared_key)
        if current is None or not (current.running or current.loading):
            _processes[shared_key] = process


def _forget_process(process: SearchProcess) -> None:
    with _pool_lock:
        for name in [name for name, found in _processes.items() if found is process]:
            del _processes[name]


def running_sessions() -> list:
    """Keys of the layers open in a running process."""
    with _pool_lock:
        handles = list(_handles.items())
    return [key for key, session in handles if session.running]


def running_processes() -> list:
    """The running search processes (each serves one model's layers)."""
    with _pool_lock:
        return list({id(p): p for p in _processes.values() if p.running}.values())


def close_all() -> None:
    """Stop every search process (settings changed, plugin unload, QGIS exit)."""
    with _pool_lock:
        processes = list({id(p): p for p in _processes.values()}.values())
        _processes.clear()
        handles = list(_handles.values())
        _handles.clear()
    for handle in handles:
        handle.process, handle.info = None, {}
    for process in processes:
        process.kill()
        process.close()


def _on_settings_changed(names: list) -> None:
    if set(names) & set(settings.SESSION_SETTINGS):
        close_all()


settings.notifier.changed.connect(_on_settings_changed)
atexit.register(close_all)
