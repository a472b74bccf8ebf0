"""Installing the engine into a virtual environment of its own, from inside QGIS.

An analyst's QGIS runs a system Python into which pip may not install (Debian's is "externally
managed"), and hqrs_geo is not on the package index. So the installer:

1. looks at the target folder: absent or empty, it creates a virtual environment there (default
   :func:`engine.default_engine_dir`) with the Python QGIS runs on (or another one given); an
   environment whose Python runs it *repairs* (reinstalls torch/torchvision and hqrs_geo with the
   pins); one whose Python is gone, does not run, is another Python version or has no pip it
   *replaces* (deletes it first: never a second copy); a folder that is not an environment it
   leaves alone and says so,
2. installs PyTorch chosen for the machine: the CUDA build when ``nvidia-smi`` finds an NVIDIA GPU
   (PyPI's Linux wheels), else the CPU build from the PyTorch CPU index; when that index cannot be
   reached, PyPI's build (on Linux the large CUDA one, which also runs on CPUs, and the log says
   so); or it reuses the torch of an existing environment (``torch="reuse"``: links its torch,
   torchvision, triton and NVIDIA libraries into the new environment instead of downloading them),
3. installs hqrs_geo from its wheel (shipped inside the plugin zip by ``make plugin``, or a path
   or URL the user gives) with the ``models`` and ``mpgi`` extras; its dependencies come from the
   package index, or only from wheel folders (``no_index``) on machines without internet,
4. runs the engine self-test in the new environment (:func:`engine.self_test`: torch, a
   torchvision operator, open_clip, hqrs_geo, the shipped model, one embedded tile).

Every pip step passes the project's pins (``-c constraints.txt``: shipped next to the wheel in the
plugin zip, ``engine/constraints.txt``), so torch and torchvision always come as the known-good
pair, and a later step can never swap one of them. Each failure ends in one message with the
real error (pip's ``ERROR:`` line, the failing import's exception), what is broken and what to
do. Every step is a child process through :mod:`.runner`; the set-up panel runs
:class:`Installer` in a QgsTask with progress, a log and cancel.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import engine
from .runner import ChildProcess, EngineError, StallWatch

PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"
#: pip's own socket timeout and retries per connection (its defaults: 15 s, 5 retries), given to
#: every pip step as PIP_TIMEOUT / PIP_RETRIES unless the user's environment sets them
PIP_TIMEOUT, PIP_RETRIES = 60, 3
#: a pip step that neither prints a line nor reads STALL_BYTES (downloads and files, /proc/PID/io
#: on Linux) for this many seconds is stalled (a server that answers nothing, or a byte a second):
#: it is stopped with a message; a step ends after STEP_SECONDS whatever it does
STALL_SECONDS, STALL_BYTES, STEP_SECONDS = 180.0, 64 * 1024, 4 * 3600.0
DEFAULT_EXTRAS = ("models", "mpgi")
TORCH_PACKAGES = ("torch", "torchvision")
# distributions linked from another environment by torch="reuse" (the large binary ones)
REUSED = ("torch", "torchvision", "triton")
REUSED_PREFIXES = ("nvidia-", "nvidia_", "cuda-", "cuda_")
PLUGIN_DIR = Path(__file__).resolve().parents[1]
# where the pins are looked for: next to the wheel in the plugin zip, else the source tree's root
CONSTRAINTS_PLACES = (PLUGIN_DIR / "engine" / "constraints.txt", PLUGIN_DIR.parent / "constraints.txt")


@dataclass(frozen=True)
class EngineSize:
    """What one kind of engine costs: download and disk in GB (Linux, Python 3.11, both extras)."""

    download_gb: float
    disk_gb: float
    label: str


# The one place for the sizes shown before an installation starts (and used for the disk check).
# Measured (Linux, Python 3.11, pip --no-compile): CPU build (torch 2.13.0+cpu, a
# wheel of the size of 2.14.1+cpu; the CPU index could not be reached there): 0.41 GB downloaded,
# 1.47 GB on disk; CUDA build (PyPI's torch 2.14.1 with its NVIDIA libraries, installed by the
# panel in QGIS 3.22): 3.23 GB downloaded, 6.32 GB on disk; reuse: the rest only.
ENGINE_SIZES = {
    "cpu": EngineSize(0.45, 1.5, "CPU build of PyTorch"),
    "cuda": EngineSize(3.3, 6.3, "CUDA build of PyTorch"),
    "reuse": EngineSize(0.25, 0.8, "PyTorch reused from another environment"),
}


def size_text(kind: str) -> str:
    """``about 0.45 GB to download, 1.5 GB on disk`` for ``cpu`` | ``cuda`` | ``reuse``."""
    size = ENGINE_SIZES[kind]
    return f"about {size.download_gb:g} GB to download, {size.disk_gb:g} GB on disk"


OFFLINE_HELP = (
    "{headline}. Either connect this computer to the package index (a proxy is taken from the HTTPS_PROXY "
    "environment variable of QGIS), or install offline: copy {files} to a computer with internet (same operating "
    "system, Python {python_version}) and make a wheel folder there, in the folder of those files, with one "
    "command:\n"
    "  {command}\n"
    "copy the folder 'hqrs-wheels' here, add it under 'Wheel folders' and tick 'Only these folders (no index)'.")

REUSE_SCRIPT = r"""
import json, sys, importlib.metadata as md
keep = set(sys.argv[1].split(","))
prefixes = tuple(sys.argv[2].split(","))
entries = set()
versions = {}
for dist in md.distributions():
    name = (dist.metadata["Name"] or "").lower()
    if name not in keep and not name.startswith(prefixes):
        continue
    versions[name] = dist.version
    for item in dist.files or []:
        top = item.parts[0]
        if top == ".." or top.endswith(".data") or top == "__pycache__":
            continue
        entries.add(str(dist.locate_file(top)))
