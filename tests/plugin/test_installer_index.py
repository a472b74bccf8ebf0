"""The engine installer against a package index on 127.0.0.1, with real pip and real environments.

The index serves small stand-in wheels built here (no torch download): ``torch`` 2.13.0, 2.14.1
and 2.15.0 and ``torchvision`` 0.28.0 / 0.29.1 / 0.30.0, each torchvision requiring its own torch
(``==``), as the PyTorch CPU index (``/cpu/simple``, ``+cpu`` builds) and PyPI (``/pypi/simple``,
the "CUDA" builds) serve them; torchvision 0.28.0 is the broken build of issue 22 (its import
raises ``RuntimeError: operator torchvision::nms does not exist``). Left alone, pip takes the newest
pair (2.15.0 / 0.30.0); the installer must end with exactly the project's pinned pair
(``constraints.txt``: torch 2.14.1 / torchvision 0.29.1) from the CPU index, turn a broken import
into a failed QgsTask that carries the import's error text, and repair a broken environment in
place. The stand-ins implement what the self-test's torch/torchvision checks and the engine probe
use, so those run for real; the model checks need the real torch (the real self-test runs in
``test_plugin_installer.py``'s full installation).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import ROOT
from qgis.core import Qgis, QgsApplication
from qgis.gui import QgsMessageBar
from qgis_fixtures import qgis, wait_for  # noqa: F401  (fixtures)

from qgis_plugin.core import engine, installer, settings

LIGHT_CHECKS = ("torch", "torchvision", "open_clip", "hqrs_geo")  # the self-test without the real model
NMS_MISSING = "operator torchvision::nms does not exist"

TORCH_INIT = '''
__version__ = "{version}"
BUILD = "{build}"
float32 = "float32"
class _Version:
    cuda = {cuda}
version = _Version()
class _Cuda:
    @staticmethod
    def is_available():
        return False
    @staticmethod
    def device_count():
        return 0
cuda = _Cuda()
class _Backends:
    mps = None
backends = _Backends()
def get_num_threads():
    return 1
def tensor(data, dtype=None):
    return [list(row) if isinstance(row, (list, tuple)) else row for row in data]
'''
TORCHVISION_INIT = '__version__ = "{version}"\nfrom . import ops\n'
NMS = '''
def nms(boxes, scores, threshold):
    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
    kept = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if all(iou(boxes[i], boxes[k]) <= threshold for k in kept):
            kept.append(i)
    return kept
'''
BROKEN_TORCHVISION = f"raise RuntimeError({NMS_MISSING!r})\n"


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str], requires: tuple[str, ...] = (),
               extras: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel ``name-version-py3-none-any.whl`` with ``files`` and its metadata."""
    dist = f"{name.replace('-', '_')}-{version}"
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Provides-Extra: {extra}" for extra in extras] + [f"Requires-Dist: {r}" for r in requires]
    contents = dict(files)
    contents[f"{dist}.dist-info/METADATA"] = "\n".join(metadata) + "\n"
    contents[f"{dist}.dist-info/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: hqrs-tests\nRoot-Is-Purelib: true\n"
                                           "Tag: py3-none-any\n")
    record = []
    for path, text in contents.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    contents[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name_in_zip, text in contents.items():
            archive.writestr(name_in_zip, text)
    return path


def torch_wheel(folder: Path, version: str, build: str) -> Path:
    cuda = "None" if build == "cpu" else "'13.0'"
    return make_wheel(folder, "torch", version, {"torch/__init__.py": TORCH_INIT.format(version=version, build=build,
                                                                                          cuda=cuda)})


def torchvision_wheel(folder: Path, version: str, torch_version: str, broken: bool = False) -> Path:
    init = BROKEN_TORCHVISION if broken else TORCHVISION_INIT.format(version=version)
    return make_wheel(folder, "torchvision", version, {"torchvision/__init__.py": init, "torchvision/ops/__init__.py":
                                                       NMS}, requires=(f"torch=={torch_version}",))


class PackageIndex:
    """Two PEP 503 simple indexes on 127.0.0.1: ``/cpu/simple`` and ``/pypi/simple``; every
    request's path is recorded in :attr:`requests`."""

    def __init__(self, root: Path, projects: dict[str, dict[str, list[Path]]]):
        self.root = root
        for index, by_project in projects.items():
            for project, wheels in by_project.items():
                page = root / index / "simple" / project
                page.mkdir(parents=True, exist_ok=True)
                links = []
                for wheel in wheels:
                    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
                    links.append(f'<a href="/files/{quote(wheel.name)}#sha256={digest}">{wheel.name}</a><br>')
                (page / "index.html").write_text("<!DOCTYPE html><html><body>\n" + "\n".join(links) +
                                                 "\n</body></html>")
        self.requests: list[str] = []
        requests = self.requests

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                requests.append(self.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.cpu = f"{self.url}/cpu/simple"
        self.pypi = f"{self.url}/pypi/simple"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """The stand-in wheels and the two indexes serving them; also the stand-in hqrs_geo wheel."""
    root = tmp_path_factory.mktemp("index")
    files = root / "files"
    files.mkdir()
    cpu = {"torch": [torch_wheel(files, v + "+cpu", "cpu") for v in ("2.13.0", "2.14.1", "2.15.0")],
           "torchvision": [torchvision_wheel(files, "0.28.0+cpu", "2.13.0", broken=True),
                           torchvision_wheel(files, "0.29.1+cpu", "2.14.1"),
                           torchvision_wheel(files, "0.30.0+cpu", "2.15.0")]}
    pypi = {"torch": [torch_wheel(files, v, "cuda") for v in ("2.14.1", "2.15.0")],
            "torchvision": [torchvision_wheel(files, "0.29.1", "2.14.1"), torchvision_wheel(files, "0.30.0", "2.15.0")],
            "open-clip-torch": [make_wheel(files, "open_clip_torch", "3.3.0", {"open_clip/__init__.py":
                                                                               '__version__ = "3.3.0"\n'},
                                           requires=("torch>=2.0", "torchvision"))],
            "geo-dep": [make_wheel(files, "geo_dep", "1.0", {"geo_dep/__init__.py": "VALUE = 1\n"})]}
    hqrs = root / "hqrs"
    hqrs.mkdir()
    wheel = make_wheel(hqrs, "hqrs_geo", "0.1.0", {"hqrs_geo/__init__.py": '__version__ = "0.1.0"\nimport geo_dep\n'},
                       requires=("geo-dep>=1.0", 'torch>=2.4; extra == "models"',
                                 'torchvision>=0.19; extra == "models"', 'open-clip-torch>=3.3; extra == "models"'),
                       extras=("models", "mpgi"))
    served = PackageIndex(root, {"cpu": cpu, "pypi": pypi})
    served.wheel = wheel
    yield served
    served.close()


@pytest.fixture(autouse=True)
def room_on_disk(monkeypatch):
    """The disk check sees 100 GB free: the stand-in wheels are small, whatever the test machine's disk holds."""
    monkeypatch.setattr(installer, "free_space", lambda path: (Path(path), int(100e9)))


@pytest.fixture
def pip_env(monkeypatch, tmp_path):
    """pip sees only what a test gives it: no configuration file, no PIP_* variables, its own cache."""
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HQRS_GEO_ENGINE_DIR", str(tmp_path / "engine"))
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(p) / "nvidia-smi").exists()))  # no GPU: the CPU build


