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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qgis.PyQt.QtCore import QStandardPaths

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
        mps = (sys.platform == "darwin" and getattr(torch.backends, "mps", None) is not None
               and torch.backends.mps.is_available())
        names = {"cpu": "%d threads" % torch.get_num_threads()}
        for i in range(count):
            names["cuda" if i == 0 else "cuda:%d" % i] = torch.cuda.get_device_name(i)
        if mps:
            names["mps"] = "Apple GPU"
        out["devices"] = list(names)
        out["device_names"] = names
        instead = "auto or cpu" if not (count or mps) else ", ".join(["auto"] + list(names))
        index = int(device.split(":")[1]) if device.startswith("cuda:") and device[5:].isdigit() else 0
        if device.startswith("cuda") and index >= count:
            seen = "no CUDA GPU" if count == 0 else "%d CUDA GPU(s)" % count
            out["device_problem"] = "device %s was chosen, but torch sees %s here" % (device, seen)
            out["device_instead"] = instead
        elif cuda and (device == "auto" or device.startswith("cuda")):
            out["device"] = "cuda: " + torch.cuda.get_device_name(index)
        elif mps and device in ("auto", "mps"):
            out["device"] = "mps: Apple GPU"
        elif device == "mps":
            out["device_problem"] = "device mps was chosen, but torch sees no Apple GPU (MPS) here"
            out["device_instead"] = instead
        elif device not in ("auto", "cpu"):
            out["device_problem"] = "%s is not a device the engine knows" % device
            out["device_instead"] = instead
        if "device" not in out and "device_problem" not in out:
            out["device"] = "cpu, %d threads" % torch.get_num_threads()
    except Exception as exc:
        out["device_problem"] = "cannot use device %s: %s: %s" % (device, type(exc).__name__, exc)
        out["device_instead"] = "cpu"
try:
    import open_clip
    out["open_clip"] = open_clip.__version__
except Exception as exc:
    out["missing"].append(["open_clip", "%s: %s" % (type(exc).__name__, exc)])
print(json.dumps(out))
"""


REPAIR_ENGINE = ("repair it with Raster ▸ HQRS ▸ Set up engine… ▸ Install engine (it reinstalls torch and torchvision "
                 "with the project's pinned pair), or choose the Python of a working engine in HQRS settings")

# The engine self-test, run in the engine's own Python after an installation: each check in turn,
# a JSON line before each (so a crash names the check it happened in), one result line at the end.
SELF_TEST_CHECKS = ("torch", "torchvision", "open_clip", "hqrs_geo", "model", "embed")
SELF_TEST_MODEL = "hqrs-mini-clip"  # the demo model shipped inside the wheel: nothing is downloaded
SELF_TEST = r"""
import json, sys, time, traceback
checks, model_name = sys.argv[1].split(","), sys.argv[2]
state = {}

def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

def check_torch():
    import torch
    state["torch"] = torch
    return "torch %s" % torch.__version__

def check_torchvision():
    import torch, torchvision
    from torchvision.ops import nms
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    kept = [int(i) for i in nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)]
    if kept != [0, 2]:
        raise AssertionError("torchvision.ops.nms kept boxes %s of a case whose answer is [0, 2]" % kept)
    return "torchvision %s (ops.nms)" % torchvision.__version__

def check_open_clip():
    import open_clip
    return "open_clip %s" % open_clip.__version__

def check_hqrs_geo():
    import hqrs_geo
    return "hqrs_geo %s" % hqrs_geo.__version__

def check_model():
    from hqrs_geo.models.loader import load_model
    state["model"] = load_model(model_name, device="cpu", download=False)
    return "%s loaded on cpu" % model_name

def check_embed():
    import torch
    from hqrs_geo.models.encode import image_batch_vectors
    model = state.get("model")
    if model is None:
        from hqrs_geo.models.loader import load_model
        model = load_model(model_name, device="cpu", download=False)
    tile = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    vector = image_batch_vectors(model, tile)
    norm = float((vector.astype("float64") ** 2).sum()) ** 0.5
    if vector.shape[0] != 1 or abs(norm - 1.0) > 1e-3:
        raise AssertionError("the embedding of a random tile has shape %s and norm %.4f (expected 1 row of norm 1)"
                             % (tuple(vector.shape), norm))
    return "one 64x64 tile embedded: %d dimensions" % vector.shape[1]

