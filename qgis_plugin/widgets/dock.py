"""The "HQRS search" dock: type a query, press Enter, see the best tiles on the map."""
from __future__ import annotations

from typing import Dict, List, Optional

from qgis.core import QgsGradientColorRamp, QgsGraduatedSymbolRenderer, QgsMapLayerProxyModel, QgsVectorLayer
from qgis.gui import QgsMapLayerComboBox
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtWidgets import (
    QDockWidget, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSpinBox, QTableWidget, QTableWidgetItem,
    QVBoxLayout, QWidget,
)

from .search_client import SearchClient, SearchClientError


def layer_file(layer: QgsVectorLayer) -> Optional[str]:
    """The file behind a layer (``path|layername=…`` cut off), or None for non-file layers."""
    if layer is None or layer.providerType() != "ogr":
        return None
    return layer.source().split("|")[0]


class SearchDock(QDockWidget):
    """Query box, result table, and the selection/style/zoom that follow a search."""

    def __init__(self, iface, parent=None):
        super().__init__("HQRS search", parent)
        self.setObjectName("HqrsSearchDock")
        self.iface = iface
        self.clients: Dict[str, SearchClient] = {}
        body = QWidget()
        layout = QVBoxLayout(body)
        self.layer_box = QgsMapLayerComboBox()
        self.layer_box.setFilters(QgsMapLayerProxyModel.PolygonLayer)
        self.query = QLineEdit()
        self.query.setPlaceholderText("e.g. a river with a bridge — press Enter")
        self.k = QSpinBox()
        self.k.setRange(1, 1000)
        self.k.setValue(20)
        self.similar_button = QPushButton("Find similar to selection")
        row = QHBoxLayout()
        row.addWidget(QLabel("top"))
        row.addWidget(self.k)
        row.addWidget(self.similar_button)
        self.table = QTableWidget(0, 4)
        self.table.setHorizontalHeaderLabels(["rank", "score", "tile_id", "caption"])
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectRows)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        for widget in (self.layer_box, self.query):
            layout.addWidget(widget)
        layout.addLayout(row)
        layout.addWidget(self.table)
        layout.addWidget(self.status)
        self.setWidget(body)
        self.query.returnPressed.connect(self.search_text)
        self.similar_button.clicked.connect(self.search_similar)
        self.table.cellClicked.connect(self.zoom_to_row)
        self.layer_box.layerChanged.connect(self.prepare_layer)
        self.results: List[dict] = []

    # -- search -----------------------------------------------------------------------------
    def current_layer(self) -> Optional[QgsVectorLayer]:
        """The chosen tile layer."""
        return self.layer_box.currentLayer()

    def client(self) -> Optional[SearchClient]:
        """The search session of the current layer (started on first use)."""
        path = layer_file(self.current_layer())
        if path is None:
            self.show_status("choose a tile layer saved in a file (GeoPackage) with embeddings")
            return None
        if path not in self.clients:
            self.clients[path] = SearchClient(path)
        return self.clients[path]

    def search_text(self) -> None:
        """Enter pressed in the query box."""
        text = self.query.text().strip()
        if text:
            self.run_request({"text": text, "k": self.k.value()})

    def search_similar(self) -> None:
        """Tiles like the selected features."""
        layer = self.current_layer()
        if layer is None or layer.fields().indexOf("tile_id") < 0:
            return self.show_status("choose a tile layer first")
        ids = [f["tile_id"] for f in layer.selectedFeatures()]
        if not ids:
            return self.show_status("select one or more tiles first")
        self.run_request({"similar": ids, "k": self.k.value()})

    def run_request(self, payload: dict) -> None:
        """Send a request; show results or the one-line error."""
        client = self.client()
        if client is None:
            return
        if not client.running:
            self.show_status("starting the search session (loading the model)…")
        try:
            response = client.request(payload)
        except SearchClientError as exc:
            return self.show_status(f"search failed: {exc}")
        if "error" in response:
            return self.show_status(response["error"])
        self.results = response["results"]
        self.show_results()
        self.show_status(f"{len(self.results)} tiles in {response.get('seconds', 0):.3f} s")

    # -- presentation -----------------------------------------------------------------------
    def show_status(self, text: str) -> None:
        """One line under the table (and in the message bar for errors)."""
        self.status.setText(text)

    def _features_by_tile(self, layer: QgsVectorLayer) -> Dict[str, int]:
        wanted = {r["tile_id"] for r in self.results}
        return {f["tile_id"]: f.id() for f in layer.getFeatures() if f["tile_id"] in wanted}

    def show_results(self) -> None:
        """Fill the table, select the tiles, style the layer by score, set caption map tips."""
        layer = self.current_layer()
        fids = self._features_by_tile(layer)
        captions = {}
        if layer.fields().indexOf("caption") >= 0:
            captions = {f["tile_id"]: f["caption"] for f in layer.getFeatures(list(fids.values()))}
        self.table.setRowCount(len(self.results))
        for row, result in enumerate(self.results):
            values = [str(result["rank"]), f"{result['score']:.4f}", result["tile_id"], str(captions.get(result["tile_id"]) or "")]
            for col, value in enumerate(values):
                self.table.setItem(row, col, QTableWidgetItem(value))
        layer.selectByIds([fids[r["tile_id"]] for r in self.results if r["tile_id"] in fids])
        self.style_by_score(layer)

    def style_by_score(self, layer: QgsVectorLayer) -> None:
        """Graduated colours on the result score (an expression; the file is not modified)."""
        pairs = ", ".join(f"'{r['tile_id']}', {r['score']:.6f}" for r in self.results)
        expression = f'map_get(map({pairs}), "tile_id")'
        renderer = QgsGraduatedSymbolRenderer(expression)
        renderer.setSourceColorRamp(QgsGradientColorRamp(QColor(68, 1, 84), QColor(253, 231, 37)))
        renderer.updateClasses(layer, QgsGraduatedSymbolRenderer.EqualInterval, min(5, max(1, len(self.results))))
        layer.setRenderer(renderer)
        layer.triggerRepaint()

    def zoom_to_row(self, row: int, _column: int = 0) -> None:
        """Clicking a result zooms the map to its tile."""
        layer = self.current_layer()
        tile_id = self.table.item(row, 2).text()
        fid = self._features_by_tile(layer).get(tile_id)
        if fid is None:
            return
        canvas = self.iface.mapCanvas()
        extent = layer.getFeature(fid).geometry().boundingBox()
        extent = canvas.mapSettings().layerExtentToOutputExtent(layer, extent)
        extent.scale(1.5)
        canvas.setExtent(extent)
        canvas.refresh()

    def prepare_layer(self, layer) -> None:
        """A new layer was chosen: clear the results (its session starts with the first query)
        and, when it has captions, show them as map tips on hover."""
        self.results = []
        self.table.setRowCount(0)
        if isinstance(layer, QgsVectorLayer) and layer.fields().indexOf("caption") >= 0:
            layer.setMapTipTemplate('<b>[% "tile_id" %]</b><br>[% "caption" %]')
            layer.setDisplayExpression('"caption"')

    def close_sessions(self) -> None:
        """Stop every search process (plugin unload, QGIS exit)."""
        for client in self.clients.values():
            client.close()
        self.clients.clear()
