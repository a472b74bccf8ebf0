"""The engine installer, for real: the first-run path of an analyst whose QGIS Python has no
engine ends in a working search, without restarting QGIS.

The real installation creates a fresh virtual environment with Debian's /usr/bin/python3 (from the
plugin's own code, in a QgsTask), installs hqrs_geo from the wheel ``make plugin`` put into the
plugin zip and its dependencies from the package index (the machine's pip configuration; pip's
cache makes later runs quick), and takes PyTorch with the installer's ``torch="reuse"`` option:
it links the torch, torchvision, triton and NVIDIA libraries of this test's own environment
instead of downloading them (~5.5 GB), so the test stays within CI's time.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from conftest import EXAMPLE_SCENE, ROOT
from project_layers import tile_layer_in_project
from qgis.core import QgsSettings
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtTest import QTest
from qgis_fixtures import IfaceStandIn, qgis, wait_for  # noqa: F401  (fixtures)

from qgis_plugin.core import engine, installer, sessions, settings

pytestmark = pytest.mark.filterwarnings("error::DeprecationWarning:qgis_plugin", "error::ResourceWarning")


@pytest.fixture(autouse=True)
def room_on_disk(monkeypatch):
    """The disk check sees 100 GB free, whatever the test machine's disk holds."""
    monkeypatch.setattr(installer, "free_space", lambda path: (Path(path), int(100e9)))