print(json.dumps({"python_version": "%d.%d" % sys.version_info[:2], "entries": sorted(entries),
                  "versions": versions}))
"""
SITE_SCRIPT = ("import json, sys, sysconfig; "
               "print(json.dumps([sysconfig.get_paths()['purelib'], '%d.%d' % sys.version_info[:2]]))")
# what an existing environment's Python is: its version, and whether pip runs in it
ENV_SCRIPT = ("import json, sys, importlib.util; print(json.dumps(['%d.%d' % sys.version_info[:2], "
              "importlib.util.find_spec('pip') is not None]))")
VERSION_SCRIPT = "import sys; print('%d.%d' % sys.version_info[:2])"


def constraints_file() -> Path:
    """The project's pins: ``engine/constraints.txt`` in the plugin (the zip), else the source tree's."""
    for place in CONSTRAINTS_PLACES:
        if place.is_file():
            return place
    raise EngineError(f"the plugin has no constraints.txt (looked for {CONSTRAINTS_PLACES[0]} and "
                      f"{CONSTRAINTS_PLACES[1]}), so torch and torchvision cannot be pinned to a working pair",
                      "internal", "reinstall the plugin from a zip made by 'make plugin' (it ships "
                      "engine/constraints.txt next to the hqrs_geo wheel)")


def read_pins(path: str | os.PathLike) -> dict[str, str]:
    """``{"torch": "2.14.1", "torchvision": "0.29.1"}``: the ``name==version`` lines of a constraints file."""
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip().split(";")[0].strip()
    return pins


def pins_text(pins: dict[str, str]) -> str:
    """``torch 2.14.1 / torchvision 0.29.1`` (the pinned pair, for messages)."""
    return " / ".join(f"{name} {pins[name]}" for name in TORCH_PACKAGES if name in pins) or "no torch pins"


def wheel_folder_command(wheel: str, extras: Sequence[str] = DEFAULT_EXTRAS, constraints: str = "constraints.txt",
                         folder: str = "hqrs-wheels", python: str = "python3", cpu_index: str = PYTORCH_CPU_INDEX,
                         index: str = PYPI) -> list[str]:
    """The one command that fills a wheel folder for an offline install: the wheel with its extras,
    every dependency, and the CPU build of the pinned torch/torchvision pair."""
    requirement = f"{wheel}[{','.join(extras)}]" if extras else wheel
    return [python, "-m", "pip", "download", "-d", folder, "-c", constraints, "--index-url", cpu_index,
            "--extra-index-url", index, requirement]


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
    code = child.finish(timeout=5)  # its own exit status (killing it before it ended read as no GPU)
    return line.strip() if line and line.strip() and code == 0 else None


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


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (links not followed: a reused torch is not counted)."""
    total = 0
    for root, _dirs, files in os.walk(os.fspath(path)):
        for name in files:
            try:
                stat = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += stat.st_size if not os.path.islink(os.path.join(root, name)) else 0
    return total