versions = {}
try:
    from importlib import metadata
    for dist in ("torch", "torchvision", "open_clip_torch", "hqrs_geo"):
        try:
            versions[dist] = metadata.version(dist)
        except Exception:
            pass
except Exception:
    pass
result = {"result": True, "passed": [], "versions": versions, "python": sys.executable}
for name in checks:
    say({"check": name})
    started = time.monotonic()
    try:
        detail = globals()["check_" + name]()
    except BaseException as exc:
        text = str(exc).strip().splitlines()
        result.update(failed=name, error="%s: %s" % (type(exc).__name__, text[0] if text else ""),
                      traceback=traceback.format_exc()[-6000:])
        break
    result["passed"].append([name, detail, round(time.monotonic() - started, 2)])
say(result)
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
        """True when the engine can run on the chosen device."""
        return self.problem is None

    @property
    def installed(self) -> bool:
        """True when the engine is installed and works, whatever the device setting says (a device
        problem is a setting to change, never an engine to install)."""
        return self.problem is None or self.device_problem is not None

    @property
    def device_problem(self) -> EngineError | None:
        """The problem when it is only the chosen device (not available here), else None."""
        return self.problem if self.problem is not None and "device_problem" in self.raw else None

    @property
    def devices(self) -> list[str]:
        """The devices this engine can use (always ``cpu``; ``cuda``, ``cuda:1``… for the GPUs torch
        sees; ``mps`` on a Mac with MPS), without ``auto``; ``[]`` when unknown (an older engine
        probe or a broken engine)."""
        return [str(d) for d in self.raw.get("devices") or []]

    def device_label(self, device: str) -> str:
        """``cuda (NVIDIA H100)``, ``cpu (8 threads)``, or the name alone."""
        name = (self.raw.get("device_names") or {}).get(device)
        return f"{device} ({name})" if name else device

    @property
    def summary(self) -> str:
        """``hqrs_geo 0.1.0, torch 2.14.1 on cuda: NVIDIA H100`` or the problem."""
        if self.device_problem is not None:
            return f"hqrs_geo {self.hqrs_geo}, torch {self.torch}; {self.device_problem.text}"
        if self.problem is not None:
            return self.problem.text
        return f"hqrs_geo {self.hqrs_geo}, torch {self.torch} on {self.device}"


_cache: dict[tuple, EngineInfo] = {}
_cache_lock = threading.Lock()


