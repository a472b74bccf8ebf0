"""The few-shot part of the search dock: label example tiles, "Find all like these", review, refit.

The loop: mark a few tiles as positive (click on the map with "Label tiles on map", or "Add
search hits as positives") and, optionally, some as negative (shift-click); "Find all like these"
sends a ``detect`` request to the dock's search session in a task (the GUI never waits; a newer
request replaces an older one and says so; Cancel stops it). The detection layer (probability,
rank; graduated colours over the imagery) lists every tile at or above the threshold; select
detections in the panel's table or on the map and Accept (they become positives) or Reject
(negatives), then Refit: the same layer is updated in place. "Save labels" stores the labels with
the tile layer (the engine's run record); they come back when the layer is used again, also after
QGIS was closed. "Export training set…" saves them and opens Export image-text dataset.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsLayerTreeGroup,
    QgsProject,
    QgsVectorLayer,
)
from qgis.gui import QgsCollapsibleGroupBox
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QObject, Qt, QTimer, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
)

from ..core import datasets, detections, sessions, tasks, tile_layers
from ..core.detections import NEGATIVE, POSITIVE, Detection, DetectionError, Labels
from ..core.runner import EngineError
from .label_tool import LabelMapTool

if TYPE_CHECKING:
    from .dock import Choice, SearchDock

MAX_DETECTIONS = 10_000  # the most tiles a detection returns (the engine's largest k)
TABLE_ROWS = 500  # detections listed in the panel's table (all are on the map)
COLUMNS = ("rank", "prob.", "", "tile")
RESULTS_GROUP = "HQRS results"  # the dock's group of result layers


class _Relay(QObject):
    status = pyqtSignal(str)


class FewShotPanel(QgsCollapsibleGroupBox):
    """Labels, detection and review for the dock's current tile layer (or dataset)."""

    def __init__(self, dock: SearchDock):
        super().__init__("Find all like these (few-shot)")
        self.setObjectName("HqrsFewShot")
        self.dock = dock
        self.labels_by_path: dict[str, Labels] = {}
        self.restored: set[str] = set()  # tile layers whose saved labels were asked for
        self.task: tasks.CallTask | None = None  # the newest detect request
        self.serial = 0  # detect requests made (an answer to an older one is dropped)
        self.side_tasks: list[tasks.CallTask] = []  # labels / save_labels requests
        self.tool: LabelMapTool | None = None
        self.found: list[Detection] = []
        self.found_path: str | None = None
        self.labels_layer_id: str | None = None
        self.relay = _Relay()
        self.relay.status.connect(self.show_status)
        self._build()
        dock.layer_box.currentIndexChanged.connect(self.choice_changed)
        QgsProject.instance().layersWillBeRemoved.connect(self.layers_removed)
        for signal in self._project_signals():  # the dock refreshes its list then (signals blocked)
            signal.connect(self.choice_changed_later)
        self.path = self.current_path()
        self.update_counts()

    # -- building ----------------------------------------------------------------------------
    def _build(self) -> None:
        layout = QVBoxLayout(self)
        self.counts = QLabel("")
        self.label_button = QToolButton()
        self.label_button.setText("Label tiles on map")
        self.label_button.setCheckable(True)
        self.label_button.setToolTip("Click a tile on the map: positive example (green); shift-click: negative "
                                     "(red); click a labelled tile again to remove its label")
        self.add_hits_button = QToolButton()
        self.add_hits_button.setText("Add search hits as positives")
        self.add_hits_button.setToolTip("The selected result rows of the search above (else all its hits) become "
                                        "positive examples")
        self.clear_button = QToolButton()
        self.clear_button.setText("Clear")
        self.clear_button.setToolTip("Forget the labels of this layer (saved labels stay until 'Save labels')")
        row1 = QHBoxLayout()
        row1.addWidget(self.counts, 1)
        row1.addWidget(self.label_button)
        row1.addWidget(self.add_hits_button)
        row1.addWidget(self.clear_button)
        self.find_button = QPushButton("Find all like these")
        self.find_button.setToolTip("Fit a classifier on the labelled tiles' embeddings and score every tile of "
                                    "the layer: the tiles at or above the threshold become the detection layer")
        self.method = QComboBox()
        self.method.addItem("logistic", "logistic")
        self.method.addItem("query vector", "query")
        self.method.setToolTip("logistic: logistic regression on the labels; query vector: 2·mean(positives) − "
                               "mean(negatives), no training")
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(0.5)
        self.threshold.setPrefix("≥ ")
        self.threshold.setToolTip("Least probability of a detection")
        self.refit_button = QPushButton("Refit")
        self.refit_button.setToolTip("Fit again with the labels as they are now (accepted and rejected detections "
                                     "included) and update the detection layer")
        self.cancel_button = QToolButton()
        self.cancel_button.setText("Cancel")
        self.cancel_button.setEnabled(False)
        row2 = QHBoxLayout()
        row2.addWidget(self.find_button)
        row2.addWidget(self.method)
        row2.addWidget(self.threshold)
        row2.addWidget(self.refit_button)
        row2.addWidget(self.cancel_button)
        row2.addStretch(1)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.ExtendedSelection)
        header = self.table.horizontalHeader()
        for column in range(3):
            header.setSectionResizeMode(column, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(3, QHeaderView.Stretch)
        self.accept_button = QPushButton("Accept ✓")
        self.accept_button.setToolTip("The selected detections (rows, or features of the detection layer on the "
                                      "map) are what you look for: positive examples")
        self.reject_button = QPushButton("Reject ✗")
        self.reject_button.setToolTip("The selected detections are false hits: negative examples")
        self.save_button = QToolButton()
        self.save_button.setText("Save labels")
        self.save_button.setToolTip("Store the labels with the tile layer (they come back when you open it again)")
        self.export_button = QToolButton()
        self.export_button.setText("Export training set…")
        self.export_button.setToolTip("Save the labels, then export the layer's tiles with them (class "
                                      "positive/negative) as an image dataset")
        row3 = QHBoxLayout()
        row3.addWidget(self.accept_button)
        row3.addWidget(self.reject_button)
        row3.addStretch(1)
        row3.addWidget(self.save_button)
        row3.addWidget(self.export_button)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addLayout(row1)
        layout.addLayout(row2)
        layout.addWidget(self.table, 1)  # the section's height beyond its buttons (the dock's splitter)
        layout.addLayout(row3)
        layout.addWidget(self.status)
        self.label_button.toggled.connect(self.toggle_label_tool)
        self.add_hits_button.clicked.connect(self.add_hits)
        self.clear_button.clicked.connect(self.clear_labels)
        self.find_button.clicked.connect(self.find_all)
        self.refit_button.clicked.connect(self.find_all)
        self.cancel_button.clicked.connect(self.cancel)
        self.accept_button.clicked.connect(lambda: self.review(POSITIVE))
        self.reject_button.clicked.connect(lambda: self.review(NEGATIVE))
        self.save_button.clicked.connect(self.save_labels)
        self.export_button.clicked.connect(self.export_training_set)
        self.table.cellClicked.connect(self.row_clicked)

    # -- state ---------------------------------------------------------------------------------
    def current_path(self) -> str | None:
        """The tile layer file (or dataset folder) of the dock's current choice."""
        choice = self.dock.current_choice()
        return choice.path if choice is not None else None

    def labels(self, path: str | None = None) -> Labels:
        """The labels of ``path`` (default: the current layer)."""
        path = path or self.current_path() or ""
        return self.labels_by_path.setdefault(path, Labels())

    def show_status(self, text: str) -> None:
        """The panel's status line."""
        self.status.setText(text)

    def update_counts(self) -> None:
        """The label counts and which buttons can be used now."""
        labels = self.labels()
        self.counts.setText(f"<b>{len(labels.positive)}</b> positive · <b>{len(labels.negative)}</b> negative")
        has_choice = self.current_path() is not None
        self.find_button.setEnabled(has_choice and bool(labels.positive))
        self.refit_button.setEnabled(has_choice and bool(labels.positive) and self.found_path == self.current_path())
        self.save_button.setEnabled(has_choice)
        self.export_button.setEnabled(self.dock.current_layer() is not None)
        self.clear_button.setEnabled(bool(labels))
        reviewable = bool(self.found) and self.found_path == self.current_path()
        self.accept_button.setEnabled(reviewable)
        self.reject_button.setEnabled(reviewable)

    def choice_changed(self, _index: int = 0) -> None:
        """The dock shows another layer: its labels (restored when its session runs), no rows of
        the previous layer's detection."""
        if sip.isdeleted(self):
            return
        path = self.current_path()
        if path == self.path:
            return
        self.path = path
        self.toggle_label_tool(False)
        self.label_button.setChecked(False)
        self.found, self.found_path = [], None
        self.table.setRowCount(0)
        self.show_status("")
        self.draw_labels()
        choice = self.dock.current_choice()
        if choice is not None and self.session(choice).running:
            self.restore_labels()
        self.update_counts()

    def sync(self) -> None:
        """Catch up with the dock's current layer (the dock may change it with its signals blocked)."""
        if self.current_path() != self.path:
            self.choice_changed()

    @staticmethod
    def _project_signals() -> list:
        project = QgsProject.instance()
        return [project.layersAdded, project.layersRemoved, project.cleared, project.readProject]

    def choice_changed_later(self, *_args) -> None:
        """After the dock has refreshed its layer list (it does so on the same project signals)."""
        QTimer.singleShot(0, self.choice_changed)

    def layers_removed(self, layer_ids: list) -> None:
        """The labels layer removed by the user: drawn again on the next label."""
        if self.labels_layer_id in layer_ids:
            self.labels_layer_id = None

    def session(self, choice: Choice) -> sessions.SearchSession:
        """The dock's search session for ``choice`` (shared: the model loads once)."""
        key = sessions.session_key(choice.path, choice.key if choice.several else "", model=choice.model)
        return sessions.get_session(key)

    def crs(self, choice: Choice) -> QgsCoordinateReferenceSystem:
        """The CRS of the footprints of ``choice`` (the tile layer's, or the dataset's)."""
        layer = self.dock.current_layer()
        if layer is not None:
            return layer.crs()
        crs = QgsCoordinateReferenceSystem()
        try:
            crs.createFromUserInput(datasets.read_dataset(choice.path).crs or "")
        except datasets.DatasetError:
            pass
        return crs

    # -- labelling -----------------------------------------------------------------------------
    def toggle_label_tool(self, on: bool) -> None:
        """The label map tool on the current tile layer (a dataset: on its detection or hits layer)."""
        canvas = self.dock.iface.mapCanvas() if self.dock.iface is not None else None
        if canvas is None:
            return
        if not on:
            if self.tool is not None and canvas.mapTool() is self.tool:
                canvas.unsetMapTool(self.tool)
            self.tool = None
            return
        if self.current_path() != self.path:  # another layer since: start from its state
            self.choice_changed()
            self.label_button.setChecked(True)  # toggled again, now on the current layer
            return
        target = self.dock.current_layer() or self.detection_layer() or self.dock.results_layer()
        if target is None:
            self.label_button.setChecked(False)
            self.show_status("choose a tile layer with embeddings above (a dataset: search it first, then label "
                             "its hits)")
            return
        self.restore_labels()
        self.tool = LabelMapTool(canvas, target)
        self.tool.tile_clicked.connect(self.tile_clicked)
        self.tool.missed.connect(lambda: self.show_status("no tile there: click inside a tile"))
        self.tool.deactivated.connect(lambda: self.label_button.setChecked(False))
        canvas.setMapTool(self.tool)
        self.show_status("click tiles like the ones to find (positive); shift-click tiles that are not (negative)")

    def tile_clicked(self, tile_id: str, geometry: QgsGeometry, negative: bool) -> None:
        """A click of the label tool."""
        mark = self.labels().toggle(tile_id, negative, geometry)
        said = {POSITIVE: "positive", NEGATIVE: "negative", None: "no longer labelled"}[mark]
        self.show_status(f"{tile_id}: {said}")
        self.labels_changed()

    def label_tiles(self, tile_ids: list[str], mark: int, geometries: dict[str, QgsGeometry] | None = None) -> None:
        """Label ``tile_ids`` (positive or negative), with their footprints when given, else from
        the current tile layer."""
        self.sync()
        geometries = dict(geometries or {})
        missing = [t for t in tile_ids if t not in geometries]
        layer = self.dock.current_layer()
        if missing and layer is not None:
            for tile_id, feature in tile_layers.features_by_tile(layer, missing).items():
                geometries[tile_id] = QgsGeometry(feature.geometry())
        labels = self.labels()
        for tile_id in tile_ids:
            labels.set(tile_id, mark, geometries.get(tile_id) or labels.geometries.get(tile_id))
        self.labels_changed()

    def add_hits(self) -> None:
        """The search's selected hits (else all of them) become positives."""
        self.sync()
        dock = self.dock
        choice = dock.current_choice()
        if not dock.hits or choice is None or dock.hits_choice is None or dock.hits_choice.ident != choice.ident:
            return self.show_status("search this layer first (a text, or Find similar): its hits can then be "
                                    "added as positives")
        rows = sorted({index.row() for index in dock.table.selectedIndexes()})
        hits = [dock.hits[r] for r in rows if r < len(dock.hits)] or dock.hits
        self.restore_labels()
        self.label_tiles([str(h.result["tile_id"]) for h in hits], POSITIVE,
                         {str(h.result["tile_id"]): h.geometry for h in hits})
        self.show_status(f"{len(hits)} search hits added as positives")

    def clear_labels(self) -> None:
        """No labels on this layer."""
        self.labels().clear()
        self.labels_changed()
        self.show_status("labels cleared (the saved ones stay until 'Save labels')")

    def labels_changed(self) -> None:
        """Counts, the labels layer and the table's label column after any change."""
        self.draw_labels()
        self.update_counts()
        labels = self.labels()
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 3)
            self._mark_row(row, labels.label(item.data(Qt.UserRole)) if item is not None else None)

    def labels_layer(self, create: bool = True) -> QgsVectorLayer | None:
        """The map layer of the current labels (created on first use, at the top of the results)."""
        project = QgsProject.instance()
        layer = project.mapLayer(self.labels_layer_id) if self.labels_layer_id else None
        if isinstance(layer, QgsVectorLayer) or not create:
            return layer if isinstance(layer, QgsVectorLayer) else None
        choice = self.dock.current_choice()
        if choice is None:
            return None
        layer = detections.labels_layer("few-shot labels", self.crs(choice), choice.path)
        self._add_to_results(layer)
        self.labels_layer_id = layer.id()
        return layer

    def draw_labels(self) -> None:
        """Draw the current layer's labels (the labels layer shows one tile layer's labels)."""
        labels = self.labels()
        layer = self.labels_layer(create=bool(labels))
        if layer is None:
            return
        path = self.current_path() or ""
        if layer.customProperty(detections.LAYER_PATH) != path:  # another layer's labels: start again
            QgsProject.instance().removeMapLayer(layer.id())
            self.labels_layer_id = None
            layer = self.labels_layer(create=bool(labels))
            if layer is None:
                return
        detections.fill_labels_layer(layer, labels)
        layer.setName(f"few-shot labels: {labels.summary()}")

    @staticmethod
    def _add_to_results(layer: QgsVectorLayer) -> None:
        """Add ``layer`` at the top of the dock's results group (above the imagery)."""
        project = QgsProject.instance()
        root = project.layerTreeRoot()
        group = root.findGroup(RESULTS_GROUP) or root.insertGroup(0, RESULTS_GROUP)
        project.addMapLayer(layer, False)
        if isinstance(group, QgsLayerTreeGroup):
            group.insertLayer(0, layer)

    # -- saved labels ----------------------------------------------------------------------------
    def restore_labels(self) -> tasks.CallTask | None:
        """Ask the engine for the labels saved with the current layer (once per layer); they are
        merged with the labels given since (those win)."""
        self.sync()
        choice = self.dock.current_choice()
        if choice is None or choice.path in self.restored:
            return None
        self.restored.add(choice.path)
        path = choice.path
        session = self.session(choice)

        def done(response, error: EngineError | None) -> None:
            if error is not None:
                self.restored.discard(path)
                if error.kind != "cancelled":
                    self.show_status(f"<b>saved labels not read</b>: {error.text}")
                return
            labels = self.labels(path)
            positive = [str(t) for t in response.get("positive") or [] if labels.label(str(t)) is None]
            negative = [str(t) for t in response.get("negative") or [] if labels.label(str(t)) is None]
            if not positive and not negative:
                return
            for tile_id in positive:
                labels.set(tile_id, POSITIVE)
            for tile_id in negative:
                labels.set(tile_id, NEGATIVE)
            if path == self.current_path():
                layer = self.dock.current_layer()
                if layer is not None:
                    for tile_id, feature in tile_layers.features_by_tile(layer, positive + negative).items():
                        labels.geometries[tile_id] = QgsGeometry(feature.geometry())
                self.labels_changed()
                self.show_status(f"restored the labels saved with this layer: {len(positive)} positive, "
                                 f"{len(negative)} negative")

        return self._side_task("HQRS: saved labels", session, {"op": "labels"}, done)

    def save_labels(self) -> tasks.CallTask | None:
        """Store the current labels with the tile layer (the engine's run record)."""
        self.sync()
        choice = self.dock.current_choice()
        if choice is None:
            self.show_status("choose a tile layer first")
            return None
        labels = self.labels()
        payload = {"op": "save_labels", "positive": labels.positive,
                   "negative": labels.negative, "name": "few-shot labels"}

        def done(response, error: EngineError | None) -> None:
            if error is not None:
                self.show_status(f"<b>labels not saved</b>: {error.text}")
            else:
                self.show_status(f"{int(response.get('saved', len(labels)))} labels saved with the layer")

        self.show_status("saving the labels…")
        return self._side_task("HQRS: save labels", self.session(choice), payload, done)

    def _side_task(self, title: str, session: sessions.SearchSession, payload: dict, done) -> tasks.CallTask:
        relay = self.relay

        def work(_task: tasks.CallTask) -> dict:
            if not session.running:
                relay.status.emit("loading the model of this layer… (once)")
                session.start()
            return session.request(payload)

        task = tasks.CallTask(title, work, done)
        self.side_tasks = [t for t in self.side_tasks if not t.done] + [task]
        tasks.start(task)
        return task

    def export_training_set(self) -> None:
        """Save the labels, then the Export image-text dataset dialog for the tile layer."""
        layer = self.dock.current_layer()
        if layer is None:
            return self.show_status("export works on a tile layer in the project")
        self.save_labels()
        import processing  # the Processing plugin: importable once QGIS has loaded it

        dialog = processing.createAlgorithmDialog("hqrs:export_dataset", {"INPUT": layer.id(), "CAPTIONS": "labels"})
        if dialog is not None:
            dialog.show()

    # -- detecting -------------------------------------------------------------------------------
    def find_all(self) -> tasks.CallTask | None:
        """"Find all like these" (and Refit): the ``detect`` request in a task; its answer fills
        the detection layer. A request still running is replaced (its answer is dropped)."""
        self.sync()
        choice = self.dock.current_choice()
        if choice is None:
            self.show_status("choose a tile layer with embeddings above")
            return None
        labels = self.labels()
        try:
            payload = detections.detect_request(labels, MAX_DETECTIONS, self.threshold.value(),
                                                str(self.method.currentData()))
        except DetectionError as exc:
            self.show_status(str(exc))
            return None
        replaced = self.task is not None and not self.task.done
        self.serial += 1
        serial = self.serial
        session = self.session(choice)
        relay = self.relay
        summary = labels.summary()
        threshold = float(payload["threshold"])

        def work(_task: tasks.CallTask) -> dict:
            if not session.running:
                relay.status.emit(f"loading the model of {choice.model}… (once)")
                session.start()
            relay.status.emit(f"fitting on {summary} and scoring every tile…")
            return session.request(payload)

        def done(response, error: EngineError | None) -> None:
            if serial != self.serial:  # a newer request replaced this one
                tasks.log(f"detection ({summary}) replaced by a newer request; its answer was dropped")
                return
            self.cancel_button.setEnabled(False)
            if error is not None:
                if error.kind == "cancelled":
                    return self.show_status("detection cancelled")
                tasks.log(f"detection failed: {error.text}", Qgis.Warning)
                return self.show_status(f"<b>detection failed</b>: {error.text}")
            if choice.path != self.current_path():
                return self.show_status("the layer changed meanwhile: run Find all like these again")
            self.show_detections(choice, response, threshold)

        self.cancel_button.setEnabled(True)
        self.show_status(("the previous detection was replaced by this one; " if replaced else "")
                         + f"detecting with {summary}…")
        self.task = tasks.start(tasks.CallTask(f"HQRS: find all like these ({summary})", work, done,
                                               on_cancel=session.stop))
        return self.task

    def cancel(self) -> None:
        """Stop the running detection (the session stops; the next request starts it again)."""
        if self.task is not None and not self.task.done:
            self.task.cancel()

    def detection_layer(self, path: str | None = None) -> QgsVectorLayer | None:
        """The detection layer of ``path`` (default: the current layer) in the project, if any."""
        path = path or self.current_path()
        for layer in QgsProject.instance().mapLayers().values():
            if isinstance(layer, QgsVectorLayer) and layer.customProperty(detections.LAYER_PATH) == path \
                    and layer.customProperty("hqrs/styled") == detections.DETECTIONS:
                return layer
        return None

    def show_detections(self, choice: Choice, response: dict[str, Any], threshold: float) -> None:
        """The answer of a ``detect`` request: the detection layer (updated in place), the table,
        the footprints of labelled tiles, the status."""
        found = detections.detections(response.get("results") or [])
        layer = self.detection_layer(choice.path)
        if layer is None:
            layer = detections.detection_layer("detections", self.crs(choice), choice.path)
            self._add_to_results(layer)
            labels_layer = self.labels_layer(create=False)
            if labels_layer is not None:  # the labels stay on top
                root = QgsProject.instance().layerTreeRoot()
                node = root.findLayer(labels_layer.id())
                group = root.findGroup(RESULTS_GROUP)
                if node is not None and isinstance(group, QgsLayerTreeGroup):
                    group.insertChildNode(0, node.clone())
                    node.parent().removeChildNode(node)
        detections.fill_detection_layer(layer, found)
        tile_layer = self.dock.current_layer()
        name = tile_layer.name() if tile_layer is not None else os.path.basename(choice.path.rstrip("/\\"))
        layer.setName(f"detections: {name} (probability ≥ {threshold:g})")
        labels = self.labels(choice.path)
        for item in found:  # footprints of labels that came without one (restored, from a dataset)
            if labels.label(item.tile_id) is not None and item.tile_id not in labels.geometries:
                labels.geometries[item.tile_id] = QgsGeometry(item.geometry)
        self.found, self.found_path = found, choice.path
        self.fill_table()
        self.labels_changed()
        info = response.get("detector") or {}
        above = int(info.get("above", len(found)))
        scored = int(info.get("tiles", 0))
        shown = f" (the best {len(found):,} drawn)" if above > len(found) else ""
        fit = float(info.get("fit_seconds", 0.0))
        score = float(info.get("score_seconds", response.get("seconds", 0.0)))
        self.show_status(f"<b>{above:,}</b> of {scored:,} tiles at probability ≥ {threshold:g}{shown}; "
                         f"{info.get('method', '')} fit on {labels.summary()} in {fit:.3f} s, scored in "
                         f"{score:.3f} s. Select detections, Accept ✓ / Reject ✗, then Refit.")

    def fill_table(self) -> None:
        """The best detections in the table (rank, probability, label, tile)."""
        rows = self.found[:TABLE_ROWS]
        self.table.setRowCount(len(rows))
        self.table.scrollToTop()
        labels = self.labels()
        for row, item in enumerate(rows):
            tile = QTableWidgetItem(item.caption or item.tile_id)
            tile.setData(Qt.UserRole, item.tile_id)
            tile.setToolTip(f"<b>{item.tile_id}</b><br>{item.caption}" if item.caption else item.tile_id)
            self.table.setItem(row, 0, QTableWidgetItem(str(item.rank)))
            self.table.setItem(row, 1, QTableWidgetItem(f"{item.probability:.3f}"))
            self.table.setItem(row, 3, tile)
            self._mark_row(row, labels.label(item.tile_id))

    def _mark_row(self, row: int, mark: int | None) -> None:
        text = {POSITIVE: "✓", NEGATIVE: "✗", None: ""}[mark]
        item = QTableWidgetItem(text)
        item.setToolTip({POSITIVE: "positive example", NEGATIVE: "negative example", None: ""}[mark])
        if mark is not None:
            item.setForeground(Qt.darkGreen if mark == POSITIVE else Qt.red)
        self.table.setItem(row, 2, item)

    def selected_detections(self) -> list[Detection]:
        """The selected table rows, else the features selected on the detection layer."""
        rows = sorted({index.row() for index in self.table.selectedIndexes()})
        if rows:
            return [self.found[r] for r in rows if r < len(self.found)]
        layer = self.detection_layer()
        if layer is None or not layer.selectedFeatureCount():
            return []
        chosen = {str(f["tile_id"]) for f in layer.selectedFeatures()}
        return [item for item in self.found if item.tile_id in chosen]

    def review(self, mark: int) -> None:
        """Accept (``mark`` positive) or reject (negative) the selected detections."""
        chosen = self.selected_detections()
        if not chosen:
            return self.show_status("select detections first: rows here, or features of the detection layer "
                                    "on the map")
        self.label_tiles([d.tile_id for d in chosen], mark, {d.tile_id: d.geometry for d in chosen})
        self.table.clearSelection()
        layer = self.detection_layer()
        if layer is not None:
            layer.removeSelection()
        verb = "accepted" if mark == POSITIVE else "rejected"
        self.show_status(f"{len(chosen)} {verb} ({self.labels().summary()}): Refit to update the detections")

    def row_clicked(self, row: int, _column: int = 0) -> None:
        """A detection row: zoom the map to its tile and flash it."""
        if row >= len(self.found) or self.dock.iface is None:
            return
        layer = self.detection_layer()
        if layer is None:
            return
        item = self.found[row]
        canvas = self.dock.iface.mapCanvas()
        transform = QgsCoordinateTransform(layer.crs(), canvas.mapSettings().destinationCrs(), QgsProject.instance())
        extent = transform.transformBoundingBox(item.geometry.boundingBox())
        extent.scale(4.0)
        canvas.setExtent(extent)
        canvas.refresh()
        if hasattr(canvas, "flashGeometries"):
            canvas.flashGeometries([item.geometry], layer.crs())

    # -- ending ----------------------------------------------------------------------------------
    def unload(self) -> None:
        """The dock goes away: the map tool off, running requests dropped, signals disconnected."""
        self.toggle_label_tool(False)
        self.serial += 1  # a running detection's answer is dropped
        for task in [self.task, *self.side_tasks]:
            if task is not None and not task.done:
                task.on_done = None
        connected = [(signal, self.choice_changed_later) for signal in self._project_signals()]
        for signal, slot in ((self.dock.layer_box.currentIndexChanged, self.choice_changed),
                             (QgsProject.instance().layersWillBeRemoved, self.layers_removed), *connected):
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError):
                pass
