"""Tile layers put in the QGIS project for one test and taken out again."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qgis.core import QgsProject, QgsVectorLayer


@contextmanager
def tile_layer_in_project(path: str | Path, name: str = "tiles") -> Iterator[QgsVectorLayer]:
    """The ``tiles`` table of the GeoPackage ``path`` as a project layer, removed on exit."""
    layer = QgsVectorLayer(f"{path}|layername=tiles", name, "ogr")
    assert layer.isValid(), path
    QgsProject.instance().addMapLayer(layer)
    try:
        yield layer
    finally:
        QgsProject.instance().removeMapLayer(layer.id())
