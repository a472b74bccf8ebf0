"""Few-shot detection in QGIS: the labelled example tiles, the ``detect`` request, and the two map
layers of the loop (labels as green/red outlines; detections as a graduated probability style).

The analyst marks tiles as positive (click) or negative (shift-click), the engine's search session
fits a light classifier on the embeddings of those tiles and scores every tile of the layer
(``{"op": "detect", …}``); the answer becomes the detection layer, which a refit after accepting or
rejecting detections updates in place (one layer, never a pile). Labels are saved with the tile
layer by the engine (``save_labels`` / ``labels``), so the work survives closing QGIS.

Nothing here talks to the engine: :mod:`..widgets.fewshot_panel` sends the requests as tasks.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsFeature,
    QgsField,
    QgsFillSymbol,
    QgsGeometry,
    QgsPalLayerSettings,
    QgsRectangle,
    QgsRendererCategory,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtCore import Qt, QVariant
from qgis.PyQt.QtGui import QColor, QFont

from . import styles

POSITIVE, NEGATIVE = 1, -1
POSITIVE_COLOUR, NEGATIVE_COLOUR = "#1a9641", "#d7191c"
DETECTIONS = "detections"  # styles.STYLED value of a detection layer
LABELS = "labels"  # styles.STYLED value of a labels layer
LAYER_PATH = "hqrs/detect-layer"  # custom property: the tile layer file a labels/detection layer belongs to
DETECT_FIELDS = (("tile_id", QVariant.String), ("detect_prob", QVariant.Double), ("detect_rank", QVariant.Int),
                 ("label", QVariant.Int), ("caption", QVariant.String))
LABEL_FIELDS = (("tile_id", QVariant.String), ("label", QVariant.Int))
DETECTION_MAP_TIP = ('<b>#[% "detect_rank" %]</b> probability [% round("detect_prob", 3) %]<br>'
                     '<i>[% "tile_id" %]</i>[% CASE WHEN "label" = 1 THEN \' (labelled positive)\' '
                     'WHEN "label" = -1 THEN \' (labelled negative)\' ELSE \'\' END %]'
                     '[% CASE WHEN "caption" IS NOT NULL THEN \'<br>\' || "caption" ELSE \'\' END %]')
METHODS = ("logistic", "query")


class DetectionError(ValueError):
    """A detection that cannot be asked for (one line: what is wrong and what to do)."""


class Labels:
    """The labelled example tiles of one tile layer: tile id -> +1 (positive) or -1 (negative),
    in the order they were given, with their footprints when known (for the labels layer)."""

    def __init__(self, positive: Iterable[str] = (), negative: Iterable[str] = ()):
        self.marks: dict[str, int] = {}
        self.geometries: dict[str, QgsGeometry] = {}
        for tile_id in positive:
            self.marks[str(tile_id)] = POSITIVE
        for tile_id in negative:
            self.marks[str(tile_id)] = NEGATIVE

    @property
    def positive(self) -> list[str]:
        """Tile ids labelled positive."""
        return [t for t, mark in self.marks.items() if mark == POSITIVE]

    @property
    def negative(self) -> list[str]:
        """Tile ids labelled negative."""
        return [t for t, mark in self.marks.items() if mark == NEGATIVE]

    def __len__(self) -> int:
        return len(self.marks)

    def label(self, tile_id: str) -> int | None:
        """+1, -1 or None (not labelled)."""
        return self.marks.get(str(tile_id))

    def set(self, tile_id: str, mark: int, geometry: QgsGeometry | None = None) -> None:
        """Label ``tile_id`` (a positive tile becomes negative and the other way round)."""
        if mark not in (POSITIVE, NEGATIVE):
            raise DetectionError(f"a label is {POSITIVE} (positive) or {NEGATIVE} (negative), not {mark!r}")
        tile_id = str(tile_id)
        self.marks.pop(tile_id, None)  # re-labelled tiles move to the end (most recent)
        self.marks[tile_id] = mark
        if geometry is not None and not geometry.isNull():
            self.geometries[tile_id] = QgsGeometry(geometry)

    def remove(self, tile_id: str) -> bool:
        """Forget the label of ``tile_id``; False when it had none."""
        return self.marks.pop(str(tile_id), None) is not None

    def toggle(self, tile_id: str, negative: bool = False, geometry: QgsGeometry | None = None) -> int | None:
        """A click on the map: an unlabelled tile becomes positive (``negative``: negative); a
        labelled tile loses its label. Returns the tile's label now."""
        if self.remove(tile_id):
            return None
        mark = NEGATIVE if negative else POSITIVE
        self.set(tile_id, mark, geometry)
        return mark

    def clear(self) -> None:
        """No labels."""
        self.marks.clear()

    def summary(self) -> str:
        """``3 positive · 2 negative``."""
        return f"{len(self.positive)} positive · {len(self.negative)} negative"


