"""Plugin metadata, layout, zip and entry point, loaded through QGIS' own plugin machinery."""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
from conftest import ROOT

REQUIRED = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
            "repository", "tracker", "homepage", "category", "icon", "experimental")
ALGORITHMS = ("Tile raster", "Export chips", "Embed tiles", "Caption tiles", "Tile + embed + caption", "MpGI captions",
              "Export image-text dataset", "Text search", "Similar tiles", "Zero-shot classify")


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
    assert all(name in general["about"] for name in ALGORITHMS) and "10 algorithms" in general["about"]
    assert "10 algorithms" in general["changelog"]
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

    assert len(ALGORITHM_CLASSES) == 10


def test_importing_the_plugin_imports_neither_torch_nor_the_engine():
    code = ("import sys; from qgis.core import QgsApplication; app = QgsApplication([], False); "
            "import qgis_plugin.plugin, qgis_plugin.widgets.dock, qgis_plugin.widgets.settings_dialog, "
            "qgis_plugin.processing.provider, qgis_plugin.core.installer; "
            "print(sorted(m for m in ('torch', 'hqrs_geo', 'open_clip') if m in sys.modules))")
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip().splitlines()[-1] == "[]"


def test_make_plugin_builds_an_installable_zip_with_the_engine_wheel(tmp_path):
    make = ["make", "-s", "plugin", f"PLUGIN_ZIP={tmp_path / 'hqrs.zip'}", f"PLUGIN_PY={sys.executable}"]
    result = subprocess.run(make, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "hqrs.zip") as zf:
        names = zf.namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"hqrs_geo_plugin"}
    for required in ("metadata.txt", "__init__.py", "plugin.py", "icon.png", "LICENSE", "core/runner.py",
                     "core/registry.py", "processing/provider.py", "processing/algorithms/search.py",
                     "widgets/dock.py"):
        assert f"hqrs_geo_plugin/{required}" in names
    wheels = [n for n in names if n.startswith("hqrs_geo_plugin/engine/hqrs_geo-") and n.endswith(".whl")]
    assert len(wheels) == 1 and (ROOT / "dist" / wheels[0].split("/")[-1]).is_file()  # also beside the zip
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".so")) or "/tools/" in n]


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