def free_space(path: str | os.PathLike) -> tuple[Path, int]:
    """The nearest existing folder at or above ``path`` and the bytes free on its disk."""
    place = Path(path).resolve()
    while not place.exists() and place != place.parent:
        place = place.parent
    return place, shutil.disk_usage(place).free


def gigabytes(size: int) -> str:
    """``1.47 GB``."""
    return f"{size / 1e9:.2f} GB"


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
    replace: bool = False                       # delete an existing environment and install anew
    constraints: str = ""                       # the pins ('' = :func:`constraints_file`)
    index_url: str = ""                         # the package index ('' = pip's own: PyPI or the user's config)
    cpu_index_url: str = PYTORCH_CPU_INDEX      # where the CPU build of torch comes from
    self_test_checks: tuple[str, ...] | None = None  # None = every check of :func:`engine.self_test`
    gpu: str | None = None                      # filled by :func:`choose_torch`
    stall_seconds: float = STALL_SECONDS        # a pip step without progress this long is stopped
    step_seconds: float = STEP_SECONDS          # the most one pip step may take

    @property
    def python(self) -> str:
        """The new environment's interpreter."""
        return str(engine.venv_python(Path(self.venv)))

    def constraints_path(self) -> str:
        """The constraints file every pip step passes (raises EngineError when there is none)."""
        if self.constraints:
            if not Path(self.constraints).is_file():
                raise EngineError(f"the constraints file {self.constraints} does not exist", "user",
                                  "give the constraints.txt shipped with the plugin")
            return str(Path(self.constraints).resolve())
        return str(constraints_file())

    def hqrs_requirement(self) -> str:
        """``/path/hqrs_geo-….whl[models,mpgi]`` (or ``hqrs_geo[…] @ URL``)."""
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        if "://" in self.wheel:
            return f"hqrs_geo{extras} @ {self.wheel}"
        if self.wheel.endswith(".whl"):
            return f"{os.path.abspath(self.wheel)}{extras}"
        return self.wheel + ("" if "[" in self.wheel else extras)


def choose_torch(options: InstallOptions) -> tuple[str, str]:
    """(``cuda`` | ``cpu`` | ``reuse``, the reason in words, with the expected sizes)."""
    if options.torch == "reuse":
        return "reuse", (f"reusing the PyTorch of {options.reuse_torch_from} (nothing of it downloaded; "
                         f"the rest {size_text('reuse')})")
    gpu = detect_nvidia_gpu() if options.torch in ("auto", "cuda") else None
    options.gpu = gpu
    if options.torch == "cuda" or gpu:
        why = "NVIDIA GPU found: " + gpu if gpu else "chosen in the set-up"
        return "cuda", f"CUDA build of PyTorch ({why}; {size_text('cuda')})"
    why = "chosen in the set-up" if options.torch == "cpu" else "no NVIDIA GPU found by nvidia-smi"
    return "cpu", f"CPU build of PyTorch ({why}; {size_text('cpu')})"


@dataclass
class Step:
    """One installer step: a command line, or a function given the log callback."""

    title: str
    argv: list[str] | None = None
    call: Callable[[Callable[[str], None]], None] | None = None
    fallback: Step | None = None           # tried when this step fails for want of its index
    reachable: str = ""                    # an index URL checked first: unreachable, the fallback runs at once
    weight: float = 1.0
    name: str = ""                         # short, for messages ('' = the title)
    index: str = ""                        # the index the step asks (to tell a network failure)


def pip_args(options: InstallOptions, constraints: str) -> list[str]:
    """Pip options every install step shares: the pins, wheel folders, no index, no .pyc files
    (they would add a fifth to the engine's size; Python writes those it needs on first use)."""
    args = ["--disable-pip-version-check", "--no-input", "--progress-bar", "off", "--no-compile",
            "-c", constraints]
    for folder in options.find_links:
        args += ["--find-links", folder]
    if options.no_index:
        args.append("--no-index")
    return args


def index_args(options: InstallOptions) -> list[str]:
    """``--index-url URL`` when another index than pip's own is chosen."""
    return ["--index-url", options.index_url] if options.index_url and not options.no_index else []


def reuse_constraints(venv: str | os.PathLike) -> Path:
    """The pins written by :func:`link_torch` (the reused torch's own versions)."""
    return Path(venv) / "hqrs-reused-constraints.txt"