def options_for(index, venv: Path, **kw) -> installer.InstallOptions:
    kw = {"self_test_checks": LIGHT_CHECKS, "index_url": index.pypi, "cpu_index_url": index.cpu, **kw}
    return installer.InstallOptions(venv=str(venv), wheel=str(index.wheel), base_python=sys.executable, torch="auto",
                                    **kw)


def installed(venv: Path) -> dict[str, str]:
    """distribution -> version, as the environment's own Python sees them (and torch's BUILD)."""
    script = ("import json, importlib.metadata as m, torch; "
              "print(json.dumps({**{d.metadata['Name'].lower(): d.version for d in m.distributions()}, "
              "'build': torch.BUILD}))")
    out = subprocess.run([str(engine.venv_python(venv)), "-c", script], capture_output=True, text=True, check=True,
                         env={"PATH": os.environ["PATH"]})
    return json.loads(out.stdout)


def dist_infos(venv: Path, name: str) -> list[str]:
    site = next((venv / "lib").glob("python3*/site-packages"))
    return sorted(p.name for p in site.glob(f"{name}-*.dist-info"))


def ended(task) -> list[str]:
    """How ``task`` ends in QGIS's task manager (filled by its signals: the task is deleted after)."""
    how: list[str] = []
    task.taskCompleted.connect(lambda: how.append("complete"))
    task.taskTerminated.connect(lambda: how.append("failed"))
    return how


