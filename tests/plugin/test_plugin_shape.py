"""Plugin metadata, layout, zip and entry point, loaded through QGIS' own plugin machinery."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
from conftest import ROOT

REQUIRED = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
            "category", "icon", "experimental")  # no homepage/repository/tracker: no public repository yet
ALGORITHMS = ("Tile raster", "Export chips", "Embed tiles", "Caption tiles", "Tile + embed + caption", "MpGI captions",
              "Export image-text dataset", "Text search", "Similar tiles", "Zero-shot classify", "Detect from examples",
              "Compare two dates")


def test_metadata_is_complete_and_current():
    meta = configparser.ConfigParser()
    meta.read(ROOT / "metadata.txt")
    general = meta["general"]
    for key in REQUIRED:
        assert general.get(key, "").strip(), key
    assert general["qgisMinimumVersion"] == "3.22"
    assert (ROOT / "qgis_plugin" / general["icon"]).exists()  # relative to the plugin folder
    assert general["hasProcessingProvider"] == "yes"
    assert general["category"] == "Raster"  # and the menu is Raster ▸ HQRS (see below)
    assert all(name in general["about"] for name in ALGORITHMS) and "12 algorithms" in general["about"]
    assert "12 algorithms" in general["changelog"]
    assert "pip install" not in general["about"]  # the plugin installs its engine itself
    import hqrs_geo

    assert general["version"] == hqrs_geo.__version__


def test_layout_and_texts():
    package = ROOT / "qgis_plugin"
    for folder in ("core", "processing", "processing/algorithms", "widgets"):
        assert (package / folder / "__init__.py").is_file(), folder
    assert not list(package.glob("alg_*.py")) and not (package / "search_client.py").exists()
    text = "\n".join(p.read_text(encoding="utf-8") for p in package.rglob("*.py"))
    assert "later release" not in text and "subprocess.Popen(" in (package / "core" / "runner.py").read_text()
    assert text.count("subprocess.Popen(") == 1  # one process runner
    assert text.count("def parse_error(") == 1 and text.count('"hqrs-geo: error: "') == 1  # one error parser
    from qgis_plugin.processing.algorithms import ALGORITHM_CLASSES

    assert len(ALGORITHM_CLASSES) == 12


def test_importing_the_plugin_imports_neither_torch_nor_the_engine():
    code = ("import sys; from qgis.core import QgsApplication; app = QgsApplication([], False); "
            "import qgis_plugin.plugin, qgis_plugin.widgets.dock, qgis_plugin.widgets.settings_dialog, "
            "qgis_plugin.processing.provider, qgis_plugin.core.installer; "
            "print(sorted(m for m in ('torch', 'hqrs_geo', 'open_clip') if m in sys.modules))")
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip().splitlines()[-1] == "[]"


def _tracked_state(paths: list[str]) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of the tracked files under ``paths`` (relative to the repository)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split("\0")
    return {name: ((ROOT / name).stat().st_mtime_ns, (ROOT / name).stat().st_size)
            for name in listed if name and (ROOT / name).exists()}


def test_make_plugin_builds_an_installable_zip_with_the_engine_wheel_and_the_pins(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (to check that make plugin rewrites no tracked file)")
    # what a build could plausibly write to: the plugin's sources and the top-level files
    watched = ["qgis_plugin", "Makefile", "pyproject.toml", "constraints.txt", "metadata.txt", "LICENSE", "README.md"]
    before = _tracked_state(watched)
    # PY=false: the plugin build must not use the project's environment (.venv); it makes its own
    make = ["make", "-s", "plugin", f"PLUGIN_ZIP={tmp_path / 'hqrs.zip'}", "PY=false", f"VENV={tmp_path / 'no-venv'}"]
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull)
    result = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert _tracked_state(watched) == before  # nothing tracked rewritten (the model list is packaged as it is)
    assert not (tmp_path / "no-venv").exists()
    with zipfile.ZipFile(tmp_path / "hqrs.zip") as zf:
        names = zf.namelist()
        packaged = {name: zf.read(f"hqrs_geo_plugin/{name}") for name in ("core/registry.py", "engine/constraints.txt")}
    tops = {n.split("/")[0] for n in names}
    assert tops == {"hqrs_geo_plugin"}
    for required in ("metadata.txt", "__init__.py", "plugin.py", "icon.png", "LICENSE", "core/runner.py",
                     "core/registry.py", "processing/provider.py", "processing/algorithms/search.py",
                     "widgets/dock.py", "engine/constraints.txt"):
        assert f"hqrs_geo_plugin/{required}" in names
    wheels = [n for n in names if n.startswith("hqrs_geo_plugin/engine/hqrs_geo-") and n.endswith(".whl")]
    assert len(wheels) == 1 and (ROOT / "dist" / wheels[0].split("/")[-1]).is_file()  # also beside the zip
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".so")) or "/tools/" in n]
    # the committed model list and the project's pins (the installer resolves with them), byte for byte
    assert packaged["core/registry.py"] == (ROOT / "qgis_plugin" / "core" / "registry.py").read_bytes()
    assert packaged["engine/constraints.txt"] == (ROOT / "constraints.txt").read_bytes()
    assert b"torch==" in packaged["engine/constraints.txt"] and b"torchvision==" in packaged["engine/constraints.txt"]


def test_the_build_requirements_are_read_with_and_without_tomllib(tmp_path, monkeypatch):
    import tomllib

    from qgis_plugin.tools.build_requires import build_requires, main

    ours = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert build_requires(ROOT / "pyproject.toml") == ours and any(r.startswith("setuptools") for r in ours)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\n\n[build-system]\nbuild-backend = "b"\n'
                         'requires = ["setuptools >= 77", "wheel"]\n\n[tool.x]\nrequires = ["no"]\n')
    assert build_requires(pyproject) == ["setuptools >= 77", "wheel"]
    monkeypatch.setitem(sys.modules, "tomllib", None)  # Python 3.10: no tomllib
    assert build_requires(pyproject) == ["setuptools >= 77", "wheel"]
    assert build_requires(ROOT / "pyproject.toml") == ours
    pyproject.write_text('[project]\nname = "x"\n')
    with pytest.raises(ValueError, match="no \\[build-system\\] requires"):
        build_requires(pyproject)
    assert main([str(pyproject)]) == 1


_APP = None


class FakeIface:
    """Records where the plugin puts its actions."""

    def __init__(self):
        from qgis.gui import QgsMapCanvas, QgsMessageBar
        from qgis.PyQt.QtWidgets import QAction, QMainWindow

        self.window = QMainWindow()
        self.canvas = QgsMapCanvas()
        self.bar = QgsMessageBar()
        self.tips = QAction("tips")
        self.tips.setCheckable(True)
        self.raster_menu, self.plugin_menu, self.toolbar, self.docks = [], [], [], []

    def mainWindow(self):  # noqa: N802 - QGIS API
        return self.window

    def mapCanvas(self):  # noqa: N802
        return self.canvas

    def messageBar(self):  # noqa: N802
        return self.bar

    def actionMapTips(self):  # noqa: N802
        return self.tips

    def addDockWidget(self, area, dock):  # noqa: N802
        self.docks.append(dock)

    def removeDockWidget(self, dock):  # noqa: N802
        self.docks.remove(dock)

    def addPluginToRasterMenu(self, menu, action):  # noqa: N802
        self.raster_menu.append((menu, action.text()))

    def removePluginRasterMenu(self, menu, action):  # noqa: N802
        self.raster_menu.remove((menu, action.text()))

    def addPluginToMenu(self, menu, action):  # noqa: N802
        self.plugin_menu.append((menu, action.text()))

    def addToolBarIcon(self, action):  # noqa: N802
        self.toolbar.append(action.text())

    def removeToolBarIcon(self, action):  # noqa: N802
        self.toolbar.remove(action.text())


@pytest.fixture
def plugin_folder(tmp_path, monkeypatch):
    from qgis import utils
    from qgis.core import QgsApplication

    global _APP
    _APP = QgsApplication.instance() or QgsApplication([], False)
    # with its providers: a layer made before initQgis() creates the provider registry without them
    # (later tests in this process then get invalid WMS/XYZ layers)
    _APP.initQgis()
    plugin_dir = tmp_path / "hqrs_geo_plugin"
    shutil.copytree(ROOT / "qgis_plugin", plugin_dir, ignore=shutil.ignore_patterns("__pycache__", "tools"))
    shutil.copy(ROOT / "metadata.txt", plugin_dir / "metadata.txt")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(utils, "plugin_paths", [str(tmp_path)])
    monkeypatch.setenv("HQRS_GEO_ENGINE_DIR", str(tmp_path / "no-engine"))
    utils.updateAvailablePlugins()
    return plugin_dir


def test_plugin_loads_fast_starts_nothing_and_unloads(plugin_folder, monkeypatch):
    from qgis import utils
    from qgis.core import QgsApplication, QgsSettings

    iface = FakeIface()
    monkeypatch.setattr(utils, "iface", iface)
    QgsSettings().setValue("hqrs_geo/first_run_seen", True)
    assert "hqrs_geo_plugin" in utils.available_plugins
    started = time.perf_counter()
    assert utils.loadPlugin("hqrs_geo_plugin")
    registry = QgsApplication.processingRegistry()
    assert utils.startPlugin("hqrs_geo_plugin")
    load_s = time.perf_counter() - started
    print(f"\nplugin load + start: {load_s:.3f} s")
    assert load_s < 2.0
    assert registry.providerById("hqrs") is not None and registry.algorithmById("hqrs:tile") is not None
    assert iface.raster_menu == [("&HQRS", "HQRS search"), ("&HQRS", "Set up engine…"), ("&HQRS", "HQRS settings…")]
    assert iface.plugin_menu == [] and iface.toolbar == ["HQRS search"] and len(iface.docks) == 1
    assert utils.unloadPlugin("hqrs_geo_plugin")
    assert "hqrs_geo_plugin" not in utils.plugins and registry.providerById("hqrs") is None
    assert iface.raster_menu == [] and iface.toolbar == [] and iface.docks == []
    # reloading works
    assert utils.loadPlugin("hqrs_geo_plugin") and utils.startPlugin("hqrs_geo_plugin")
    assert registry.providerById("hqrs") is not None
    assert utils.unloadPlugin("hqrs_geo_plugin") and registry.providerById("hqrs") is None


def test_tile_layers_added_get_outlines_and_caption_tips_once(plugin_folder, monkeypatch, tmp_path):
    from conftest import EXAMPLE_SCENE
    from qgis import utils
    from qgis.core import QgsApplication, QgsProject, QgsSettings, QgsVectorLayer
    from qgis.PyQt.QtCore import Qt

    from hqrs_geo import TileConfig
    from hqrs_geo.api import tile

    iface = FakeIface()
    monkeypatch.setattr(utils, "iface", iface)
    QgsSettings().setValue("hqrs_geo/first_run_seen", True)
    path = tmp_path / "t.gpkg"
    tile(EXAMPLE_SCENE, path, TileConfig(tile_size=500))
    assert utils.loadPlugin("hqrs_geo_plugin") and utils.startPlugin("hqrs_geo_plugin")
    try:
        layer = QgsVectorLayer(f"{path}|layername=tiles", "tiles", "ogr")
        QgsProject.instance().addMapLayer(layer)
        for _ in range(5):
            QgsApplication.processEvents()
        assert layer.renderer().symbol().symbolLayer(0).brushStyle() == Qt.NoBrush
        assert '"tile_id"' in layer.mapTipTemplate() and iface.tips.isChecked()
        QgsProject.instance().removeMapLayer(layer.id())
        from qgis.core import QgsCategorizedSymbolRenderer

        styled = QgsVectorLayer(f"{path}|layername=tiles", "styled", "ogr")  # an analyst's own style stays
        styled.setRenderer(QgsCategorizedSymbolRenderer("row", []))
        QgsProject.instance().addMapLayer(styled)
        for _ in range(5):
            QgsApplication.processEvents()
        assert styled.renderer().type() == "categorizedSymbol"
        QgsProject.instance().removeMapLayer(styled.id())
    finally:
        assert utils.unloadPlugin("hqrs_geo_plugin")


def test_plugin_offers_every_decoding_the_engine_has():
    """The plugin keeps its own copy (it runs without the engine installed): read it with ast."""
    import ast

    from hqrs_geo.models.decoding_options import METHODS

    tree = ast.parse((ROOT / "qgis_plugin" / "processing" / "params.py").read_text())
    value = next(node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "DECODINGS" for t in node.targets))
    assert tuple(ast.literal_eval(value)) == tuple(METHODS)