def plan(options: InstallOptions, repair: bool = False) -> list[Step]:
    """The steps that install (or, with ``repair``, repair) the engine (see the module's docstring)."""
    base = options.base_python or engine.qgis_python()
    python = options.python
    constraints = options.constraints_path()
    pins = read_pins(constraints)
    steps = []
    if not Path(python).is_file():
        steps.append(Step(f"Creating the environment {options.venv}", [base, "-m", "venv", options.venv], weight=0.5))
    kind, reason = choose_torch(options)
    pip = [python, "-m", "pip", "install", *pip_args(options, constraints)]
    pinned = f"{pins_text(pins)}, pinned"
    index = "" if options.no_index else (options.index_url or PYPI)
    pypi = ENGINE_SIZES["cuda"]
    instead = (f"the PyTorch CPU index cannot be reached or lacks the pinned build; on Linux PyPI's build is the "
               f"large CUDA one: about {pypi.download_gb:g} GB to download, {pypi.disk_gb:g} GB on disk; it also "
               "runs on CPUs")

    def torch_step(title: str, name: str, extra: Sequence[str], weight: float) -> Step:
        packages = [*extra, *TORCH_PACKAGES]
        if kind == "cpu" and not options.no_index:
            fallback = Step(f"PyTorch from PyPI ({pinned}){' to repair' if extra else ''}: {instead}",
                            [*pip, *index_args(options), *packages], weight=weight, name=f"{name} from PyPI",
                            index=index)
            return Step(title, [*pip, "--index-url", options.cpu_index_url, *packages], fallback=fallback,
                        reachable=options.cpu_index_url, weight=weight, name=f"{name} from the CPU index",
                        index=options.cpu_index_url)
        return Step(title, [*pip, *index_args(options), *packages], weight=weight, name=name, index=index)

    if kind == "reuse":
        steps.append(Step(f"PyTorch: {reason}", weight=0.5, call=lambda log: link_torch(
            options.reuse_torch_from, python, log, constraints)))
        constraints_after = str(reuse_constraints(options.venv))
        pip = [python, "-m", "pip", "install", *pip_args(options, constraints_after)]
    else:
        if repair:
            steps.append(torch_step(f"Repairing: reinstalling torch/torchvision with the pins ({pinned})",
                                    "reinstalling torch/torchvision", ["--force-reinstall", "--no-deps"], 2))
        steps.append(torch_step(f"PyTorch ({pinned}): {reason}", "installing PyTorch", [], 4))
    if repair:
        steps.append(Step("Repairing: reinstalling hqrs_geo", [*pip, *index_args(options), "--force-reinstall",
                                                               "--no-deps", options.hqrs_requirement()], weight=1,
                          name="reinstalling hqrs_geo", index=index))
    steps.append(Step(f"hqrs_geo and its dependencies ({pinned})", [*pip, *index_args(options),
                                                                   options.hqrs_requirement()], weight=3,
                      name="installing hqrs_geo and its dependencies", index=index))
    return steps


def _run_json(argv: Sequence[str], timeout: float = 120.0):
    child = ChildProcess(argv).start()
    try:
        line = child.read_line(timeout=timeout)
    except TimeoutError:
        child.kill()
        line = None
    finally:
        child.finish(timeout=10)
    try:
        return json.loads(line or "")
    except json.JSONDecodeError:
        raise child.error(argv[0]) from None


def link_torch(source_python: str, python: str, log: Callable[[str], None], constraints: str = "") -> None:
    """Make the torch of ``source_python`` importable in the environment of ``python`` (links to
    its torch, torchvision, triton and NVIDIA/CUDA distributions in a folder on a ``.pth`` path, so
    pip sees them installed and the environment's own packages stay its own). The later steps'
    pins (:func:`reuse_constraints`) are ``constraints`` with the reused torch's own versions, so
    pip keeps what was linked."""
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
    venv = Path(os.path.abspath(python)).parents[1]  # not resolved: a venv's python links to the base's
    folder = venv / "reused-torch"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for entry in found["entries"]:
        os.symlink(entry, folder / Path(entry).name)
    Path(site, "hqrs-reused-torch.pth").write_text(str(folder) + "\n", encoding="utf-8")
    reused = {name: found.get("versions", {}).get(name) for name in TORCH_PACKAGES}
    lines = [line for line in Path(constraints).read_text(encoding="utf-8").splitlines()
             if line.split("==")[0].strip().lower() not in TORCH_PACKAGES] if constraints else []
    lines += [f"{name}=={v}" for name, v in reused.items() if v]
    reuse_constraints(venv).write_text("\n".join(lines) + "\n", encoding="utf-8")
    pins = read_pins(constraints) if constraints else {}
    differs = [f"{name} {reused[name]} (pinned: {pins[name]})" for name in TORCH_PACKAGES
               if reused.get(name) and name in pins and reused[name].split("+")[0] != pins[name]]
    log(f"linked {len(found['entries'])} entries of torch, torchvision, triton and NVIDIA libraries from "
        f"{source_python} into {folder}" + (f"; not the pinned pair: {', '.join(differs)} (the self-test "
                                            "tells whether they work)" if differs else ""))