def test_every_pip_step_passes_the_pins_and_the_pinned_pair_is_installed(qgis, index, pip_env, tmp_path):
    # the index would mislead an unpinned pip: its newest pair is torch 2.15.0 / torchvision 0.30.0
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                    str(report), "--index-url", index.cpu, "torch", "torchvision"], check=True)
    unpinned = {item["metadata"]["name"]: item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert unpinned == {"torch": "2.15.0+cpu", "torchvision": "0.30.0+cpu"}

    venv = tmp_path / "engine"
    options = options_for(index, venv)
    assert options.self_test_checks != engine.SELF_TEST_CHECKS and installer.InstallOptions("v", "w").self_test_checks \
        is None  # the default self-test is the full one (model and embedding included)
    steps = installer.plan(options)
    constraints = str(ROOT / "constraints.txt")  # no plugin zip here: the source tree's pins
    pip_steps = [s for s in steps if s.argv and "pip" in s.argv]
    assert len(pip_steps) == 2 and all(s.argv[s.argv.index("-c") + 1] == constraints for s in pip_steps)
    assert all(s.fallback.argv[s.fallback.argv.index("-c") + 1] == constraints for s in pip_steps if s.fallback)

    result = installer.Installer(options).run()
    assert result.ok, "\n".join(result.log[-30:])
    versions = installed(venv)
    assert (versions["torch"], versions["torchvision"], versions["build"]) == ("2.14.1+cpu", "0.29.1+cpu", "cpu")
    assert versions["hqrs_geo"] == "0.1.0" and versions["open_clip_torch"] == "3.3.0"
    assert result.action == "created" and result.self_test.ok and result.self_test.passed[1][0] == "torchvision"
    assert "engine installed and self-tested: hqrs_geo 0.1.0, torch 2.14.1+cpu on cpu" in result.message
    assert "GB on disk" in result.message and 0 < result.size_bytes < 200e6
    # the hqrs_geo step found torch satisfied: nothing of torch/torchvision was fetched from PyPI
    assert not [path for path in index.requests if path.startswith("/pypi/simple/torch")]
    assert any("about 0.45 GB to download, 1.5 GB on disk" in line for line in result.log)


def test_a_broken_import_fails_the_task_with_its_error_and_a_retry_repairs_it(qgis, index, pip_env, tmp_path):
    from qgis_plugin.widgets.engine_setup import EngineSetupPanel

    bad = tmp_path / "bad-constraints.txt"  # the pair of issue 22: torchvision 0.28.0 has no nms for its torch
    bad.write_text("torch==2.13.0\ntorchvision==0.28.0\n")
    venv = tmp_path / "engine"
    bar = QgsMessageBar()
    logged: list[tuple[str, str, int]] = []
    QgsApplication.messageLog().messageReceived.connect(lambda text, tag, level: logged.append((text, tag, level)))
    previous = settings.value("interpreter")
    panel = EngineSetupPanel(message_bar=bar)
    assert "about 0.45 GB to download, 1.5 GB on disk" in panel.size.text()
    assert "torch 2.14.1 / torchvision 0.29.1" in panel.size.text()
    try:
        task = panel.install(options_for(index, venv, constraints=str(bad)))
        how = ended(task)
        wait_for(lambda: task.done, 240)
        wait_for(lambda: not panel.checking, 120)
        assert how == ["failed"]  # failed in QGIS's task list, not "complete"
        assert isinstance(task.error, installer.InstallFailed) and task.result is None
        result = task.error.result
        assert not result.ok and result.self_test.failed == "torchvision"
        assert f"RuntimeError: {NMS_MISSING}" in result.message
        assert f"RuntimeError: {NMS_MISSING}" in panel.step.text() and "Not installed" in panel.step.text()
        assert any(f"RuntimeError: {NMS_MISSING}" in item.text() for item in bar.items())
        assert bar.currentItem().level() == Qgis.Critical
        assert any(f"RuntimeError: {NMS_MISSING}" in text and tag == "HQRS" for text, tag, _ in logged)
        log = panel.log.toPlainText()
        assert "self-test: torchvision.ops.nms: FAILED" in log and "Traceback" in log
        # what is broken and what to do, not only the button
        assert "torch 2.13.0+cpu with torchvision 0.28.0+cpu" in result.message
        assert f"the environment at {venv}" in result.message and "is kept" in result.message
        assert installed(venv)["torchvision"] == "0.28.0+cpu"

        # the retry (the project's pins) repairs the environment in place
        task = panel.install(options_for(index, venv))
        how = ended(task)
        wait_for(lambda: task.done, 240)
        wait_for(lambda: not panel.checking, 120)
        log = panel.log.toPlainText()
        assert how == ["complete"] and task.error is None and task.result.ok, log[-3000:]
        assert f"repairing the environment at {venv}" in log and "reinstalling torch/torchvision with the pins" in log
        assert task.result.action == "repaired" and "engine repaired and self-tested" in panel.step.text()
        versions = installed(venv)
        assert (versions["torch"], versions["torchvision"]) == ("2.14.1+cpu", "0.29.1+cpu")
        assert dist_infos(venv, "torch") == ["torch-2.14.1+cpu.dist-info"]
        assert dist_infos(venv, "torchvision") == ["torchvision-0.29.1+cpu.dist-info"]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name != "pip-cache") == ["bad-constraints.txt", "engine"]
        assert settings.value("interpreter") == str(engine.venv_python(venv))
    finally:
        settings.set_value("interpreter", previous or "")
        engine.forget()
        panel.deleteLater()