def detect_request(labels: Labels, k: int = 1000, threshold: float = 0.5, method: str = "logistic") -> dict:
    """The ``detect`` request for ``labels`` (the session's handle of a layer adds which layer);
    raises DetectionError when it cannot be asked yet."""
    if not labels.positive:
        raise DetectionError("no positive example yet: click tiles like the ones to find on the map "
                             "('Label tiles on map'), or add search hits as positives")
    if method not in METHODS:
        raise DetectionError(f"unknown detection method {method!r}: choose one of {', '.join(METHODS)}")
    if not 0.0 <= threshold <= 1.0:
        raise DetectionError(f"the threshold is a probability in 0..1, not {threshold}")
    return {"op": "detect", "positive": labels.positive, "negative": labels.negative,
            "method": method, "k": int(k), "threshold": float(threshold)}


@dataclass
class Detection:
    """One scored tile of a detection answer, with its footprint."""

    tile_id: str
    probability: float
    rank: int
    label: int | None
    caption: str
    geometry: QgsGeometry


def result_geometry(result: dict) -> QgsGeometry | None:
    """A result's footprint: its ``wkt``, else its ``bounds``; None when it has neither."""
    geometry = QgsGeometry.fromWkt(str(result.get("wkt") or ""))
    if geometry.isNull() or geometry.isEmpty():
        bounds = result.get("bounds") or []
        if len(bounds) != 4:
            return None
        geometry = QgsGeometry.fromRect(QgsRectangle(*(float(v) for v in bounds)))
    return geometry


def detections(results: Sequence[dict]) -> list[Detection]:
    """The results of a ``detect`` answer (in rank order) with footprints; results without one are left out."""
    found = []
    for result in results:
        geometry = result_geometry(result)
        if geometry is None:
            continue
        label = result.get("label")
        found.append(Detection(str(result["tile_id"]), float(result["score"]), int(result["rank"]),
                               int(label) if label in (POSITIVE, NEGATIVE) else None,
                               str(result.get("caption") or ""), geometry))
    return found


def _memory_layer(name: str, crs, fields: Sequence[tuple[str, QVariant.Type]], path: str) -> QgsVectorLayer:
    layer = QgsVectorLayer(f"Polygon?crs={crs.authid()}" if crs.authid() else "Polygon", name, "memory")
    if not crs.authid():
        layer.setCrs(crs)
    layer.dataProvider().addAttributes([QgsField(n, t) for n, t in fields])
    layer.updateFields()
    layer.setCustomProperty(LAYER_PATH, path)
    return layer


def detection_layer(name: str, crs, path: str) -> QgsVectorLayer:
    """An empty detection layer (memory: ``tile_id``, ``detect_prob``, ``detect_rank``, ``label``,
    ``caption``) for the tile layer file ``path``; fill it with :func:`fill_detection_layer`."""
    layer = _memory_layer(name, crs, DETECT_FIELDS, path)
    layer.setCustomProperty(styles.STYLED, DETECTIONS)
    return layer


