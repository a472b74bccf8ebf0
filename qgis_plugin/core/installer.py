"""Installing the engine into a virtual environment of its own, from inside QGIS.

An analyst's QGIS runs a system Python into which pip may not install (Debian's is "externally
managed"), and hqrs_geo is not on the package index. So the installer:

1. creates a virtual environment (default :func:`engine.default_engine_dir`) with the Python
   QGIS runs on (or another one given),
2. installs PyTorch chosen for the machine: the CUDA build when ``nvidia-smi`` finds an NVIDIA GPU
   (PyPI's Linux wheels), else the CPU build from the PyTorch CPU index (about 200 MB instead of
   several GB; when that index cannot be reached, PyPI's build, which also runs on CPUs); or it
   reuses the torch of an existing environment (``torch="reuse"``: links its torch, torchvision,
   triton and NVIDIA libraries into the new environment instead of downloading them),
3. installs hqrs_geo from its wheel (shipped inside the plugin zip by ``make plugin``, or a path
   or URL the user gives) with the ``models`` and ``mpgi`` extras; its dependencies come from the
   package index, or only from wheel folders (``no_index``) on machines without internet,
4. checks the result with :func:`engine.probe`.

Every step is a child process through :mod:`.runner`; :class:`InstallTask` runs the steps as a
QgsTask with progress, a log and cancel.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .runner import ChildProcess, EngineError

PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"
DEFAULT_EXTRAS = ("models", "mpgi")
TORCH_PACKAGES = ("torch", "torchvision")
# distributions linked from another environment by torch="reuse" (the large binary ones)
REUSED = ("torch", "torchvision", "triton")
REUSED_PREFIXES = ("nvidia-", "nvidia_", "cuda-", "cuda_")
PLUGIN_DIR = Path(__file__).resolve().parents[1]

OFFLINE_HELP = (
    "{headline}. Either connect this computer to the package index (a proxy is taken from the HTTPS_PROXY "
    "environment variable of QGIS), or install offline: on a computer with internet run\n"
    "  python3 -m pip download '{wheel}[{extras}]' -d hqrs-wheels\n"
    "(same operating system and Python {python_version}), copy the folder 'hqrs-wheels' here, add it under "
    "'Wheel folders' and tick 'Only these folders (no index)'.")

REUSE_SCRIPT = r"""
import json, sys, importlib.metadata as md
keep = set(sys.argv[1].split(","))
prefixes = tuple(sys.argv[2].split(","))
entries = set()
for dist in md.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name not in keep and not name.startswith(prefixes):
        continue
    for item in dist.files or []:
        top = item.parts[0]
        if top == ".." or top.endswith(".data") or top == "__pycache__":
            continue
        entries.add(str(dist.locate_file(top)))
print(json.dumps({"python_version": "%d.%d" % sys.version_info[:2], "entries": sorted(entries)}))
"""
SITE_SCRIPT = ("import json, sys, sysconfig; "
               "print(json.dumps([sysconfig.get_paths()['purelib'], '%d.%d' % sys.version_info[:2]]))")


def detect_nvidia_gpu(timeout: float = 15.0) -> str | None:
    """The first NVIDIA GPU's name as ``nvidia-smi`` reports it, or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    child = ChildProcess([smi, "--query-gpu=name", "--format=csv,noheader"])
    try:
        child.start()
        line = child.read_line(timeout=timeout)
    except (EngineError, TimeoutError):
        line = None
    child.kill()
    child.finish(timeout=5)
    return line.strip() if line and line.strip() and child.returncode == 0 else None


def bundled_wheels() -> list[str]:
    """hqrs_geo wheels shipped with the plugin (``engine/`` in the zip) or beside it (``dist/``)."""
    found = []
    for folder in (PLUGIN_DIR / "engine", PLUGIN_DIR.parent / "dist"):
        found += sorted(glob.glob(str(folder / "hqrs_geo-*.whl")), key=os.path.getmtime, reverse=True)
    return found


def index_reachable(url: str = PYPI, timeout: float = 5.0) -> bool:
    """True when a TCP connection to the index's host (or the HTTPS proxy) opens."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    parts = urllib.parse.urlsplit(proxy or url)
    if parts.scheme == "file":
        return os.path.isdir(parts.path)
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class InstallOptions:
    """What to install where."""

    venv: str
    wheel: str                                  # hqrs_geo: a wheel path or URL (or a requirement on an index)
    base_python: str = ""                       # creates the environment ('' = QGIS's Python)
    torch: str = "auto"                         # auto | cuda | cpu | reuse
    reuse_torch_from: str = ""                  # torch="reuse": the Python whose torch to link
    extras: tuple[str, ...] = DEFAULT_EXTRAS
    find_links: tuple[str, ...] = ()            # wheel folders (offline installs)
    no_index: bool = False                      # only the wheel folders, no package index
    gpu: str | None = None                   # filled by :func:`choose_torch`

    @property
    def python(self) -> str:
        """The new environment's interpreter."""
        from .engine import venv_python

        return str(venv_python(Path(self.venv)))

    def hqrs_requirement(self) -> str:
        """``/path/hqrs_geo-….whl[models,mpgi]`` (or ``hqrs_geo[…] @ URL``)."""
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        if "://" in self.wheel:
            return f"hqrs_geo{extras} @ {self.wheel}"
        if self.wheel.endswith(".whl"):
            return f"{os.path.abspath(self.wheel)}{extras}"
        return self.wheel + ("" if "[" in self.wheel else extras)


