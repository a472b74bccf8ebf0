"""Where the engine is and what it can do: its interpreter, and a probe of it.

The engine is the ``hqrs-geo`` CLI of the ``hqrs_geo`` package, run as ``<interpreter> -m
hqrs_geo …`` in a Python environment of its own. The interpreter is the ``interpreter`` setting
when set; else the environment the plugin installs (:func:`default_engine_dir`) when it exists;
else QGIS's own Python. :func:`probe` asks an interpreter, in a child process, for the versions
of hqrs_geo and torch and the device the engine will use (``cuda: NVIDIA H100`` or ``cpu, 8
threads``); it takes seconds (torch imports), so the GUI calls it from a task.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import settings
from .runner import SET_UP_ENGINE, ChildProcess, EngineError

PROBE = r"""
import json, sys
out = {"python": sys.executable, "python_version": "%d.%d.%d" % sys.version_info[:3], "missing": []}
device = sys.argv[1] if len(sys.argv) > 1 else "auto"
try:
    import hqrs_geo
    out["hqrs_geo"] = hqrs_geo.__version__
except Exception as exc:
    out["missing"].append(["hqrs_geo", "%s: %s" % (type(exc).__name__, exc)])
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
except Exception as exc:
    out["missing"].append(["torch", "%s: %s" % (type(exc).__name__, exc)])
else:
    try:
        cuda = torch.cuda.is_available()
        count = torch.cuda.device_count() if cuda else 0
        mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        if device.startswith("cuda") and index >= count:
            out["device_problem"] = "device %s was chosen, but torch sees %d CUDA GPU(s)" % (device, count)
        elif cuda and (device == "auto" or device.startswith("cuda")):
            out["device"] = "cuda: " + torch.cuda.get_device_name(index)
        elif mps and device in ("auto", "mps"):
            out["device"] = "mps: Apple GPU"
        elif device == "mps":
            out["device_problem"] = "device mps was chosen, but torch sees no Apple GPU"
        if "device" not in out and "device_problem" not in out:
            out["device"] = "cpu, %d threads" % torch.get_num_threads()
    except Exception as exc:
        out["device_problem"] = "cannot use device %s: %s: %s" % (device, type(exc).__name__, exc)
try:
    import open_clip
    out["open_clip"] = open_clip.__version__
except Exception as exc:
    out["missing"].append(["open_clip", "%s: %s" % (type(exc).__name__, exc)])
print(json.dumps(out))
"""


def qgis_python() -> str:
    """QGIS's own Python (``sys.executable`` may be the qgis binary itself)."""
    exe = sys.executable or ""
    if os.path.basename(exe).lower().startswith("python"):
        return exe
    return shutil.which("python3") or shutil.which("python") or "python3"


ENGINE_DIR_ENV = "HQRS_GEO_ENGINE_DIR"


def default_engine_dir() -> Path:
    """Where the plugin installs the engine: ``$HQRS_GEO_ENGINE_DIR`` when set (e.g. an engine an
    administrator installed for everyone), else ``~/.local/share/hqrs_geo/engine`` on Linux (the
    per-user data folder on Windows and macOS), shared by every QGIS profile."""
    from qgis.PyQt.QtCore import QStandardPaths

    if os.environ.get(ENGINE_DIR_ENV):
        return Path(os.environ[ENGINE_DIR_ENV])
    base = QStandardPaths.writableLocation(QStandardPaths.GenericDataLocation) or str(Path.home() / ".local" / "share")
    return Path(base) / "hqrs_geo" / "engine"


def venv_python(venv: Path) -> Path:
    """The interpreter of a virtual environment."""
    venv = Path(venv)
    return venv / "Scripts" / "python.exe" if os.name == "nt" else venv / "bin" / "python"


def installed_engine() -> str | None:
    """The interpreter of the environment the plugin installed, when there is one."""
    python = venv_python(default_engine_dir())
    return str(python) if python.is_file() else None


def interpreter() -> str:
    """The engine's interpreter: the setting, else the installed engine, else QGIS's Python."""
    return str(settings.value("interpreter") or "") or installed_engine() or qgis_python()


@dataclass
class EngineInfo:
    """What :func:`probe` found; ``problem`` is None when the engine can run."""

    python: str
    hqrs_geo: str | None = None
    torch: str | None = None
    device: str | None = None
    python_version: str | None = None
    problem: EngineError | None = None
    raw: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when the engine can run."""
        return self.problem is None

    @property
    def summary(self) -> str:
        """``hqrs_geo 0.1.0, torch 2.14.1 on cuda: NVIDIA H100`` or the problem."""
        if self.problem is not None:
            return self.problem.text
        return f"hqrs_geo {self.hqrs_geo}, torch {self.torch} on {self.device}"


_cache: dict[tuple, EngineInfo] = {}
_cache_lock = threading.Lock()


def probe(python: str | None = None, device: str | None = None, timeout: float = 180.0,
          use_cache: bool = True) -> EngineInfo:
    """Ask ``python`` what it can do (blocking: seconds; call it from a task in the GUI).

    Successful probes are cached per (interpreter, device); failures never are, so installing
    the engine takes effect on the next call.
    """
    python = python or interpreter()
    device = device or str(settings.value("device"))
    cache_key = (python, device)
    with _cache_lock:
        if use_cache and cache_key in _cache:
            return _cache[cache_key]
    if not (os.path.isfile(python) or shutil.which(python)):
        return EngineInfo(python, problem=EngineError(f"the engine's Python {python} does not exist", "engine",
                                                      SET_UP_ENGINE))
    child = ChildProcess([python, "-c", PROBE, device])
    try:
        child.start()
        line = child.read_line(timeout=timeout)
    except EngineError as exc:
        return EngineInfo(python, problem=exc)
    except TimeoutError:
        child.kill()
        child.finish()
        return EngineInfo(python, problem=EngineError(f"{python} did not answer within {timeout:.0f} s", "engine",
                                                      SET_UP_ENGINE))
    child.finish()
    try:
        raw = json.loads(line or "")
    except json.JSONDecodeError:
        return EngineInfo(python, problem=child.error(python))
    info = EngineInfo(python, raw.get("hqrs_geo"), raw.get("torch"), raw.get("device"), raw.get("python_version"),
                      raw=raw)
    missing: list = raw.get("missing") or []
    if missing:
        names = ", ".join(name for name, _ in missing)
        info.problem = EngineError(f"the engine is not installed in {python} (missing: {names})", "engine",
                                   SET_UP_ENGINE)
    elif raw.get("device_problem"):
        info.problem = EngineError(raw["device_problem"], "user", "choose another device in HQRS settings")
    else:
        with _cache_lock:
            _cache[cache_key] = info
    return info


def forget(python: str | None = None) -> None:
    """Drop cached probes (of ``python``, or all)."""
    with _cache_lock:
        for cache_key in [k for k in _cache if python is None or k[0] == python]:
            del _cache[cache_key]


def cached(python: str | None = None, device: str | None = None) -> EngineInfo | None:
    """The cached successful probe, if any (never starts a process)."""
    with _cache_lock:
        return _cache.get((python or interpreter(), device or str(settings.value("device"))))


def _on_settings_changed(names: list) -> None:
    if "interpreter" in names or "device" in names:
        forget()


settings.notifier.changed.connect(_on_settings_changed)
