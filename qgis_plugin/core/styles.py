"""How HQRS layers look: tile layers as outlines over the imagery, search hits as outlines
coloured by score with rank labels, an optional semi-transparent score heat map, zero-shot
classes as semi-transparent class colours with a legend and class labels, detections as a
graduated style on their probability.

Score colours are absolute: fixed classes on the model's score scale (``score_scale`` of the
search session's ready message: at or below ``none`` no real match, at or above ``good`` a strong
match), so a query that matches nothing is never painted red. A tile layer's own style is only set
when it is first loaded with QGIS's default look (never replaced afterwards); results always go to
layers of their own.
"""
from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsFeature,
    QgsField,
    QgsFillSymbol,
    QgsGeometry,
    QgsGraduatedSymbolRenderer,
    QgsLayerTreeLayer,
    QgsPalLayerSettings,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsRendererCategory,
    QgsRendererRange,
    QgsSingleSymbolRenderer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtCore import Qt, QVariant
from qgis.PyQt.QtGui import QColor, QFont

STYLED = "hqrs/styled"  # custom property: the plugin styled this layer once
SCALE = "hqrs/score_scale"  # custom property of a hits layer: [none, good] its colours were drawn on
TILE_MAP_TIP = ('<b>[% "tile_id" %]</b>[% CASE WHEN "caption" IS NOT NULL THEN \'<br>\' || "caption" ELSE \'\' END %]')
HIT_MAP_TIP = ('<b>#[% "rank" %]</b> score [% round("score", 3) %]<br><i>[% "tile_id" %]</i>'
               '[% CASE WHEN "caption" IS NOT NULL THEN \'<br>\' || "caption" ELSE \'\' END %]')
# score colours, low to high: no real match (grey), then weak to strong (colour-blind safe, visible
# on aerial imagery)
SCORE_COLOURS = ("#9a9a9a", "#74add1", "#fee090", "#f46d43", "#d73027")
#: the score scale of a session whose ready message has none: cosine scores of a text and a tile
#: image (CLIP-like models) at or below ``none`` are no real match, at or above ``good`` a strong one
DEFAULT_SCORE_SCALE = {"none": 0.15, "good": 0.3}
#: the same for tile-to-tile ("find similar") scores, which run higher (two images)
DEFAULT_SIMILAR_SCALE = {"none": 0.5, "good": 0.85}
# zero-shot classes: Okabe-Ito (colour-blind safe) without black, then more distinct hues
CLASS_COLOURS = ("#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7", "#ffffff",
                 "#8dd3c7", "#bebada", "#fb8072", "#b3de69", "#fccde5", "#bc80bd", "#ccebc5", "#ffed6f")
CLASS_MAP_TIP = ('<b>[% "label" %]</b> [% round("label_score", 3) %]<br><i>[% "tile_id" %]</i>'
                 '[% CASE WHEN "label_top" IS NOT NULL THEN \'<br>\' || "label_top" ELSE \'\' END %]')
# detections: fixed probability classes (the last one ends at 1), yellow to red over the imagery
DETECTION_BREAKS = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DETECTION_COLOURS = ("#9a9a9a", "#ffffb2", "#fecc5c", "#fd8d3c", "#f03b20", "#bd0026")
DETECTION_FIELDS = ("detect_prob", "probability", "prob", "score")  # the probability field, first found
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


@dataclass(frozen=True)
class ScoreScale:
    """A model's fixed score scale: at or below ``none`` no real match, at or above ``good`` a strong one."""

    none: float
    good: float

    def is_match(self, score: float) -> bool:
        """True when ``score`` is above the no-match level."""
        return score > self.none


