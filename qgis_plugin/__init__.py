"""QGIS plugin "HQRS Geo": the HQRS Processing provider, the HQRS search dock and the engine set-up.

Layout: ``plugin`` (what QGIS loads), ``core/`` (settings, the process runner, engine, search
sessions, installer, tasks, tile layers, rasters, styles, the generated model registry),
``processing/`` (provider, base, params, algorithms) and ``widgets/`` (dock, settings, engine
set-up). Nothing here imports hqrs_geo or torch: the engine runs in a Python environment of its
own, driven through the ``hqrs-geo`` CLI.
"""
from __future__ import annotations


def classFactory(iface):  # noqa: N802 - name required by QGIS
    """Called by QGIS to create the plugin instance."""
    from .plugin import HqrsPlugin

    return HqrsPlugin(iface)