def test_an_environment_repair_cannot_fix_is_replaced(qgis, index, pip_env, tmp_path):
    venv = tmp_path / "engine"
    assert installer.Installer(options_for(index, venv)).run().ok
    # a dependency that pip believes installed, its files gone: repairing (torch pair, hqrs_geo) leaves it broken
    site = next((venv / "lib").glob("python3*/site-packages"))
    shutil.rmtree(site / "geo_dep")
    result = installer.Installer(options_for(index, venv)).run()
    assert result.ok, "\n".join(result.log[-30:])
    log = "\n".join(result.log)
    assert "repairing the environment at" in log and "the repaired environment still fails" in log
    assert "ModuleNotFoundError: No module named 'geo_dep'" in log
    assert f"replacing the broken environment at {venv} (repairing did not make it work)" in log
    assert result.action == "replaced" and installed(venv)["torch"] == "2.14.1+cpu"
    assert [p.name for p in tmp_path.iterdir() if p.name != "pip-cache"] == ["engine"]  # one environment
    # a folder that is not an environment is never deleted
    other = tmp_path / "documents"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    result = installer.Installer(options_for(index, other)).run()
    assert not result.ok and "is not a Python environment" in result.message and "nothing was changed" in result.message
    assert (other / "notes.txt").read_text() == "keep me"