def choose_torch(options: InstallOptions) -> tuple[str, str]:
    """(``cuda`` | ``cpu`` | ``reuse``, the reason in words)."""
    if options.torch == "reuse":
        return "reuse", f"reusing the PyTorch of {options.reuse_torch_from} (nothing downloaded)"
    gpu = detect_nvidia_gpu() if options.torch in ("auto", "cuda") else None
    options.gpu = gpu
    if options.torch == "cuda" or gpu:
        return "cuda", f"CUDA build of PyTorch ({'NVIDIA GPU found: ' + gpu if gpu else 'chosen in the set-up'})"
    why = "chosen in the set-up" if options.torch == "cpu" else "no NVIDIA GPU found by nvidia-smi"
    return "cpu", f"CPU build of PyTorch ({why}; about 200 MB)"


@dataclass
class Step:
    """One installer step: a command line, or a function given the log callback."""

    title: str
    argv: list[str] | None = None
    call: Callable[[Callable[[str], None]], None] | None = None
    fallback: Step | None = None           # tried when this step fails for a network reason
    weight: float = 1.0


def pip_args(options: InstallOptions) -> list[str]:
    """Pip options every install step shares (wheel folders, no index)."""
    args = ["--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    for folder in options.find_links:
        args += ["--find-links", folder]
    if options.no_index:
        args.append("--no-index")
    return args


def plan(options: InstallOptions) -> list[Step]:
    """The steps that install the engine (see the module's docstring)."""
    from .engine import qgis_python

    base = options.base_python or qgis_python()
    python = options.python
    steps = []
    if not Path(python).is_file():
        steps.append(Step(f"Creating the environment {options.venv}", [base, "-m", "venv", options.venv], weight=0.5))
    kind, reason = choose_torch(options)
    pip = [python, "-m", "pip", "install", *pip_args(options)]
    if kind == "reuse":
        steps.append(Step(f"PyTorch: {reason}", call=lambda log: link_torch(options.reuse_torch_from, python, log),
                          weight=0.5))
    elif kind == "cpu" and not options.no_index:
        fallback = Step("PyTorch from PyPI (the CPU index cannot be reached; this build also runs on CPUs)",
                        [*pip, *TORCH_PACKAGES], weight=4)
        steps.append(Step(f"PyTorch: {reason}", [*pip, "--index-url", PYTORCH_CPU_INDEX, *TORCH_PACKAGES],
                          fallback=fallback, weight=4))
    else:
        steps.append(Step(f"PyTorch: {reason}", [*pip, *TORCH_PACKAGES], weight=4))
    steps.append(Step("hqrs_geo and its dependencies", [*pip, options.hqrs_requirement()], weight=3))
    return steps


def _run_json(argv: Sequence[str], timeout: float = 120.0):
    child = ChildProcess(argv).start()
    try:
        line = child.read_line(timeout=timeout)
    finally:
        child.finish(timeout=10)
    try:
        return json.loads(line or "")
    except json.JSONDecodeError:
        raise child.error(argv[0]) from None


def link_torch(source_python: str, python: str, log: Callable[[str], None]) -> None:
    """Make the torch of ``source_python`` importable in the environment of ``python`` (links to
    its torch, torchvision, triton and NVIDIA/CUDA distributions in a folder on a ``.pth`` path, so
    pip sees them installed and the environment's own packages stay its own)."""
    if not source_python or not Path(source_python).exists():
        raise EngineError(f"no Python to reuse PyTorch from ({source_python or 'none given'})", "user",
                          "choose the Python of an environment that has torch")
    found = _run_json([source_python, "-c", REUSE_SCRIPT, ",".join(REUSED), ",".join(REUSED_PREFIXES)])
    site, version = _run_json([python, "-c", SITE_SCRIPT])
    if found["python_version"] != version:
        raise EngineError(f"{source_python} is Python {found['python_version']}, the new environment Python {version}: "
                          "torch cannot be shared between them", "user", "install PyTorch instead")
    if not any(Path(e).name.startswith("torch-") for e in found["entries"]):
        raise EngineError(f"{source_python} has no torch to reuse", "user", "install PyTorch instead")
    folder = Path(python).resolve().parents[1] / "reused-torch"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for entry in found["entries"]:
        os.symlink(entry, folder / Path(entry).name)
    Path(site, "hqrs-reused-torch.pth").write_text(str(folder) + "\n", encoding="utf-8")
    log(f"linked {len(found['entries'])} entries of torch, torchvision, triton and NVIDIA libraries from "
        f"{source_python} into {folder}")


@dataclass
class InstallResult:
    """How an installation ended."""

    ok: bool
    python: str
    message: str
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)


