"""Running the hqrs-geo engine out of process, so torch/CUDA failures or clashing numpy/GDAL
builds can never take QGIS down.

The engine is the ``hqrs-geo`` CLI run as ``<interpreter> -m hqrs_geo … --progress json`` in
a Python environment the user configures (setting ``hqrs_geo/interpreter``; default: this
process's Python when hqrs_geo imports there). Progress comes back as JSON lines; cancelling
sends SIGTERM, on which the CLI stops cleanly (exit 130), leaving outputs valid and resumable.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

SETTINGS_GROUP = "hqrs_geo"
KILL_GRACE_S = 15.0  # after SIGTERM, a child still running this long is killed
INSTALL_HINT = "{python} -m pip install 'hqrs_geo[all]'"


def setting(name: str, default=None):
    """A plugin setting from QgsSettings (``hqrs_geo/<name>``)."""
    from qgis.core import QgsSettings

    return QgsSettings().value(f"{SETTINGS_GROUP}/{name}", default)


def set_setting(name: str, value) -> None:
    """Store a plugin setting in QgsSettings."""
    from qgis.core import QgsSettings

    QgsSettings().setValue(f"{SETTINGS_GROUP}/{name}", value)


def default_interpreter() -> str:
    """This process's Python (QGIS embeds one; ``sys.executable`` may be the qgis binary)."""
    exe = sys.executable or ""
    if os.path.basename(exe).startswith("python"):
        return exe
    return shutil.which("python3") or "python3"


def interpreter() -> str:
    """The configured interpreter, or the default one."""
    return str(setting("interpreter", "") or "") or default_interpreter()


def engine_problem(python: Optional[str] = None, timeout: float = 60) -> Optional[str]:
    """None when ``python`` can run the engine; else one line saying what to install, exactly."""
    python = python or interpreter()
    hint = INSTALL_HINT.format(python=python)
    if not (os.path.isfile(python) or shutil.which(python)):
        return f"HQRS: Python interpreter {python} not found; set it in the HQRS settings"
    probe = "import hqrs_geo, torch, open_clip; print(hqrs_geo.__version__)"
    try:
        result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"HQRS: cannot run {python} ({exc}); set another interpreter in the HQRS settings"
    if result.returncode != 0:
        missing = "hqrs_geo"
        for name in ("torch", "open_clip"):
            if f"No module named '{name}" in result.stderr:
                missing = name
        return f"HQRS: the engine needs {missing} in {python}; install it with: {hint}"
    return None


@dataclass
class CliResult:
    """How a CLI run ended."""

    returncode: int
    error: Optional[str] = None
    final: dict = field(default_factory=dict)
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        """True when the command succeeded."""
        return self.returncode == 0


def cli_command(args: List[str], python: Optional[str] = None) -> List[str]:
    """The full command line for ``hqrs-geo ARGS`` with JSON progress."""
    return [python or interpreter(), "-m", "hqrs_geo", *map(str, args), "--progress", "json"]


def run_cli(
    args: List[str],
    on_progress: Optional[Callable[[float, str], None]] = None,
    is_cancelled: Optional[Callable[[], bool]] = None,
    python: Optional[str] = None,
) -> CliResult:
    """Run the CLI to completion, reporting progress (0..100, message) and polling for cancel."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        child = subprocess.Popen(cli_command(args, python), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env)
    except OSError as exc:
        return CliResult(returncode=127, error=f"cannot start {python or interpreter()}: {exc}")
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def pump() -> None:
        for line in child.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    errors: List[str] = []
    drain = threading.Thread(target=lambda: errors.extend(child.stderr), daemon=True)
    drain.start()
    final: dict = {}
    cancelled = False
    kill_at = None
    while True:
        if is_cancelled is not None and is_cancelled() and not cancelled:
            cancelled = True
            child.terminate()  # SIGTERM: the CLI cancels cleanly
            kill_at = time.monotonic() + KILL_GRACE_S
        if kill_at is not None and time.monotonic() > kill_at and child.poll() is None:
            child.kill()  # stuck in a long C call: outputs are still safe (atomic writes)
            kill_at = None
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if line is None:
            break
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(event, dict):  # e.g. a JSON list printed by --json, not a progress event
            continue
        final = event if event.get("stage") in ("done", "error") else final
        total, done = event.get("total"), event.get("done") or 0
        if on_progress is not None:
            percent = 100.0 * done / total if total else 0.0
            on_progress(percent, f"{event.get('stage', '')}: {event.get('message', '')}".strip(": "))
    child.wait()
    drain.join(timeout=5)
    child.stdout.close()
    child.stderr.close()
    error_lines = [l.strip() for l in errors if l.startswith("hqrs-geo: error:")]
    error = error_lines[-1][len("hqrs-geo: error: "):] if error_lines else None
    if child.returncode != 0 and error is None:
        tail = [l.strip() for l in errors if l.strip()]
        error = tail[-1] if tail else f"hqrs-geo exited with status {child.returncode}"
    return CliResult(returncode=child.returncode, error=error, final=final, cancelled=cancelled)