@dataclass
class InstallResult:
    """How an installation ended; ``error`` (None on success) carries the message and its fix."""

    ok: bool
    python: str
    message: str
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)
    action: str = ""                     # created | repaired | replaced
    size_bytes: int = 0                  # the environment on disk (links not counted)
    self_test: object | None = None      # :class:`engine.SelfTest`
    error: EngineError | None = None


class InstallFailed(EngineError):
    """An installation that did not end with a working engine (raised by the set-up task, so QGIS
    marks the task failed); ``result`` is the :class:`InstallResult`."""

    def __init__(self, result: InstallResult):
        error = result.error
        super().__init__(result.message, error.kind if error is not None else "engine")
        self.result = result


class Installer:
    """Runs :func:`plan`'s steps and the self-test; ``on_log(line)`` and ``on_progress(percent,
    title)`` report, ``is_cancelled()`` is polled; :meth:`cancel` stops the running step."""

    def __init__(self, options: InstallOptions, on_log: Callable[[str], None] | None = None,
                 on_progress: Callable[[float, str], None] | None = None,
                 is_cancelled: Callable[[], bool] | None = None):
        self.options = options
        self.on_log = on_log or (lambda line: None)
        self.on_progress = on_progress or (lambda percent, title: None)
        self.is_cancelled = is_cancelled or (lambda: False)
        self.lines: list[str] = []
        self.notes: list[str] = []       # said again in the final message (e.g. PyPI's build instead of the CPU one)
        self.action = ""
        self.percent = 0.0
        self._child: ChildProcess | None = None

    def log(self, line: str) -> None:
        """One log line."""
        self.lines.append(line)
        self.on_log(line)

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def cancel(self) -> None:
        """Stop the running step."""
        child = self._child
        if child is not None:
            child.terminate()

    # -- the environment ---------------------------------------------------------------------
    def _base_python(self) -> str:
        return self.options.base_python or engine.qgis_python()

    def inspect(self) -> tuple[str, str]:
        """What the target folder holds: (``create`` | ``repair`` | ``replace`` | ``foreign``, why)."""
        venv = Path(self.options.venv)
        if not venv.exists() or (venv.is_dir() and not any(venv.iterdir())):
            return "create", "no environment there yet"
        if not (venv / "pyvenv.cfg").is_file():
            return "foreign", f"{venv} exists and is not a Python environment (no pyvenv.cfg)"
        if self.options.replace:
            return "replace", "a new environment was asked for"
        python = self.options.python
        if not Path(python).is_file():
            return "replace", f"its Python {python} is missing"
        try:
            version, has_pip = _run_json([python, "-c", ENV_SCRIPT], timeout=60)
        except EngineError as exc:
            return "replace", f"its Python does not run ({exc})"
        try:
            wanted = ChildProcess([self._base_python(), "-c", VERSION_SCRIPT]).start()
            try:
                base_version = (wanted.read_line(timeout=60) or "").strip()
            finally:
                wanted.finish(timeout=10)
        except (EngineError, TimeoutError):
            base_version = version  # the base is checked when it creates an environment
        if base_version and base_version != version:
            return "replace", f"it is Python {version}, the environment to install is Python {base_version}"
        if not has_pip:
            return "replace", "it has no pip"
        return "repair", "its Python runs"

    def _remove(self, why: str) -> None:
        venv = Path(self.options.venv)
        size = folder_size(venv)
        self.log(f"replacing the broken environment at {venv} ({why}): deleting it ({gigabytes(size)}) and "
                 "installing anew")
        shutil.rmtree(venv)
        self.action = "replaced"

    def _check_disk(self, kind: str) -> None:
        need = ENGINE_SIZES[kind].disk_gb * 1e9
        place, free = free_space(self.options.venv)
        if free < need:
            raise EngineError(f"{gigabytes(free)} free on the disk of {place}; the {ENGINE_SIZES[kind].label} "
                              f"engine needs about {ENGINE_SIZES[kind].disk_gb:g} GB", "user",
                              "free disk space or choose an environment folder on another disk")

    # -- running ---------------------------------------------------------------------------
    def run(self) -> InstallResult:
        """Install; never raises (the result says what went wrong, what is broken and what to do)."""
        started = time.monotonic()
        outcome = None
        try:
            state, why = self.inspect()
            if state == "foreign":
                raise EngineError(f"{why}; nothing was changed", "user",
                                  "choose an empty or new folder as the environment folder")
            if state == "replace":
                self._remove(why)
            elif state == "repair":
                self.action = "repaired"
                self.log(f"repairing the environment at {self.options.venv} ({why}): reinstalling torch/torchvision "
                         "with the pins, and hqrs_geo")
            else:
                self.action = "created"
            outcome = self._install(repair=state == "repair")
            if not outcome.ok and state == "repair" and not self.is_cancelled():
                self.log(f"the repaired environment still fails ({outcome.summary})")
                self._remove("repairing did not make it work")
                outcome = self._install(repair=False)
            if not outcome.ok:
                raise self._self_test_error(outcome)
            size = folder_size(self.options.venv)
            info = self._probe()
            message = (f"engine {self.action if self.action != 'created' else 'installed'} and self-tested: "
                       f"{info}; {gigabytes(size)} on disk" + "".join(f"; {note}" for note in self.notes))
            self.log(f"engine OK: {message}")
            self.on_progress(100.0, "done")
            return InstallResult(True, self.options.python, message, time.monotonic() - started, self.lines,
                                 self.action, size, outcome)
        except EngineError as exc:
            error = self._explain(exc)
            message = error.text
            self.log(f"FAILED: {message}")
            return InstallResult(False, self.options.python, message, time.monotonic() - started, self.lines,
                                 self.action, 0, outcome, error)

    def _install(self, repair: bool):
        """The steps, then the self-test (returns :class:`engine.SelfTest`)."""
        steps = plan(self.options, repair=repair)
        if not repair:
            kind = "reuse" if self.options.torch == "reuse" else ("cuda" if self.options.torch == "cuda"
                                                                   or self.options.gpu else "cpu")
            if kind == "cpu" and not self.options.no_index and not index_reachable(self.options.cpu_index_url):
                kind = "cuda"  # PyPI's build will come instead
            self._check_disk(kind)
        total = sum(step.weight for step in steps) + 1.0
        done = 0.0
        for step in steps:
            self.percent = 100.0 * done / total
            self.on_progress(self.percent, step.title)
            self.run_step(step)
            done += step.weight
        if self.is_cancelled():
            raise EngineError("cancelled: the environment may be half installed; 'Install engine' repairs it",
                              "cancelled")
        self.on_progress(100.0 * done / total, "Self-test of the engine")
        self.log(f"== Self-test of the engine in {self.options.python}")
        checks = self.options.self_test_checks or engine.SELF_TEST_CHECKS
        outcome = engine.self_test(self.options.python, checks, on_line=self.log)
        if not outcome.ok and outcome.detail:
            self.log(outcome.detail.rstrip())
        self.log(outcome.summary)
        return outcome

    def _probe(self) -> str:
        engine.forget(self.options.python)
        info = engine.probe(self.options.python, use_cache=False)
        if not info.installed:  # a device the machine lacks is a setting to change, not a failed install
            raise info.problem or EngineError("the engine probe failed", "engine")
        if info.device_problem is not None:
            self.log(f"engine installed; {info.device_problem}")
        return info.summary

    def _self_test_error(self, outcome) -> EngineError:
        """What is broken and what to do, from a failed self-test."""
        constraints = self.options.constraints_path()
        pins = read_pins(constraints)
        versions = outcome.versions
        where = engine.CHECK_NAMES.get(outcome.failed, outcome.failed)
        headline = f"engine self-test failed at {where}: {outcome.error}"
        have = {name: versions.get(name) for name in TORCH_PACKAGES}
        pair = " with ".join(f"{name} {have[name] or '(none)'}" for name in TORCH_PACKAGES)
        if outcome.failed in ("torch", "torchvision"):
            matches = all((have[name] or "").split("+")[0] == pins.get(name) for name in TORCH_PACKAGES if name in pins)
            if not matches:
                command = shlex.join([self.options.python, "-m", "pip", "install", "--force-reinstall", "-c",
                                      constraints, "--index-url", self.options.cpu_index_url, *TORCH_PACKAGES])
                fix = (f"{pair} is not the pinned pair ({pins_text(pins)}): 'Install engine' repairs the environment "
                       f"(reinstalls the pinned pair), or in a terminal: {command}")
            else:
                fix = (f"{pair} is the pinned pair, yet it does not run on this computer: choose the other PyTorch "
                       "build (CPU or CUDA) or another Python under Advanced ▸ 'Create it with', and send the log "
                       "(the traceback above) to the developers")
        elif outcome.failed in ("open_clip", "hqrs_geo"):
            fix = (f"importing {outcome.failed} fails in {self.options.python} ({pair}): 'Install engine' repairs the "
                   "environment (reinstalls torch, torchvision and hqrs_geo with the pins); if that fails too, tick "
                   "'Replace the environment' under Advanced")
        else:
            fix = (f"the wheel {self.options.wheel} installed but its shipped model does not run: choose another "
                   "hqrs_geo wheel ('hqrs_geo wheel' field) or rebuild the plugin zip with 'make plugin'")
        kept = f"the environment at {self.options.venv} ({gigabytes(folder_size(self.options.venv))}) is kept"
        return EngineError(headline, "engine", f"{fix}. {kept}; delete the folder to remove it")

    def _explain(self, exc: EngineError) -> EngineError:
        """The message the user sees for a failed installation (its real cause, what to do)."""
        if exc.kind == "cancelled" or exc.kind == "engine":
            return exc
        message = str(exc)
        offline = self.options.no_index and exc.kind in ("network", "not-found", "conflict")
        if exc.kind == "network" or offline:
            headline = (f"The wheel folders do not hold every package the engine needs ({message})"
                        if self.options.no_index else f"The package index cannot be reached from this computer "
                                                      f"({message})")
            try:
                constraints = self.options.constraints_path()
            except EngineError:
                constraints = "constraints.txt"
            wheel = self.options.wheel or "hqrs_geo"
            local = wheel.endswith(".whl") and "://" not in wheel
            files = f"{wheel} and {constraints}" if local else constraints
            command = shlex.join(wheel_folder_command("./" + os.path.basename(wheel) if local else wheel,
                                                      self.options.extras, os.path.basename(constraints)))
            return EngineError(OFFLINE_HELP.format(headline=headline, command=command, files=files,
                                                   python_version=self._version()), exc.kind)
        return exc

    def _version(self) -> str:
        return f"{sys.version_info[0]}.{sys.version_info[1]}"

    def run_step(self, step: Step) -> None:
        """One step (its fallback when its index cannot be reached or lacks the pinned build)."""
        if self.is_cancelled():
            raise EngineError("cancelled: the environment may be half installed; 'Install engine' repairs it",
                              "cancelled")
        self.log(f"== {step.title}")
        if step.call is not None:
            step.call(self.log)
            return
        if step.reachable and step.fallback is not None and not index_reachable(step.reachable):
            host = urllib.parse.urlsplit(step.reachable).hostname
            self.log(f"(no connection to {host}); trying: {step.fallback.title}")
            self._note(f"PyTorch came from PyPI ({host} could not be reached)")
            self.on_progress(self.percent, step.fallback.title)
            return self.run_step(step.fallback)
        assert step.argv is not None
        self.log("$ " + shlex.join(step.argv))
        env = {"PIP_TIMEOUT": str(PIP_TIMEOUT), "PIP_RETRIES": str(PIP_RETRIES), **os.environ}
        child = self._child = ChildProcess(step.argv, merge_stderr=True, env=env)
        child.start()
        output: list[str] = []

        def keep(line: str) -> None:
            output.append(line.rstrip())
            if output[-1]:
                self.log(output[-1])

        watch = StallWatch(child.pid, self.options.stall_seconds, self.options.step_seconds, STALL_BYTES)
        stalled = child.follow(keep, self.is_cancelled, watch, poll=0.2).stalled
        code = child.finish()
        self._child = None
        if self.is_cancelled():
            raise EngineError("cancelled: the environment may be half installed; 'Install engine' repairs it",
                              "cancelled")
        if stalled:
            hosts = sorted({urllib.parse.urlsplit(a).hostname or "" for a in step.argv if "://" in a} - {""})
            where = f" (from {', '.join(hosts)})" if hosts else ""
            raise EngineError(f"'{step.name or step.title}' {stalled}{where}: a download stalled; check the "
                              "connection and the wheel URL, then 'Install engine' again", "network")
        if code != 0:
            error = pip_error(output, code, step.name or step.title)
            if error.kind in ("not-found", "internal") and step.index and not index_reachable(step.index):
                error = EngineError(f"{error} (no connection to {urllib.parse.urlsplit(step.index).hostname})",
                                    "network")
            if error.kind in ("network", "not-found") and step.fallback is not None:
                self.log(f"({error}); trying: {step.fallback.title}")
                self._note(f"PyTorch came from PyPI (the CPU index: {error})")
                self.on_progress(self.percent, step.fallback.title)
                return self.run_step(step.fallback)
            raise error


