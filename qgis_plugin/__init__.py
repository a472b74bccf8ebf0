"""QGIS plugin entry point for hqrs_geo (the Processing provider and dock come in a later release)."""
from __future__ import annotations


def classFactory(iface):  # noqa: N802 - name required by QGIS
    """Called by QGIS to create the plugin instance."""
    from .plugin import HqrsPlugin

    return HqrsPlugin(iface)
