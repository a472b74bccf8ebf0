"""Render a scene with its tile layer styled by a text-search score to a PNG (used in the README).

    python examples/render_search_map.py TILES.gpkg "a river with a bridge" map.png [--k 20]

The raster of the tiles' source is drawn under the tiles; the top-k tiles are coloured by
score (purple to yellow), the others are not drawn. Runs headless (QT_QPA_PLATFORM=offscreen).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def render(layer_path: str, query: str, png: str, k: int = 20, size: int = 900) -> dict:
    """Search, style, render; returns a summary (top tile, score range)."""
    from qgis.core import (
        QgsApplication,
        QgsClassificationEqualInterval,
        QgsFillSymbol,
        QgsGradientColorRamp,
        QgsGraduatedSymbolRenderer,
        QgsMapRendererParallelJob,
        QgsMapSettings,
        QgsRasterLayer,
        QgsVectorLayer,
    )
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor

    from hqrs_geo.search.session import SearchSession

    app = QgsApplication.instance() or QgsApplication([], False)
    app.initQgis()
    results = SearchSession(layer_path).search_text(query, k=k)
    tiles = QgsVectorLayer(f"{layer_path}|layername=tiles", "tiles", "ogr")
    scene = QgsRasterLayer(results.source.iloc[0], "scene")
    if not tiles.isValid() or not scene.isValid():
        raise SystemExit(f"cannot open {layer_path} or its scene")
    pairs = ", ".join(f"'{r.tile_id}', {r.score:.6f}" for r in results.itertuples())
    renderer = QgsGraduatedSymbolRenderer(f'map_get(map({pairs}), "tile_id")')
    symbol = QgsFillSymbol.createSimple({"outline_color": "255,255,255", "outline_width": "0.3"})
    symbol.setOpacity(0.55)
    renderer.setSourceSymbol(symbol)
    renderer.setSourceColorRamp(QgsGradientColorRamp(QColor(68, 1, 84), QColor(253, 231, 37)))  # viridis ends
    renderer.setClassificationMethod(QgsClassificationEqualInterval())
    renderer.updateClasses(tiles, 5)
    tiles.setRenderer(renderer)
    settings = QgsMapSettings()
    settings.setLayers([tiles, scene])
    settings.setDestinationCrs(tiles.crs())
    settings.setExtent(scene.extent())
    settings.setOutputSize(QSize(size, size))
    settings.setBackgroundColor(QColor(255, 255, 255))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    if not job.renderedImage().save(png, "PNG"):
        raise SystemExit(f"cannot write {png}")
    return {"top": results.tile_id.iloc[0], "min": float(results.score.min()), "max": float(results.score.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layer")
    parser.add_argument("query")
    parser.add_argument("png")
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    summary = render(args.layer, args.query, args.png, args.k)
    print(f"{args.png}: top tile {summary['top']}, scores {summary['min']:.3f}..{summary['max']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