_CONNECTION = ("Failed to establish a new connection", "Temporary failure in name resolution",
               "Network is unreachable", "Name or service not known", "ConnectTimeout", "ConnectTimeoutError",
               "Max retries exceeded", "ProxyError", "SSLError", "Connection refused", "Read timed out",
               "connection broken by")
_NOT_FOUND = ("No matching distribution found", "Could not find a version that satisfies")


def connection_reason(output: Sequence[str]) -> str:
    """``no connection to the index (ProxyError: Cannot connect to proxy. [Errno 111] Connection
    refused)`` from pip's last connection warning."""
    lines = [line for line in output if any(marker in line for marker in _CONNECTION)]
    if not lines:
        return "no connection to the index"
    last = lines[-1]
    parts = []
    broken = re.search(r"connection broken by '(\w+)\((?:'([^']*)')?", last)
    if broken:
        parts.append(broken.group(1) + (f": {broken.group(2)}" if broken.group(2) else ""))
    errno = re.search(r"\[Errno -?\d+\][^'\")]*", last)
    if errno:
        parts.append(errno.group(0).strip())
    return f"no connection to the index ({' '.join(parts) if parts else last.strip()[:200]})"


def pip_error(output: Sequence[str], code: int, title: str = "") -> EngineError:
    """One EngineError from a failed pip (or venv) step's output, carrying pip's last ``ERROR:``
    line; kinds: ``network`` (an index could not be reached), ``not-found`` (no matching
    distribution), ``conflict`` (the requirements clash with the pins), ``user`` or ``internal``."""
    text = "\n".join(output)
    if "No module named venv" in text or "ensurepip is not available" in text:
        return EngineError("this Python cannot create virtual environments (no venv/ensurepip)", "user",
                           "install them (Debian/Ubuntu: sudo apt install python3-venv) or choose another Python "
                           "under Advanced ▸ 'Create it with'")
    errors = [line.strip() for line in output if line.startswith("ERROR:")]
    tail = [line.strip() for line in output if line.strip()]
    line = errors[-1] if errors else (tail[-1] if tail else f"the step ended with status {code}")
    if len(errors) > 1 and any(marker in errors[-1] for marker in _NOT_FOUND):
        line = errors[-2] if "Could not find a version" in errors[-2] else line
    where = f"pip failed at '{title}': {line}" if title else f"pip failed: {line}"
    if "No space left on device" in text:
        return EngineError(where, "user", "free disk space or choose an environment folder on another disk")
    if any(marker in text for marker in _CONNECTION):
        return EngineError(f"pip failed at '{title}': {connection_reason(output)}", "network")
    if any(marker in text for marker in _NOT_FOUND):
        return EngineError(where, "not-found", "that index has no build of a pinned package for the environment's "
                           "Python and this platform: create the environment with another Python (3.10 or newer) "
                           "under Advanced ▸ 'Create it with', or install from a wheel folder")
    requested = [line.strip() for line in output if line.strip().startswith("The user requested")]
    constrained = [line.split("(constraint)", 1)[1].strip() for line in requested if "(constraint)" in line]
    if "ResolutionImpossible" in text and constrained and len(requested) == 2 * len(constrained):
        # pip's words when an index has no build matching a pin: "conflict: the user requested torch,
        # the user requested (constraint) torch==2.14.1"
        return EngineError(f"pip failed at '{title}': found no {', '.join(constrained)} to install "
                           "(pip: ResolutionImpossible)",
                           "not-found", "that index has no build of the pinned packages for the environment's "
                           "Python and this platform: create the environment with another Python (3.10 or newer) "
                           "under Advanced ▸ 'Create it with', or install from a wheel folder")
    if "ResolutionImpossible" in text or "conflicting dependencies" in text:
        return EngineError(where, "conflict", "the hqrs_geo wheel's requirements clash with the pins in "
                           "constraints.txt: use the wheel and constraints.txt of the same plugin zip")
    return EngineError(where, "internal", "pip's full output is in the log above")
