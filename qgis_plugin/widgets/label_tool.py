"""The label map tool of few-shot detection: click a tile = positive, shift-click = negative,
click a labelled tile again = no label.

The tool only finds the tile under the click and says so (:attr:`LabelMapTool.tile_clicked`);
:mod:`.fewshot_panel` keeps the labels and draws them. :meth:`LabelMapTool.label_at` does the same
for a map point given in code (scripts, tests).
"""
from __future__ import annotations

from qgis.core import (
    QgsCoordinateTransform,
    QgsFeature,
    QgsFeatureRequest,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRectangle,
    QgsVectorLayer,
)
from qgis.gui import QgsMapCanvas, QgsMapTool
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QCursor


def tile_at(layer: QgsVectorLayer, point: QgsPointXY) -> QgsFeature | None:
    """The tile of ``layer`` containing ``point`` (in the layer's CRS); of overlapping tiles the
    one whose centre is nearest. None when no tile contains it."""
    request = QgsFeatureRequest().setFilterRect(QgsRectangle(point.x(), point.y(), point.x(), point.y()))
    where = QgsGeometry.fromPointXY(point)
    best, distance = None, float("inf")
    for feature in layer.getFeatures(request):
        geometry = feature.geometry()
        if geometry.isNull() or not geometry.contains(where):
            continue
        away = geometry.centroid().asPoint().distance(point)
        if away < distance:
            best, distance = QgsFeature(feature), away
    return best


class LabelMapTool(QgsMapTool):
    """Click = positive, shift-click = negative (a labelled tile: its label is removed, see
    :meth:`..core.detections.Labels.toggle`); emits ``tile_clicked(tile_id, geometry, negative)``
    with the tile's footprint in the layer's CRS."""

    tile_clicked = pyqtSignal(str, QgsGeometry, bool)
    missed = pyqtSignal()  # a click beside every tile

    def __init__(self, canvas: QgsMapCanvas, layer: QgsVectorLayer):
        super().__init__(canvas)
        self.layer = layer
        self.setCursor(QCursor(Qt.CrossCursor))

    def canvasReleaseEvent(self, event) -> None:  # noqa: N802 - QGIS API
        """A click: label the tile under it."""
        if event.button() != Qt.LeftButton:
            return
        self.label_at(event.mapPoint(), bool(event.modifiers() & Qt.ShiftModifier))

    def label_at(self, point: QgsPointXY, negative: bool = False) -> str | None:
        """What a click at ``point`` (in the map's CRS) does; returns the tile id found, or None."""
        try:
            crs = self.layer.crs()
        except RuntimeError:  # the layer was removed
            return None
        transform = QgsCoordinateTransform(self.canvas().mapSettings().destinationCrs(), crs,
                                           QgsProject.instance())
        feature = tile_at(self.layer, transform.transform(QgsPointXY(point)))
        if feature is None:
            self.missed.emit()
            return None
        tile_id = str(feature["tile_id"])
        self.tile_clicked.emit(tile_id, QgsGeometry(feature.geometry()), negative)
        return tile_id