def fill_detection_layer(layer: QgsVectorLayer, found: Sequence[Detection]) -> None:
    """Replace the features of a detection layer with ``found`` (a refit updates the same layer)
    and style it."""
    provider = layer.dataProvider()
    provider.truncate()
    features = []
    for item in found:
        feature = QgsFeature(layer.fields())
        feature.setGeometry(item.geometry)
        feature.setAttributes([item.tile_id, item.probability, item.rank, item.label, item.caption or None])
        features.append(feature)
    provider.addFeatures(features)
    layer.updateExtents()
    layer.removeSelection()
    style_detections(layer)


def style_detections(layer: QgsVectorLayer) -> None:
    """The plugin's graduated probability style of detections (:func:`..styles.detection_style`),
    with map tips that also say which tiles are labelled examples."""
    styles.detection_style(layer, "detect_prob")
    layer.setMapTipTemplate(DETECTION_MAP_TIP)
    layer.setDisplayExpression('"tile_id"')
    layer.setCustomProperty(styles.STYLED, DETECTIONS)
    layer.triggerRepaint()


def _text_format(colour: str, halo: str, size: float) -> QgsTextFormat:
    text = QgsTextFormat()
    font = QFont()
    font.setBold(True)
    text.setFont(font)
    text.setSize(size)
    text.setColor(QColor(colour))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(1.0)
    buffer.setColor(QColor(halo))
    text.setBuffer(buffer)
    return text


def labels_layer(name: str, crs, path: str) -> QgsVectorLayer:
    """An empty labels layer (memory: ``tile_id``, ``label``) for the tile layer file ``path``:
    positives as thick green outlines, negatives as thick red dashed outlines, with + / − marks."""
    layer = _memory_layer(name, crs, LABEL_FIELDS, path)
    categories = [QgsRendererCategory(POSITIVE, _outline(POSITIVE_COLOUR, Qt.SolidLine), "positive example"),
                  QgsRendererCategory(NEGATIVE, _outline(NEGATIVE_COLOUR, Qt.DashLine), "negative example")]
    layer.setRenderer(QgsCategorizedSymbolRenderer("label", categories))
    marks = QgsPalLayerSettings()
    marks.isExpression = True
    marks.fieldName = "CASE WHEN \"label\" = 1 THEN '+' ELSE '−' END"
    marks.placement = QgsPalLayerSettings.OverPoint
    marks.setFormat(_text_format("#ffffff", "#000000", 14))
    layer.setLabeling(QgsVectorLayerSimpleLabeling(marks))
    layer.setLabelsEnabled(True)
    layer.setMapTipTemplate('<b>[% "tile_id" %]</b>: [% CASE WHEN "label" = 1 THEN \'positive\' '
                            'ELSE \'negative\' END %] example')
    layer.setDisplayExpression('"tile_id"')
    layer.setCustomProperty(styles.STYLED, LABELS)
    return layer


def _outline(colour: str, pen: Qt.PenStyle) -> QgsFillSymbol:
    symbol = styles.outline_symbol(colour, 1.2, 255)
    symbol.symbolLayer(0).setStrokeStyle(pen)
    return symbol


def fill_labels_layer(layer: QgsVectorLayer, labels: Labels) -> int:
    """Replace the features of a labels layer with the labelled tiles whose footprint is known;
    returns how many are drawn."""
    provider = layer.dataProvider()
    provider.truncate()
    features = []
    for tile_id, mark in labels.marks.items():
        geometry = labels.geometries.get(tile_id)
        if geometry is None:
            continue
        feature = QgsFeature(layer.fields())
        feature.setGeometry(geometry)
        feature.setAttributes([tile_id, mark])
        features.append(feature)
    provider.addFeatures(features)
    layer.updateExtents()
    layer.triggerRepaint()
    return len(features)