class Installer:
    """Runs :func:`plan`'s steps; ``on_log(line)`` and ``on_progress(percent, title)`` report,
    ``is_cancelled()`` is polled; :meth:`cancel` stops the running step."""

    def __init__(self, options: InstallOptions, on_log: Callable[[str], None] | None = None,
                 on_progress: Callable[[float, str], None] | None = None,
                 is_cancelled: Callable[[], bool] | None = None):
        self.options = options
        self.on_log = on_log or (lambda line: None)
        self.on_progress = on_progress or (lambda percent, title: None)
        self.is_cancelled = is_cancelled or (lambda: False)
        self.lines: list[str] = []
        self._child: ChildProcess | None = None

    def log(self, line: str) -> None:
        """One log line."""
        self.lines.append(line)
        self.on_log(line)

    def cancel(self) -> None:
        """Stop the running step."""
        child = self._child
        if child is not None:
            child.terminate()

    def run(self) -> InstallResult:
        """Install; never raises (the result says what went wrong and what to do)."""
        from . import engine

        started = time.monotonic()
        try:
            steps = plan(self.options)
            total = sum(step.weight for step in steps) + 0.5
            done = 0.0
            for step in steps:
                self.on_progress(100.0 * done / total, step.title)
                self.run_step(step)
                done += step.weight
            self.on_progress(100.0 * done / total, "Checking the engine")
            self.log(f"== Checking the engine in {self.options.python}")
            info = engine.probe(self.options.python, use_cache=False)
            if not info.ok:
                raise info.problem
            self.log(f"engine OK: {info.summary}")
            self.on_progress(100.0, "done")
            return InstallResult(True, self.options.python, f"engine installed: {info.summary}",
                                 time.monotonic() - started, self.lines)
        except EngineError as exc:
            message = str(exc)
            missing = self.options.no_index and exc.kind != "cancelled" and any(
                marker in message for marker in ("ResolutionImpossible", "conflicting dependencies"))
            if exc.kind == "network" or missing:
                headline = (f"The wheel folders do not hold every package the engine needs ({message})"
                            if self.options.no_index else "The package index cannot be reached from this computer")
                message = OFFLINE_HELP.format(headline=headline, wheel=self.options.wheel or "hqrs_geo",
                                              extras=",".join(self.options.extras), python_version=self._version())
            elif exc.fix:
                message = exc.text
            self.log(f"FAILED: {message}")
            return InstallResult(False, self.options.python, message, time.monotonic() - started, self.lines)

    def _version(self) -> str:
        import sys

        return f"{sys.version_info[0]}.{sys.version_info[1]}"

    def run_step(self, step: Step) -> None:
        """One step (its fallback when it fails for want of a network)."""
        if self.is_cancelled():
            raise EngineError("cancelled", "cancelled")
        self.log(f"== {step.title}")
        if step.call is not None:
            step.call(self.log)
            return
        self.log("$ " + " ".join(step.argv))
        child = self._child = ChildProcess(step.argv, merge_stderr=True)
        child.start()
        output: list[str] = []
        while True:
            if self.is_cancelled():
                child.terminate()
            try:
                line = child.read_line(timeout=0.2)
            except TimeoutError:
                continue
            if line is None:
                break
            line = line.rstrip()
            output.append(line)
            if line:
                self.log(line)
        code = child.finish()
        self._child = None
        if self.is_cancelled():
            raise EngineError("cancelled: the environment may be half installed; run the set-up again to finish it",
                              "cancelled")
        if code != 0:
            error = _pip_error(output, code)
            if error.kind == "network" and step.fallback is not None:
                self.log(f"(network: {error}); trying: {step.fallback.title}")
                return self.run_step(step.fallback)
            raise error


def _pip_error(output: Sequence[str], code: int) -> EngineError:
    from .runner import parse_error

    if any("No module named venv" in line or "ensurepip is not available" in line for line in output):
        return EngineError("this Python cannot create virtual environments (no venv/ensurepip)", "user",
                           "install them (Debian/Ubuntu: sudo apt install python3-venv) or choose another Python")
    errors = [line for line in output if line.startswith("ERROR:")]
    error = parse_error(output, code)
    if error.kind != "network" and errors:
        error = EngineError(errors[-1][len("ERROR:"):].strip(), "internal")
    return error
