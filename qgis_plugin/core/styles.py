"""How HQRS layers look: tile layers as outlines over the imagery, search hits as outlines
coloured by score with rank labels, an optional semi-transparent score heat map.

A tile layer's own style is only set when it is first loaded with QGIS's default look (never
replaced afterwards); search results always go to layers of their own.
"""
from __future__ import annotations

from collections.abc import Sequence

from qgis.core import (
    QgsFeature,
    QgsField,
    QgsFillSymbol,
    QgsGeometry,
    QgsGraduatedSymbolRenderer,
    QgsPalLayerSettings,
    QgsRendererRange,
    QgsSingleSymbolRenderer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QColor, QFont

STYLED = "hqrs/styled"  # custom property: the plugin styled this layer once
TILE_MAP_TIP = ('<b>[% "tile_id" %]</b>[% CASE WHEN "caption" IS NOT NULL THEN \'<br>\' || "caption" ELSE \'\' END %]')
HIT_MAP_TIP = ('<b>#[% "rank" %]</b> score [% round("score", 3) %]<br><i>[% "tile_id" %]</i>'
               '[% CASE WHEN "caption" IS NOT NULL THEN \'<br>\' || "caption" ELSE \'\' END %]')
# score colours, low to high (colour-blind safe, visible on aerial imagery)
SCORE_COLOURS = ("#4575b4", "#74add1", "#fee090", "#f46d43", "#d73027")
HIT_FIELDS = (("rank", QVariant.Int), ("score", QVariant.Double), ("tile_id", QVariant.String),
              ("caption", QVariant.String))


def outline_symbol(colour: str = "#ffffff", width_mm: float = 0.3, alpha: int = 170) -> QgsFillSymbol:
    """A fill symbol that draws only its outline."""
    stroke = QColor(colour)
    stroke.setAlpha(alpha)
    symbol = QgsFillSymbol.createSimple({"style": "no", "outline_style": "solid", "outline_width": str(width_mm),
                                         "outline_width_unit": "MM"})
    symbol.symbolLayer(0).setStrokeColor(stroke)
    return symbol


def style_tile_layer(layer: QgsVectorLayer, force: bool = False) -> bool:
    """Outlines (no fill) and caption map tips for a tile layer, once: a layer the user (or a
    saved project) styled is left as it is. Returns True when it was styled now."""
    if layer.customProperty(STYLED) and not force:
        return False
    layer.setRenderer(QgsSingleSymbolRenderer(outline_symbol()))
    set_tile_map_tips(layer, force=True)
    layer.setCustomProperty(STYLED, "tiles")
    layer.triggerRepaint()
    return True


def set_tile_map_tips(layer: QgsVectorLayer, force: bool = False) -> None:
    """Map tips (and the display name of features) with the tile id and caption, unless the layer
    has map tips of its own."""
    current = layer.mapTipTemplate()
    if current and not force and not current.startswith('<b>[% "tile_id" %]'):
        return
    if layer.fields().indexOf("caption") >= 0:
        layer.setMapTipTemplate(TILE_MAP_TIP)
        layer.setDisplayExpression('"caption"')
    else:
        layer.setMapTipTemplate('<b>[% "tile_id" %]</b>')
        layer.setDisplayExpression('"tile_id"')


def score_ranges(scores: Sequence[float], symbol_for, classes: int = 5) -> list[QgsRendererRange]:
    """Equal-interval ranges over the scores, one symbol each (``symbol_for(colour)``)."""
    low, high = (min(scores), max(scores)) if scores else (0.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 1e-6, high + 1e-6
    count = max(1, min(classes, len(scores)))
    step = (high - low) / count
    colours = SCORE_COLOURS if count >= len(SCORE_COLOURS) else SCORE_COLOURS[-count:]
    ranges = []
    for i in range(count):
        lower, upper = low + i * step, (high if i == count - 1 else low + (i + 1) * step)
        ranges.append(QgsRendererRange(lower, upper, symbol_for(colours[i]), f"{lower:.3f} – {upper:.3f}"))
    return ranges


def hits_layer(name: str, crs, hits: Sequence[tuple[dict, QgsGeometry, str]], heat: bool = False) -> QgsVectorLayer:
    """A memory layer of ranked tiles: ``hits`` = (result, geometry, caption) in rank order.

    ``heat``: semi-transparent fills coloured by score (the heat map); else outlines coloured by
    score with rank labels.
    """
    layer = QgsVectorLayer(f"Polygon?crs={crs.authid() or crs.toWkt()}", name, "memory")
    if not crs.authid():
        layer.setCrs(crs)
    provider = layer.dataProvider()
    provider.addAttributes([QgsField(n, t) for n, t in HIT_FIELDS])
    layer.updateFields()
    features = []
    for result, geometry, caption in hits:
        feature = QgsFeature(layer.fields())
        feature.setGeometry(geometry)
        feature.setAttributes([int(result["rank"]), float(result["score"]), str(result["tile_id"]),
                               caption if caption else None])
        features.append(feature)
    provider.addFeatures(features)
    layer.updateExtents()
    style_hits(layer, [float(r["score"]) for r, _, _ in hits], heat)
    return layer


def style_hits(layer: QgsVectorLayer, scores: Sequence[float], heat: bool = False) -> None:
    """Score colours (outlines + rank labels, or heat-map fills) on a layer with rank/score fields."""
    if heat:
        def symbol_for(colour: str) -> QgsFillSymbol:
            return QgsFillSymbol.createSimple({"color": colour, "outline_style": "no"})
    else:
        def symbol_for(colour: str) -> QgsFillSymbol:
            return outline_symbol(colour, 0.9, 255)
    renderer = QgsGraduatedSymbolRenderer("score", score_ranges(scores, symbol_for))
    renderer.setSourceSymbol(symbol_for(SCORE_COLOURS[-1]))
    layer.setRenderer(renderer)
    if heat:
        layer.setOpacity(0.45)
        layer.setLabelsEnabled(False)
    else:
        layer.setLabeling(QgsVectorLayerSimpleLabeling(rank_labels()))
        layer.setLabelsEnabled(True)
    layer.setMapTipTemplate(HIT_MAP_TIP)
    layer.setDisplayExpression('"caption"' if layer.fields().indexOf("caption") >= 0 else '"tile_id"')
    layer.setCustomProperty(STYLED, "heat" if heat else "hits")
    layer.triggerRepaint()


def rank_labels() -> QgsPalLayerSettings:
    """Bold rank numbers with a dark halo in the middle of each hit."""
    text = QgsTextFormat()
    font = QFont()
    font.setBold(True)
    text.setFont(font)
    text.setSize(11)
    text.setColor(QColor("#ffffff"))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(1.2)
    buffer.setColor(QColor("#202020"))
    text.setBuffer(buffer)
    labels = QgsPalLayerSettings()
    labels.fieldName = "rank"
    labels.placement = QgsPalLayerSettings.OverPoint
    labels.setFormat(text)
    return labels