def test_a_dead_environment_is_replaced_and_an_unreachable_cpu_index_gives_pypis_cuda_build(qgis, index, pip_env,
                                                                                             tmp_path):
    venv = tmp_path / "engine"  # an environment whose Python is gone (e.g. QGIS's Python was upgraded)
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (venv / "lib" / "leftover.txt").parent.mkdir()
    (venv / "lib" / "leftover.txt").write_text("x" * 1000)
    options = options_for(index, venv, cpu_index_url="http://127.0.0.1:9/whl/cpu")  # nothing listens there
    result = installer.Installer(options).run()
    assert result.ok, "\n".join(result.log[-30:])
    log = "\n".join(result.log)
    assert f"replacing the broken environment at {venv} (its Python {engine.venv_python(venv)} is missing)" in log
    assert result.action == "replaced" and not (venv / "lib" / "leftover.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "pip-cache"] == ["engine"]  # one environment
    assert "(no connection to 127.0.0.1); trying: PyTorch from PyPI" in log
    cuda = installer.ENGINE_SIZES["cuda"]
    assert f"on Linux PyPI's build is the large CUDA one: about {cuda.download_gb:g} GB to download, " \
        f"{cuda.disk_gb:g} GB on disk" in log
    assert "PyTorch came from PyPI" in result.message
    versions = installed(venv)
    assert (versions["torch"], versions["torchvision"], versions["build"]) == ("2.14.1", "0.29.1", "cuda")


def test_a_wheel_folder_made_by_the_documented_command_installs_offline(qgis, index, pip_env, tmp_path):
    folder = tmp_path / "hqrs-wheels"
    command = installer.wheel_folder_command(str(index.wheel), ("models", "mpgi"), str(ROOT / "constraints.txt"),
                                             folder=str(folder), python=sys.executable, cpu_index=index.cpu,
                                             index=index.pypi)
    subprocess.run(command, check=True, capture_output=True)
    names = sorted(p.name for p in folder.iterdir())
    assert "torch-2.14.1+cpu-py3-none-any.whl" in names and "torchvision-0.29.1+cpu-py3-none-any.whl" in names
    assert index.wheel.name in names and not [n for n in names if n.startswith("torch-2.15")]
    # the plugin's documentation gives this command (with the real indexes)
    readme = (ROOT / "docs" / "qgis-plugin.md").read_text()
    from hqrs_geo import __version__

    documented = shlex.join(installer.wheel_folder_command(f"./hqrs_geo-{__version__}-py3-none-any.whl",
                                                           constraints="constraints.txt"))
    assert documented in readme
    venv = tmp_path / "engine"
    requests = len(index.requests)
    options = options_for(index, venv, find_links=(str(folder),), no_index=True)
    options.wheel = str(folder / index.wheel.name)
    result = installer.Installer(options).run()
    assert result.ok, "\n".join(result.log[-30:])
    assert len(index.requests) == requests  # nothing asked of the index
    assert installed(venv)["torch"] == "2.14.1+cpu"
    # a folder missing a package: the pip line that failed, and the one command that makes a folder
    (folder / "geo_dep-1.0-py3-none-any.whl").unlink()
    result = installer.Installer(installer.InstallOptions(
        venv=str(tmp_path / "second"), wheel=options.wheel, base_python=sys.executable, torch="cpu",
        find_links=(str(folder),), no_index=True, self_test_checks=LIGHT_CHECKS)).run()
    assert not result.ok and result.message.startswith("The wheel folders do not hold every package the engine needs")
    assert "geo-dep" in result.message.lower().replace("_", "-")
    assert "pip download -d hqrs-wheels -c constraints.txt --index-url https://download.pytorch.org/whl/cpu" in \
        result.message


def test_too_little_disk_space_stops_before_anything_is_created(index, pip_env, tmp_path, monkeypatch):
    monkeypatch.setattr(installer, "free_space", lambda path: (tmp_path, int(0.5e9)))
    venv = tmp_path / "engine"
    result = installer.Installer(options_for(index, venv)).run()
    cpu = installer.ENGINE_SIZES["cpu"]
    assert not result.ok and not venv.exists()
    assert result.message.startswith(f"0.50 GB free on the disk of {tmp_path}; the {cpu.label} engine needs about "
                                     f"{cpu.disk_gb:g} GB")
    assert "choose an environment folder on another disk" in result.message and "\n" not in result.message
