"""Plugin metadata and entry point, loaded through QGIS' own plugin machinery."""
from __future__ import annotations

import configparser
import shutil

from conftest import ROOT

REQUIRED = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email",
            "repository", "tracker", "homepage", "category", "icon", "experimental")


def test_metadata_is_complete():
    meta = configparser.ConfigParser()
    meta.read(ROOT / "metadata.txt")
    general = meta["general"]
    for key in REQUIRED:
        assert general.get(key, "").strip(), key
    assert general["qgisMinimumVersion"] == "3.22"
    assert (ROOT / "qgis_plugin" / general["icon"]).exists()  # relative to the plugin folder
    assert general["hasProcessingProvider"] == "yes"
    import hqrs_geo

    assert general["version"] == hqrs_geo.__version__


def test_plugin_loads_and_unloads_in_qgis(tmp_path, monkeypatch):
    from qgis import utils
    from qgis.core import QgsApplication

    app = QgsApplication.instance() or QgsApplication([], False)
    plugin_dir = tmp_path / "hqrs_geo_plugin"
    shutil.copytree(ROOT / "qgis_plugin", plugin_dir)
    shutil.copy(ROOT / "metadata.txt", plugin_dir / "metadata.txt")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(utils, "plugin_paths", [str(tmp_path)])
    utils.updateAvailablePlugins()
    assert "hqrs_geo_plugin" in utils.available_plugins
    assert utils.loadPlugin("hqrs_geo_plugin")
    registry = QgsApplication.processingRegistry()
    assert utils.startPlugin("hqrs_geo_plugin")
    assert registry.providerById("hqrs") is not None and registry.algorithmById("hqrs:tile") is not None
    assert utils.unloadPlugin("hqrs_geo_plugin")
    assert "hqrs_geo_plugin" not in utils.plugins and registry.providerById("hqrs") is None
    # reloading works
    assert utils.loadPlugin("hqrs_geo_plugin") and utils.startPlugin("hqrs_geo_plugin")
    assert registry.providerById("hqrs") is not None
    assert utils.unloadPlugin("hqrs_geo_plugin") and registry.providerById("hqrs") is None
    assert app is not None