def fake_nvidia_smi(folder: Path, name: str) -> None:
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho '{name}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_torch_is_chosen_for_the_machine(tmp_path, monkeypatch):
    options = installer.InstallOptions(venv=str(tmp_path / "env"), wheel="/w/hqrs_geo-0.1.0-py3-none-any.whl",
                                       base_python=sys.executable)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert installer.detect_nvidia_gpu() is None
    kind, reason = installer.choose_torch(options)
    assert kind == "cpu" and "no NVIDIA GPU" in reason
    steps = installer.plan(options)
    torch_step = next(s for s in steps if s.title.startswith("PyTorch"))
    constraints = str(installer.constraints_file())
    assert all(s.argv[s.argv.index("-c") + 1] == constraints for s in steps[1:])  # every pip step: the pins
    assert torch_step.fallback.argv[torch_step.fallback.argv.index("-c") + 1] == constraints
    assert installer.PYTORCH_CPU_INDEX in torch_step.argv and torch_step.fallback is not None
    assert installer.PYTORCH_CPU_INDEX not in torch_step.fallback.argv  # PyPI's build when the CPU index is away
    assert steps[-1].argv[-1] == "/w/hqrs_geo-0.1.0-py3-none-any.whl[models,mpgi]"
    fake_nvidia_smi(tmp_path, "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("PATH", str(tmp_path))
    kind, reason = installer.choose_torch(options)
    assert kind == "cuda" and "NVIDIA H100 80GB HBM3" in reason
    torch_step = next(s for s in installer.plan(options) if s.title.startswith("PyTorch"))
    assert "--index-url" not in torch_step.argv  # PyPI's Linux wheels are the CUDA build
    offline = installer.InstallOptions(venv=str(tmp_path / "env"), wheel="https://example.org/hqrs_geo-0.1.0.whl",
                                       torch="cpu", find_links=("/wheels",), no_index=True)
    argv = installer.plan(offline)[-1].argv
    assert argv[-1] == "hqrs_geo[models,mpgi] @ https://example.org/hqrs_geo-0.1.0.whl"
    assert "--no-index" in argv and argv[argv.index("--find-links") + 1] == "/wheels"


def test_unreachable_index_says_what_to_do(qgis, tmp_path, monkeypatch):
    """No index and no wheels: the installer fails fast and explains the offline install."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # not this machine's pip configuration (local wheels)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    empty = tmp_path / "wheels"
    empty.mkdir()
    wheel = str(tmp_path / "hqrs_geo-0.1.0-py3-none-any.whl")
    options = installer.InstallOptions(venv=str(tmp_path / "env"), wheel=wheel,
                                       base_python="/usr/bin/python3", torch="cpu", find_links=(str(empty),),
                                       no_index=True)
    result = installer.Installer(options).run()
    assert not result.ok
    assert result.message.startswith("The wheel folders do not hold every package the engine needs")
    assert "pip download" in result.message and "Only these folders" in result.message
    assert any(line.startswith("== Creating the environment") for line in result.log)
    # with the index behind a proxy that does not answer: the CPU index, then PyPI, then the advice
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "3")
    options.no_index, options.find_links = False, ()
    result = installer.Installer(options).run()
    assert not result.ok and result.message.startswith("The package index cannot be reached from this computer")
    assert "no connection to " in result.message  # the reason pip gave, not its ResolutionImpossible line
    assert "pip download -d hqrs-wheels -c constraints.txt" in result.message
    assert any("trying: PyTorch from PyPI" in line for line in result.log)
    assert not any(line.startswith("== Creating the environment") for line in result.log)  # it exists already


@pytest.fixture
def analyst_layer(tmp_path):
    """The example scene as 64 m tiles embedded with the shipped demo model (hqrs-mini-clip)."""
    from hqrs_geo import TileConfig
    from hqrs_geo.api import embed, tile
    from hqrs_geo.engine.options import RunOptions

    path = tmp_path / "river.gpkg"
    tile(EXAMPLE_SCENE, path, TileConfig(tile_size="64m"))
    embed(path, model="hqrs-mini-clip", device="cpu", options=RunOptions(workers=0))
    with tile_layer_in_project(path, "river tiles") as layer:
        yield layer


@pytest.fixture
def first_run(tmp_path, monkeypatch):
    """An analyst's QGIS: its Python (/usr/bin/python3, Debian's) has no engine, nothing installed."""
    python = "/usr/bin/python3"
    if not Path(python).exists() or engine.probe(python, use_cache=False).ok:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
        python = str(tmp_path / "bare" / "bin" / "python")
    monkeypatch.setenv("HQRS_GEO_ENGINE_DIR", str(tmp_path / "engine"))
    previous = QgsSettings().value(settings.key("interpreter"), None)
    settings.set_value("interpreter", python)
    yield python
    QgsSettings().setValue(settings.key("interpreter"), previous or "")
    engine.forget()


def test_first_run_installs_the_engine_and_searches_without_restarting(qgis, tmp_path, analyst_layer, first_run):
    from qgis_plugin.widgets.dock import SearchDock

    # the plugin zip and the engine's wheel inside it, as `make plugin` builds them
    zip_path = tmp_path / "hqrs.zip"
    built = subprocess.run(["make", "-s", "plugin", f"PLUGIN_ZIP={zip_path}", f"PLUGIN_PY={sys.executable}"],
                           cwd=ROOT, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    with zipfile.ZipFile(zip_path) as archive:
        wheel_name = next(n for n in archive.namelist() if n.startswith("hqrs_geo_plugin/engine/hqrs_geo-"))
        archive.extract(wheel_name, tmp_path / "plugin")
    wheel = tmp_path / "plugin" / wheel_name
    assert wheel.stat().st_size > 1_000_000  # with the shipped demo model's weights

    iface = IfaceStandIn()
    dock = SearchDock(iface)
    try:
        assert dock.set_layer(analyst_layer)
        QTest.keyClicks(dock.query, "a river")
        QTest.keyClick(dock.query, Qt.Key_Return)
        wait_for(lambda: dock.task.done, 120)
        assert "hqrs_geo" in dock.status.text() and "Set up engine" in dock.status.text()
        assert dock.pages.currentIndex() == 1  # the set-up page, in the dock
        options = installer.InstallOptions(
            venv=str(tmp_path / "engine"), wheel=str(wheel), base_python="/usr/bin/python3", torch="reuse",
            reuse_torch_from=sys.executable)
        started = time.monotonic()
        task = dock.setup_panel.install(options)
        wait_for(lambda: task.done, 1800)
        install_s = time.monotonic() - started
        log = dock.setup_panel.log.toPlainText()
        assert task.error is None and task.result.ok, log[-4000:]
        python = str(engine.venv_python(tmp_path / "engine"))
        assert settings.value("interpreter") == python and "engine installed" in dock.setup_panel.step.text()
        assert "Creating the environment" in log and "reusing the PyTorch" in log
        # the real self-test ran in the new environment: the shipped model loaded and embedded a tile
        assert task.result.self_test.checks == engine.SELF_TEST_CHECKS and task.result.self_test.ok
        assert "self-test: loading the shipped model hqrs-mini-clip: ok" in log
        assert "self-test: embedding one tile on the CPU: ok (one 64x64 tile embedded" in log
        assert "engine installed and self-tested" in dock.setup_panel.step.text() and "GB on disk" in log
        # the hqrs_geo step ran with the pins (derived from the reused torch, which is the pinned pair here)
        assert f"-c {tmp_path / 'engine' / 'hqrs-reused-constraints.txt'}" in log
        wait_for(lambda: dock.pages.currentIndex() == 0, 120)  # back to searching, no restart
        where = subprocess.run([python, "-c", "import hqrs_geo, torch; print(hqrs_geo.__file__)"],
                               capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, cwd=tmp_path)
        assert str(tmp_path / "engine") in where.stdout  # the wheel's copy, not the source tree
        timings = []
        for query in ("a river", "boats in a harbour"):
            dock.query.clear()
            QTest.keyClicks(dock.query, query)
            QTest.keyClick(dock.query, Qt.Key_Return)
            timings.append(wait_for(lambda: dock.task.done, 300))
            assert dock.table.rowCount() == 16, dock.status.text()  # 64 m tiles of a 250 m scene: 4 x 4
        assert [key.python for key in sessions.running_sessions()] == [python]
        assert dock.results_layer().name() == 'hits: "boats in a harbour"'
        print(f"\nengine install {install_s:.0f} s; first query {timings[0]:.1f} s, second {timings[1]:.2f} s")
    finally:
        dock.clear_results()
        dock.unload()
        shutil.rmtree(tmp_path / "engine", ignore_errors=True)