def probe(python: str | None = None, device: str | None = None, timeout: float = 180.0,
          use_cache: bool = True) -> EngineInfo:
    """Ask ``python`` what it can do (blocking: seconds; call it from a task in the GUI).

    Probes of a working engine are cached per (interpreter, device), a device it does not have
    included (that is a setting to change); an engine that cannot run never is, so installing it
    takes effect on the next call.
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
    absent = [name for name, error in missing if error.startswith("ModuleNotFoundError")]
    broken = [(name, error) for name, error in missing if not error.startswith("ModuleNotFoundError")]
    if broken:  # installed, but its import fails: say how (e.g. torchvision's operators missing)
        name, error = broken[0]
        info.problem = EngineError(f"the engine in {python} is broken: importing {name} raised {error}", "engine",
                                   REPAIR_ENGINE)
    elif absent:
        info.problem = EngineError(f"the engine is not installed in {python} (missing: {', '.join(absent)})",
                                   "engine", SET_UP_ENGINE)
    else:
        if raw.get("device_problem"):  # the engine works; the device setting names one it does not have
            instead = raw.get("device_instead") or "another device"
            info.problem = EngineError(raw["device_problem"], "user",
                                       f"choose {instead} as the device in HQRS settings")
        with _cache_lock:
            _cache[cache_key] = info
    return info


def forget(python: str | None = None) -> None:
    """Drop cached probes (of ``python``, or all)."""
    with _cache_lock:
        for cache_key in [k for k in _cache if python is None or k[0] == python]:
            del _cache[cache_key]


def cached(python: str | None = None, device: str | None = None) -> EngineInfo | None:
    """The cached probe of a working engine, if any (never starts a process)."""
    with _cache_lock:
        return _cache.get((python or interpreter(), device or str(settings.value("device"))))


def _on_settings_changed(names: list) -> None:
    if "interpreter" in names:  # probes are kept per device: another device needs no new probe
        forget()


settings.notifier.changed.connect(_on_settings_changed)


@dataclass
class SelfTest:
    """How :func:`self_test` ended: ``failed`` names the check that failed (None when all passed),
    ``error`` is its exception as ``Type: message`` (or what a crashed process left on stderr)."""

    python: str
    checks: tuple[str, ...]
    passed: list = field(default_factory=list)        # [check, what it found, seconds]
    failed: str | None = None
    error: str = ""
    detail: str = ""                                  # the traceback (or stderr) of the failure
    versions: dict = field(default_factory=dict)      # distribution -> version (torch, torchvision, …)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return self.failed is None

    @property
    def summary(self) -> str:
        """``self-test passed: torch 2.14.1+cpu, …`` or ``self-test failed at torchvision: RuntimeError: …``."""
        if self.ok:
            return "self-test passed (" + "; ".join(detail for _, detail, _ in self.passed) + f"; {self.seconds:.0f} s)"
        return f"self-test failed at {CHECK_NAMES.get(self.failed or '', self.failed)}: {self.error}"


CHECK_NAMES = {"torch": "import torch", "torchvision": "torchvision.ops.nms", "open_clip": "import open_clip",
               "hqrs_geo": "import hqrs_geo", "model": f"loading the shipped model {SELF_TEST_MODEL}",
               "embed": "embedding one tile on the CPU"}


def self_test(python: str, checks: Sequence[str] = SELF_TEST_CHECKS, model: str = SELF_TEST_MODEL,
              timeout: float = 600.0, on_line: Callable[[str], None] | None = None) -> SelfTest:
    """Run the engine self-test in ``python`` (a child process; blocking: seconds).

    The checks, in order: import torch; run ``torchvision.ops.nms`` on three boxes; import
    open_clip and hqrs_geo; load the shipped model ``model`` on the CPU (nothing is downloaded);
    embed one random 64×64 tile. It stops at the first failure and keeps that exception's text.
    ``on_line`` receives a line per check as it starts and ends.
    """
    unknown = [name for name in checks if name not in SELF_TEST_CHECKS]
    if unknown:
        raise ValueError(f"unknown self-test checks {unknown}; known: {SELF_TEST_CHECKS}")
    report = on_line or (lambda line: None)
    outcome = SelfTest(python, tuple(checks))
    started = time.monotonic()
    child = ChildProcess([python, "-c", SELF_TEST, ",".join(checks), model])
    current = None
    try:
        child.start()
        while True:
            remaining = timeout - (time.monotonic() - started)
            line = child.read_line(timeout=max(remaining, 0.01))
            if line is None:
                break
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue  # a library printing to stdout
            if not isinstance(message, dict):
                continue
            if "check" in message:
                current = message["check"]
                report(f"self-test: {CHECK_NAMES.get(current, current)}…")
            elif "result" in message:
                outcome.passed = message.get("passed") or []
                outcome.versions = message.get("versions") or {}
                outcome.failed = message.get("failed")
                outcome.error = message.get("error", "")
                outcome.detail = message.get("traceback", "")
                current = None
    except TimeoutError:
        child.kill()
        outcome.failed = current or "torch"
        outcome.error = f"no answer within {timeout:.0f} s"
    except EngineError as exc:
        outcome.failed, outcome.error = "torch", str(exc)
    finally:
        child.finish(timeout=10)
    if current is not None and outcome.failed is None:  # the process died inside a check
        stderr = [line.strip() for line in child.stderr if line.strip()]
        outcome.failed = current
        status = child.returncode
        how = f"killed by signal {-status}" if status is not None and status < 0 else f"exit status {status}"
        outcome.error = f"the process ended ({how}): {stderr[-1] if stderr else 'nothing on stderr'}"
        outcome.detail = "\n".join(stderr[-40:])
    elif current is None and not outcome.passed and outcome.failed is None and checks:
        stderr = [line.strip() for line in child.stderr if line.strip()]
        outcome.failed = checks[0]
        outcome.error = stderr[-1] if stderr else f"{python} gave no self-test result"
    for name, detail, _seconds in outcome.passed:
        report(f"self-test: {CHECK_NAMES.get(name, name)}: ok ({detail})")
    if outcome.failed:
        report(f"self-test: {CHECK_NAMES.get(outcome.failed, outcome.failed)}: FAILED: {outcome.error}")
    outcome.seconds = time.monotonic() - started
    return outcome