def score_scale(info: Mapping | None, similar: bool = False) -> ScoreScale:
    """The score scale of a search session from its ready message (``score_scale``: ``{"none",
    "good"}``); the defaults when the engine gives none (or a broken one). ``similar``: the scale of
    tile-to-tile scores (``score_scale["similar"]`` when the engine gives one)."""
    given = (info or {}).get("score_scale")
    if similar:
        given = given.get("similar") if isinstance(given, Mapping) else None
    default = DEFAULT_SIMILAR_SCALE if similar else DEFAULT_SCORE_SCALE
    try:
        none, good = float(given["none"]), float(given["good"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        none, good = default["none"], default["good"]
    if not good > none:
        none, good = default["none"], default["good"]
    return ScoreScale(none, good)


def score_ranges(scale: ScoreScale, symbol_for) -> list[QgsRendererRange]:
    """Five fixed ranges on the model's scale, one symbol each (``symbol_for(colour, index)``): no
    real match (at or below ``none``), three steps up to ``good``, strong (at or above ``good``).
    The same score has the same colour in every query."""
    step = (scale.good - scale.none) / 3
    cuts = [scale.none, scale.none + step, scale.none + 2 * step, scale.good]
    bounds = [(-1.0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], cuts[2]), (cuts[2], cuts[3] - 1e-9), (cuts[3], 1.0)]
    labels = [f"≤ {cuts[0]:.2f} no real match", f"{cuts[0]:.2f} – {cuts[1]:.2f} weak", f"{cuts[1]:.2f} – {cuts[2]:.2f}",
              f"{cuts[2]:.2f} – {cuts[3]:.2f} good", f"≥ {cuts[3]:.2f} strong match"]
    return [QgsRendererRange(low, high, symbol_for(SCORE_COLOURS[i], i), labels[i])
            for i, (low, high) in enumerate(bounds)]


def hits_layer(name: str, crs, hits: Sequence[tuple[dict, QgsGeometry, str]], heat: bool = False,
               scale: ScoreScale | None = None) -> QgsVectorLayer:
    """A memory layer of ranked tiles: ``hits`` = (result, geometry, caption) in rank order.

    ``heat``: semi-transparent fills coloured by score (the heat map); else outlines coloured by
    score with rank labels. Colours on ``scale`` (the model's; the default scale without one).
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
    style_hits(layer, heat, scale)
    return layer


def style_hits(layer: QgsVectorLayer, heat: bool = False, scale: ScoreScale | None = None) -> None:
    """Score colours (outlines + rank labels, or heat-map fills) on a layer with rank/score fields,
    in fixed classes of ``scale`` (:data:`DEFAULT_SCORE_SCALE` without one)."""
    if heat:
        def symbol_for(colour: str, index: int) -> QgsFillSymbol:
            fill = QColor(colour)
            if index == 0:
                fill.setAlpha(60)  # no real match: barely tinted
            return QgsFillSymbol.createSimple({"color": fill.name(QColor.HexArgb), "outline_style": "no"})
    else:
        def symbol_for(colour: str, index: int) -> QgsFillSymbol:
            symbol = outline_symbol(colour, 0.4 if index == 0 else 0.9, 200 if index == 0 else 255)
            if index == 0:  # no real match: dashed, unlike the tile layer's own outlines
                symbol.symbolLayer(0).setStrokeStyle(Qt.DashLine)
            return symbol
    scale = scale or score_scale(None)
    renderer = QgsGraduatedSymbolRenderer("score", score_ranges(scale, symbol_for))
    renderer.setSourceSymbol(symbol_for(SCORE_COLOURS[-1], len(SCORE_COLOURS) - 1))
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
    layer.setCustomProperty(SCALE, [scale.none, scale.good])
    layer.triggerRepaint()


def halo_text(size: float, bold: bool = True) -> QgsTextFormat:
    """White text with a dark halo: readable over any imagery."""
    text = QgsTextFormat()
    font = QFont()
    font.setBold(bold)
    text.setFont(font)
    text.setSize(size)
    text.setColor(QColor("#ffffff"))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(1.2)
    buffer.setColor(QColor("#202020"))
    text.setBuffer(buffer)
    return text


def rank_labels() -> QgsPalLayerSettings:
    """Bold rank numbers with a dark halo in the middle of each hit."""
    labels = QgsPalLayerSettings()
    labels.fieldName = "rank"
    labels.placement = QgsPalLayerSettings.OverPoint
    labels.setFormat(halo_text(11))
    return labels


# -- zero-shot classes --------------------------------------------------------------------------
def class_values(layer: QgsVectorLayer, labels: Sequence[str] = ()) -> list[str]:
    """The classes to draw: ``labels`` (the classifier's, in their order) that occur in the layer's
    ``label`` field, then any other value found there (an earlier run's), sorted."""
    index = layer.fields().indexOf("label")
    found = {str(v) for v in layer.uniqueValues(index) if v is not None and str(v) not in ("", "NULL")} \
        if index >= 0 else set()
    ordered = [label for label in dict.fromkeys(labels) if label in found]
    return ordered + sorted(found - set(ordered))


def style_classes(layer: QgsVectorLayer, labels: Sequence[str] = ()) -> None:
    """Zero-shot classes: one semi-transparent colour per ``label`` with a solid outline (the imagery
    shows through), the class name on each tile, a legend entry per class, map tips with the score
    and the runner-up classes. ``labels`` fixes the order (and so the colours) of the classes."""
    categories = []
    for i, value in enumerate(class_values(layer, labels)):
        colour = QColor(CLASS_COLOURS[i % len(CLASS_COLOURS)])
        fill = QColor(colour)
        fill.setAlpha(80)
        symbol = QgsFillSymbol.createSimple({"color": fill.name(QColor.HexArgb), "outline_style": "solid",
                                             "outline_width": "0.5", "outline_width_unit": "MM"})
        symbol.symbolLayer(0).setStrokeColor(colour)
        categories.append(QgsRendererCategory(value, symbol, value))
    renderer = QgsCategorizedSymbolRenderer("label", categories)
    layer.setRenderer(renderer)
    labels_settings = QgsPalLayerSettings()
    labels_settings.fieldName = "label"
    labels_settings.placement = QgsPalLayerSettings.OverPoint
    labels_settings.setFormat(halo_text(8, bold=False))
    layer.setLabeling(QgsVectorLayerSimpleLabeling(labels_settings))
    layer.setLabelsEnabled(True)
    if layer.fields().indexOf("label_score") >= 0:
        layer.setMapTipTemplate(CLASS_MAP_TIP)
    layer.setDisplayExpression('"label"')
    layer.setCustomProperty(STYLED, "classes")
    layer.triggerRepaint()


def classes_layer_uri(tiles_uri: str) -> str:
    """The data source of a zero-shot classes layer over a tile layer's source: its tiles that have
    a label (a source of its own, so QGIS never takes the tile layer itself for it)."""
    return f'{tiles_uri}|subset="label" IS NOT NULL'


def classes_layer_name(labels: Sequence[str]) -> str:
    """``classes: river, forest, parking lot`` (shortened when long)."""
    text = ", ".join(labels)
    return f"classes: {text if len(text) <= 60 else text[:59] + '…'}"


# -- detections ----------------------------------------------------------------------------------
def probability_field(layer: QgsVectorLayer) -> str | None:
    """The probability field of a detection layer (see :data:`DETECTION_FIELDS`)."""
    names = layer.fields().names()
    return next((name for name in DETECTION_FIELDS if name in names), None)


def detection_style(layer: QgsVectorLayer, field: str | None = None) -> None:
    """Few-shot detections: a graduated style on the probability (0..1) in fixed classes
    (:data:`DETECTION_BREAKS`: below 0.5 a thin grey outline, then yellow to dark red
    semi-transparent fills with solid outlines), readable over imagery; map tips with the
    probability. ``field``: the probability field (default: the first of :data:`DETECTION_FIELDS`
    the layer has)."""
    field = field or probability_field(layer)
    if field is None:
        raise ValueError(f"{layer.name()}: no probability field (one of {', '.join(DETECTION_FIELDS)})")
    ranges = []
    for i, colour in enumerate(DETECTION_COLOURS):
        low, high = DETECTION_BREAKS[i], DETECTION_BREAKS[i + 1]
        if i == 0:
            symbol = outline_symbol(colour, 0.3, 200)
            label = f"< {high:.1f}"
            high -= 1e-9
        else:
            fill = QColor(colour)
            fill.setAlpha(110)
            symbol = QgsFillSymbol.createSimple({"color": fill.name(QColor.HexArgb), "outline_style": "solid",
                                                 "outline_width": "0.6", "outline_width_unit": "MM"})
            symbol.symbolLayer(0).setStrokeColor(QColor(colour))
            label = f"{low:.1f} – {high:.1f}"
        ranges.append(QgsRendererRange(low, high, symbol, label))
    renderer = QgsGraduatedSymbolRenderer(field, ranges)
    renderer.setSourceSymbol(ranges[-1].symbol().clone())
    layer.setRenderer(renderer)
    names = layer.fields().names()
    tip = f'<b>[% round("{field}", 3) %]</b>'
    rank = next((n for n in ("detect_rank", "rank") if n in names), None)
    if rank:
        tip = f'<b>#[% "{rank}" %]</b> probability [% round("{field}", 3) %]'
    if "tile_id" in names:
        tip += '<br><i>[% "tile_id" %]</i>'
    if "caption" in names:
        tip += '[% CASE WHEN "caption" IS NOT NULL THEN \'<br>\' || "caption" ELSE \'\' END %]'
    layer.setMapTipTemplate(tip)
    layer.setCustomProperty(STYLED, "detections")
    layer.triggerRepaint()


# -- placing -------------------------------------------------------------------------------------
def above_imagery(layer: QgsVectorLayer, project: QgsProject | None = None) -> None:
    """Move ``layer`` in the layer tree above every raster layer of the project (to the top of the
    tree when a raster is above it), so it draws over the imagery."""
    project = project or QgsProject.instance()
    root = project.layerTreeRoot()
    node = root.findLayer(layer.id())
    if node is None:
        return
    order = [n.layer() for n in root.findLayers()]
    mine = order.index(layer) if layer in order else -1
    if not any(isinstance(other, QgsRasterLayer) for other in order[:max(mine, 0)]):
        return  # nothing drawn over it hides it
    clone = node.clone()
    if isinstance(clone, QgsLayerTreeLayer):
        root.insertChildNode(0, clone)
        parent = node.parent()
        if parent is not None:
            parent.removeChildNode(node)


def show_feature_counts(layer: QgsVectorLayer, project: QgsProject | None = None) -> None:
    """The legend shows each class's tile count, unfolded in the layers panel."""
    node = (project or QgsProject.instance()).layerTreeRoot().findLayer(layer.id())
    if node is not None:
        node.setCustomProperty("showFeatureCount", True)
        node.setExpanded(False)  # a node already marked expanded is not unfolded again by the view: toggle
        node.setExpanded(True)


def replace_classes_layers(layer: QgsVectorLayer, project: QgsProject | None = None) -> None:
    """Remove the earlier zero-shot classes layers of the same tile layer (a new run replaces them)."""
    project = project or QgsProject.instance()
    for other in list(project.mapLayers().values()):
        if other.id() != layer.id() and isinstance(other, QgsVectorLayer) \
                and other.customProperty(STYLED) == "classes" and other.source() == layer.source():
            project.removeMapLayer(other.id())


# -- change between two dates --------------------------------------------------------------------
#: change score (robust z of the embedding distance within the pair of scenes) classes: upper
#: bounds as multiples of the "changed" threshold, colours from clear to dark red
CHANGE_CLASSES = ((1 / 3, "#ffffff", "unchanged"), (2 / 3, "#fee08b", "little change"),
                  (1.0, "#fdae61", "some change"), (5 / 3, "#f46d43", "changed"),
                  (math.inf, "#b2182b", "strongly changed"))
NOT_COMPARED_COLOUR = "#8c8c8c"
NOT_COMPARED_VALUE = -1.0e9  # what the renderer's expression gives a tile without a change score
CHANGE_STYLE = "change"  # STYLED value of a change layer
CHANGE_MAP_TIP = ('[% CASE WHEN "change_score" IS NULL THEN \'<b>not compared</b>\' ELSE '
                  '\'<b>#\' || "change_rank" || \'</b> change score \' || round("change_score", 2) END %]'
                  '<br><i>[% "tile_id" %]</i>')


def change_ranges(threshold: float = 3.0) -> list[tuple[float, float, str, str]]:
    """(low, high, colour, legend text) of the change classes for ``threshold`` (the engine's
    ``--threshold``: a tile pair with a change score at or above it counts as changed)."""
    threshold = threshold if math.isfinite(threshold) and threshold > 0 else 3.0
    ranges, low = [], -math.inf
    for factor, colour, label in CHANGE_CLASSES:
        high = factor * threshold
        if math.isinf(low):
            text = f"{label} (< {high:.1f})"
        elif math.isinf(high):
            text = f"{label} (≥ {low:.1f})"
        else:
            text = f"{label} ({low:.1f} – {high:.1f})"
        ranges.append((low, high, colour, text))
        low = high
    return ranges


def change_style(layer: QgsVectorLayer, threshold: float | None = None) -> None:
    """A change layer (``change_score`` per tile pair): graduated on the change score, legend from
    "unchanged" (outline only, the imagery shows) through "little change", "some change",
    "changed" (from ``threshold``, the run's ``changed`` threshold; default: the layer's run record
    or 3) to "strongly changed" (semi-transparent yellow to dark red fills); tiles that were not
    compared (no change score) grey hatched; the rank of every changed tile as a label; map tips
    with the rank, score and the captions or classes of both dates."""
    names = layer.fields().names()
    if "change_score" not in names:
        raise ValueError(f"{layer.name()}: no change_score field; is it a change layer?")
    threshold = float(threshold) if threshold is not None else change_threshold(layer)
    ranges = []
    for i, (low, high, colour, text) in enumerate(change_ranges(threshold)):
        if i == 0:  # unchanged: a faint outline, nothing over the imagery
            symbol = outline_symbol("#ffffff", 0.2, 110)
        else:
            fill = QColor(colour)
            fill.setAlpha(70 + 25 * i)
            symbol = QgsFillSymbol.createSimple({"color": fill.name(QColor.HexArgb), "outline_style": "solid",
                                                 "outline_width": str(0.3 + 0.15 * i), "outline_width_unit": "MM"})
            symbol.symbolLayer(0).setStrokeColor(QColor(colour))
        top = 1.0e9 if math.isinf(high) else high - 1e-9
        ranges.append(QgsRendererRange(max(low, NOT_COMPARED_VALUE / 2), top, symbol, text))
    grey = QColor(NOT_COMPARED_COLOUR)
    hatched = QgsFillSymbol.createSimple({"color": grey.name(), "style": "b_diagonal", "outline_style": "solid",
                                          "outline_width": "0.3", "outline_width_unit": "MM"})
    hatched.symbolLayer(0).setStrokeColor(grey)
    ranges.append(QgsRendererRange(NOT_COMPARED_VALUE - 1, NOT_COMPARED_VALUE + 1, hatched, "not compared"))
    renderer = QgsGraduatedSymbolRenderer(f'coalesce("change_score", {NOT_COMPARED_VALUE:.0f})', ranges)
    renderer.setSourceSymbol(ranges[-2].symbol().clone())
    layer.setRenderer(renderer)
    labels = QgsPalLayerSettings()
    labels.isExpression = True
    if "change_rank" not in names:
        labels.fieldName = "''"
    elif "changed" in names:
        labels.fieldName = 'CASE WHEN "changed" THEN "change_rank" END'
    else:
        labels.fieldName = f'CASE WHEN "change_score" >= {threshold!r} THEN "change_rank" END'
    labels.placement = QgsPalLayerSettings.OverPoint
    labels.setFormat(halo_text(9))
    layer.setLabeling(QgsVectorLayerSimpleLabeling(labels))
    layer.setLabelsEnabled(True)
    tip = CHANGE_MAP_TIP
    if "class_change" in names:
        tip += '[% CASE WHEN "class_change" <> \'\' THEN \'<br>\' || "class_change" ELSE \'\' END %]'
    if "caption_before" in names and "caption_after" in names:
        tip += ("[% CASE WHEN \"caption_before\" IS NOT NULL OR \"caption_after\" IS NOT NULL THEN "
                "'<br>before: ' || coalesce(\"caption_before\", '—') || '<br>after: ' || "
                "coalesce(\"caption_after\", '—') ELSE '' END %]")
    for name, text in (("became_score", "became"), ("stopped_score", "stopped")):
        if name in names:
            tip += f'<br>{text} score [% round("{name}", 3) %]'
    layer.setMapTipTemplate(tip)
    layer.setDisplayExpression('"tile_id"')
    layer.setCustomProperty(STYLED, CHANGE_STYLE)
    layer.triggerRepaint()


def change_threshold(layer: QgsVectorLayer) -> float:
    """The ``changed`` threshold of a change layer: the run record's (``hqrs_runs`` of a GeoPackage,
    command ``change``), else the engine's default, 3."""
    parts = QgsProviderRegistry.instance().decodeUri(layer.providerType(), layer.source())
    path = str(parts.get("path") or "")
    if path.lower().endswith(".gpkg"):
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                rows = db.execute("SELECT params FROM hqrs_runs WHERE command = 'change' ORDER BY rowid DESC "
                                  "LIMIT 1").fetchall()
            value = float(json.loads(rows[0][0]).get("threshold")) if rows else math.nan
            if math.isfinite(value) and value > 0:
                return value
        except (sqlite3.Error, ValueError, TypeError, KeyError, IndexError):
            pass
    return 3.0
