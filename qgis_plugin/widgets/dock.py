"""The "HQRS search" dock: type a query, press Enter, see the best tiles over the imagery.

Nothing here waits for the engine in the GUI thread: loading a layer's model, queries, "find
similar" and engine checks run as QgsTasks (:mod:`..core.tasks`) on the shared search sessions
(:mod:`..core.sessions`), with their state in the status line and a Cancel button. Results go to
layers of their own (``hits: "query"``: outlines coloured by score with rank labels; optionally
``heat: "query"``, a semi-transparent score heat map); the tile layer's style is never touched
and every tile stays clickable. Errors show in the dock and the message bar with the action that
fixes them. When the engine is missing, the dock shows the set-up panel instead.

Besides the project's tile layers, the layer list holds partitioned datasets ("Open dataset…":
a folder of GeoParquet parts with ``_manifest.json``), listed with their tile count and
embedding model from the manifest and searched through a ``serve-search DATASET`` session without
being loaded into QGIS: the hits' footprints, captions and raster windows come with the results.
"Merge area…" writes the tiles of the hits' area to a GeoPackage (``hqrs-geo merge --bbox``, in
the background) and adds it to the map.

Hits are coloured on the model's fixed score scale (``score_scale`` of the session's ready
message), the same score the same colour in every query; when the best score is at or below the
scale's "no real match" level the status line says so. Nothing stale stays: the table, the hits
and any answer still on its way are dropped the moment the chosen layer changes or is removed; a
query replaced by a newer one is said in the status line; the "no embeddings yet" hint follows the
layers' fields (it updates when an Embed, Caption or classify run ends).
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsProject,
    QgsRectangle,
    QgsSettings,
    QgsVectorLayer,
)
from qgis.gui import QgsCollapsibleGroupBox, QgsMapToolIdentifyFeature
from qgis.PyQt.QtCore import QObject, QSize, Qt, QTimer, pyqtSignal
from qgis.PyQt.QtGui import QIcon, QImage, QPixmap
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QTableView,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..core import datasets, engine, sessions, settings, styles, tasks, tile_layers
from ..core.runner import EngineError
from .change_panel import ChangePanel
from .engine_setup import EngineSetupPanel
from .fewshot_panel import FewShotPanel
from .settings_dialog import SettingsDialog

RESULTS_GROUP = "HQRS results"
HEAT_MAX_TILES = 5000  # the heat map ranks at most this many tiles
COLUMNS = ("", "rank", "score", "caption")
OPEN_DATASET = "open-dataset"  # item data of the layer box's "Open dataset…" entry
LIST_THUMBNAIL_PX = 48  # thumbnails in the hit list are drawn this big (from THUMBNAIL_PX): 8+ rows in a 760 px dock
MIN_ROWS = 4  # hit list rows kept when a section below it is expanded (where the dock is tall enough)


@dataclass
class Choice:
    """A tile layer (or a dataset folder: ``dataset``, no layer id) and one of its embedding sets,
    as listed in the layer box."""

    layer_id: str
    path: str
    key: str
    model: str
    several: bool
    dataset: bool = False

    @property
    def ident(self) -> tuple[str, str]:
        """What the entry stands for, across refreshes of the list."""
        return (self.layer_id or self.path, self.key)


@dataclass
class Hit:
    """One ranked tile, ready for the table and the results layer."""

    result: dict
    geometry: QgsGeometry
    caption: str
    thumbnail: bytes | None


class Relay(QObject):
    """Status text from a task's thread to the dock (``task_status``: with the number of the
    request it is about, so a dropped request's lines never reach the status line)."""

    status = pyqtSignal(str)
    task_status = pyqtSignal(int, str)


class LayerBox(QComboBox):
    """The tile layers with embeddings (one entry per embedding model), refreshed when opened."""

    about_to_show = pyqtSignal()

    def showPopup(self) -> None:  # noqa: N802 - Qt API
        """Refresh, then open."""
        self.about_to_show.emit()
        super().showPopup()


class SectionSplitter(QSplitter):
    """The hit list over the dock's collapsible sections (few-shot, changes) in a vertical splitter.

    The hit list takes the spare height, also when the dock is resized. The sections, in a scroll
    pane below it, start collapsed (their titles only); when one is expanded the pane gets their
    height, or the height the analyst dragged it to, as long as the hit list keeps ``min_rows``
    rows: what does not fit then scrolls. Whether each section is collapsed and the pane's dragged
    height are remembered per user (QgsSettings ``hqrs_geo/dock/<section>/collapsed``,
    ``hqrs_geo/dock/sections_height``)."""

    def __init__(self, main: QTableView, min_rows: int):
        super().__init__(Qt.Vertical)
        self.setObjectName("HqrsSections")
        self.setChildrenCollapsible(False)
        self.main = main
        self.min_rows = min_rows
        self.sections: list[QgsCollapsibleGroupBox] = []
        content = QWidget()
        self.sections_layout = QVBoxLayout(content)
        self.sections_layout.setContentsMargins(0, 0, 0, 0)
        self.sections_layout.addStretch(0)  # collapsed sections at the top of the pane
        self.pane = QScrollArea()
        self.pane.setObjectName("HqrsSectionsPane")
        self.pane.setWidgetResizable(True)
        self.pane.setFrameShape(QFrame.NoFrame)
        self.pane.setWidget(content)
        self.addWidget(main)
        self.addWidget(self.pane)
        self.setStretchFactor(0, 1)
        self.setStretchFactor(1, 0)
        self.arrange_timer = QTimer(self)  # after the sections' layout has followed their new state
        self.arrange_timer.setSingleShot(True)
        self.arrange_timer.setInterval(0)
        self.arrange_timer.timeout.connect(self.arrange)
        self.splitterMoved.connect(self.remember_height)

    @staticmethod
    def setting(name: str) -> str:
        """The QgsSettings key of one of the dock's layout settings."""
        return settings.key(f"dock/{name}")

    def add_section(self, box: QgsCollapsibleGroupBox) -> None:
        """A collapsible section below the others, collapsed unless the analyst left it expanded."""
        box.setSaveCollapsedState(False)  # remembered here, with the plugin's other settings
        box.setCollapsed(QgsSettings().value(self.setting(f"{box.objectName()}/collapsed"), True, type=bool))
        self.sections_layout.insertWidget(len(self.sections), box, 1)  # a taller pane: taller sections
        self.sections.append(box)
        box.collapsedStateChanged.connect(lambda collapsed, b=box: self.toggled(b, collapsed))
        bar = self.pane.verticalScrollBar().sizeHint().width()
        self.pane.setMinimumWidth(self.pane.widget().minimumSizeHint().width() + bar)  # no sideways scrolling

    def toggled(self, box: QgsCollapsibleGroupBox, collapsed: bool) -> None:
        """A section collapsed or expanded: remember it, then share out the height again."""
        QgsSettings().setValue(self.setting(f"{box.objectName()}/collapsed"), collapsed)
        self.arrange_timer.start()

    def remember_height(self, _pos: int = 0, _index: int = 0) -> None:
        """The analyst dragged the handle with a section expanded: the pane's height is theirs."""
        if any(not box.isCollapsed() for box in self.sections):
            QgsSettings().setValue(self.setting("sections_height"), self.sizes()[1])

    def row_height(self) -> int:
        """A row of the hit list (an icon's height before there are rows)."""
        if self.main.model() is not None and self.main.model().rowCount() > 0:
            return max(self.main.rowHeight(0), 1)
        return self.main.iconSize().height() + 4

    def arrange(self) -> None:
        """The pane at the sections' height (titles only when all are collapsed) or the analyst's,
        at most what leaves the hit list ``min_rows`` rows; the hit list the rest."""
        total = sum(self.sizes())
        if total <= 0:  # not laid out yet: arranged when shown
            return
        content = self.pane.widget().sizeHint().height()
        titles = sum(min(box.sizeHint().height(), box.maximumHeight()) for box in self.sections if box.isCollapsed())
        self.pane.setMinimumHeight(min(content, titles + 2 * self.fontMetrics().height()))
        wanted = content
        if any(not box.isCollapsed() for box in self.sections):
            wanted = QgsSettings().value(self.setting("sections_height"), 0, type=int) or content
        chrome = self.main.height() - self.main.viewport().height()  # header and frame
        room = total - chrome - self.min_rows * self.row_height()
        height = max(min(wanted, content, room), self.pane.minimumHeight())
        self.setSizes([total - height, height])

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        """Share out the height once the dock has one."""
        super().showEvent(event)
        self.arrange_timer.start()


class SearchDock(QDockWidget):
    """Query box, results table and layers, engine status; set-up page when there is no engine."""

    def __init__(self, iface, parent=None):
        super().__init__("HQRS search", parent)
        self.setObjectName("HqrsSearchDock")
        self.iface = iface
        self.task: tasks.CallTask | None = None
        self.session: sessions.SearchSession | None = None
        self.hits: list[Hit] = []
        self.result_layer_ids: list[str] = []
        self.query_text = ""
        self.hits_choice: Choice | None = None  # what the hits were found in
        self.last_choice: Choice | None = None
        self.folder_dialog: QFileDialog | None = None
        self.merge_dialog: QFileDialog | None = None
        self.merge_task: tasks.EngineTask | None = None
        self.merging = False
        self.merged_layer_id: str | None = None
        self.pick_tool: QgsMapToolIdentifyFeature | None = None
        self.relay = Relay()
        self.relay.status.connect(self.show_status)
        self.relay.task_status.connect(self.on_task_status)
        self.generation = 0  # number of the latest request: answers of older ones are dropped
        self.scale = styles.score_scale(None)  # the score scale of the hits shown
        self.active_choice: Choice | None = None  # the layer the table, hits and status are about
        self.watched: set[str] = set()  # ids of the vector layers whose field changes refresh the list
        self.file_stamps: dict[str, tuple] = {}  # layer id -> its file's stamp, for layers without embeddings
        self.refresh_timer = QTimer(self)
        self.refresh_timer.setSingleShot(True)
        self.refresh_timer.setInterval(0)
        self.refresh_timer.timeout.connect(self.refresh_layers)
        QgsApplication.taskManager().taskAdded.connect(self.on_task_added)
        self.pages = QStackedWidget()
        self.setup_panel = EngineSetupPanel(message_bar=self.message_bar())
        self.setup_panel.engine_ready.connect(self.on_engine_ready)
        self.pages.addWidget(self._search_page())
        self.pages.addWidget(self.setup_panel)
        self.setWidget(self.pages)
        for signal in self._project_signals():
            signal.connect(self.refresh_layers)
        settings.notifier.changed.connect(self.on_settings_changed)
        self.refresh_layers()
        self.engine_checked = False

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        """Check the engine the first time the dock is shown (never at plugin load)."""
        super().showEvent(event)
        if not self.engine_checked:
            self.check_engine()

    # -- building ----------------------------------------------------------------------------
    def _search_page(self) -> QWidget:
        page = QWidget()
        layout = QVBoxLayout(page)
        self.layer_box = LayerBox()
        self.layer_box.setToolTip("Tile layers and datasets with embeddings, with the model that made them")
        self.layer_box.about_to_show.connect(self.refresh_layers)
        self.dataset_button = QToolButton()
        self.dataset_button.setIcon(QgsApplication.getThemeIcon("/mActionFileOpen.svg"))
        self.dataset_button.setToolTip("Open a dataset folder (GeoParquet parts with _manifest.json, written by the "
                                       "HQRS engine) to search it without loading it")
        row0 = QHBoxLayout()
        row0.addWidget(self.layer_box, 1)
        row0.addWidget(self.dataset_button)
        self.layer_hint = QLabel("")
        self.layer_hint.setWordWrap(True)
        self.layer_hint.setVisible(False)
        self.query = QLineEdit()
        self.query.setPlaceholderText("e.g. a river with a bridge — press Enter")
        self.query.setClearButtonEnabled(True)
        self.search_button = QPushButton("Search")
        row1 = QHBoxLayout()
        row1.addWidget(self.query, 1)
        row1.addWidget(self.search_button)
        self.k = QSpinBox()
        self.k.setRange(1, 1000)
        self.k.setValue(20)
        self.k.setPrefix("top ")
        self.similar_button = QPushButton("Find similar")
        self.similar_button.setToolTip("Tiles like the selected result rows, or the tiles selected on the map")
        self.pick_button = QToolButton()
        self.pick_button.setText("Pick tile…")
        self.pick_button.setCheckable(True)
        self.pick_button.setToolTip("Click any tile on the map to find tiles like it")
        self.heatmap = QCheckBox("heat map")
        self.heatmap.setToolTip(f"Also draw a semi-transparent score heat map of the best {HEAT_MAX_TILES} tiles")
        self.heatmap.setChecked(settings.value("heatmap"))
        row2 = QHBoxLayout()
        for widget in (self.k, self.similar_button, self.pick_button, self.heatmap):
            row2.addWidget(widget)
        row2.addStretch(1)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)  # the rank column is the row's number
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.ExtendedSelection)
        self.table.setWordWrap(True)
        self.table.setIconSize(QSize(LIST_THUMBNAIL_PX, LIST_THUMBNAIL_PX))  # rows of the hit list this high
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.Fixed)
        header.resizeSection(0, LIST_THUMBNAIL_PX + 6)
        header.setSectionResizeMode(1, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(3, QHeaderView.Stretch)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.clear_button = QPushButton("Clear results")
        self.merge_button = QPushButton("Merge area…")
        self.merge_button.setToolTip("Write the dataset's tiles in the area of the hits (the selected rows, else all) "
                                     "to a GeoPackage and add it to the map")
        self.merge_button.setVisible(False)
        self.engine_label = QLabel("")
        self.engine_label.setWordWrap(True)
        self.settings_button = QToolButton()
        self.settings_button.setText("Engine…")
        self.settings_button.setToolTip("Set up the engine or choose its Python")
        row3 = QHBoxLayout()
        row3.addWidget(self.status, 1)
        row3.addWidget(self.cancel_button)
        row3.addWidget(self.merge_button)
        row3.addWidget(self.clear_button)
        row4 = QHBoxLayout()
        row4.addWidget(self.engine_label, 1)
        row4.addWidget(self.settings_button)
        layout.addLayout(row0)
        layout.addWidget(self.layer_hint)
        layout.addLayout(row1)
        layout.addLayout(row2)
        self.fewshot = FewShotPanel(self)  # label tiles, find all like them, review, refit
        self.changes = ChangePanel(self)  # compare with another date: change layer, most changed tiles
        self.splitter = SectionSplitter(self.table, min_rows=MIN_ROWS)
        self.splitter.add_section(self.fewshot)
        self.splitter.add_section(self.changes)
        layout.addWidget(self.splitter, 1)  # the hit list takes the spare height
        layout.addLayout(row3)
        layout.addLayout(row4)
        self.query.returnPressed.connect(self.search_text)
        self.search_button.clicked.connect(self.search_text)
        self.similar_button.clicked.connect(self.search_similar)
        self.pick_button.toggled.connect(self.toggle_pick)
        self.cancel_button.clicked.connect(self.cancel)
        self.clear_button.clicked.connect(self.clear_results)
        self.table.cellClicked.connect(self.zoom_to_row)
        self.layer_box.currentIndexChanged.connect(self.layer_changed)
        self.layer_box.activated.connect(self.layer_activated)
        self.dataset_button.clicked.connect(self.browse_dataset)
        self.merge_button.clicked.connect(self.merge_hits)
        self.heatmap.toggled.connect(lambda on: settings.set_value("heatmap", on))
        self.settings_button.clicked.connect(self.show_setup)
        return page

    def message_bar(self):
        """QGIS's message bar (None without a QGIS window)."""
        bar = getattr(self.iface, "messageBar", None)
        return bar() if callable(bar) else None

    # -- engine --------------------------------------------------------------------------------
    def check_engine(self) -> None:
        """Probe the engine in the background; show the set-up page when it cannot run."""
        self.engine_checked = True
        info = engine.cached()
        if info is not None:
            self.engine_label.setText(f"<small>Engine: {info.summary}</small>")
            if info.device_problem is not None:
                self.show_status(f"<b>{info.device_problem.text}</b>")
            elif "as the device in HQRS settings" in self.status.text():  # the device was changed since
                self.show_status(f"device ready: {info.device}")
            return
        self.engine_label.setText("<small>Engine: checking…</small>")
        python = engine.interpreter()

        def done(info, error):
            if error is None and info is not None and info.installed:  # a wrong device is a setting, not set-up
                self.engine_label.setText(f"<small>Engine: {info.summary}</small>")
                self.pages.setCurrentIndex(0)
                if info.device_problem is not None:
                    self.show_status(f"<b>{info.device_problem.text}</b>")
                elif "as the device in HQRS settings" in self.status.text():  # the device was changed since
                    self.show_status(f"device ready: {info.device}")
            else:
                problem = error or info.problem
                self.engine_label.setText(f"<small>Engine: {problem}</small>")
                self.show_setup()

        tasks.start(tasks.CallTask("HQRS: checking the engine", lambda _t: engine.probe(python), done,
                                   can_cancel=False))

    def show_setup(self) -> None:
        """The set-up page (engine status, installer)."""
        self.pages.setCurrentIndex(1)
        if self.isVisible():
            self.setup_panel.check()

    def on_engine_ready(self, summary: str) -> None:
        """The engine runs (installed or chosen): back to searching."""
        self.engine_label.setText(f"<small>Engine: {summary}</small>")
        self.pages.setCurrentIndex(0)
        self.show_status("engine ready: type a query and press Enter")

    def on_settings_changed(self, names: list) -> None:
        """Interpreter, device or checkpoint changed: sessions restart with the next query."""
        if set(names) & set(settings.SESSION_SETTINGS):
            self.session = None
            self.engine_label.setText("<small>Engine: settings changed; checking…</small>")
            self.check_engine()

    # -- layers and datasets ------------------------------------------------------------------
    @staticmethod
    def _project_signals() -> list:
        project = QgsProject.instance()
        return [project.layersAdded, project.layersRemoved, project.cleared, project.readProject]

    def refresh_layers(self, *_args) -> None:
        """List the project's tile layers with embeddings and its datasets (keeping the current
        choice), then the "Open dataset…" entry."""
        current = self.current_choice() or self.last_choice
        self.layer_box.blockSignals(True)
        self.layer_box.clear()
        plain = []
        for layer in QgsProject.instance().mapLayers().values():
            if not tile_layers.is_tile_layer(layer) or layer.customProperty(styles.STYLED) == "classes" \
                    or layer.fields().indexOf("change_score") >= 0:
                continue  # (a zero-shot classes layer shows the tiles of a tile layer listed on its own; a
                # change layer carries the tile columns of its earlier date)
            path = tile_layers.engine_layer_file(layer)
            if path is None:
                continue
            self.watch(layer)
            self.reload_if_written(layer, path)
            sets = tile_layers.embedding_sets(layer)
            if not sets:
                plain.append(layer.name())
            for item in sets:
                choice = Choice(layer.id(), path, item.key, item.model, len(sets) > 1)
                self.layer_box.addItem(f"{layer.name()} — {item.model}", choice)
        folder = QgsApplication.getThemeIcon("/mIconFolder.svg")
        for path in datasets.project_datasets():
            try:
                info = datasets.read_dataset(path)
            except datasets.DatasetError as exc:  # moved or deleted since: say so, keep it listed
                self.layer_box.addItem(folder, f"{os.path.basename(path)}/ — unavailable", None)
                self.layer_box.setItemData(self.layer_box.count() - 1, str(exc), Qt.ToolTipRole)
                continue
            if not info.embeddings:
                plain.append(f"{info.name}/")
            for item in info.embeddings:
                choice = Choice("", info.path, item.key, item.model, len(info.embeddings) > 1, dataset=True)
                self.layer_box.addItem(folder, f"{info.name}/ — {info.tiles:,} tiles — {item.model}", choice)
                self.layer_box.setItemData(self.layer_box.count() - 1,
                                           f"<b>dataset {info.path}</b><br>{info.summary()}<br>"
                                           f"embeddings: {item.model}", Qt.ToolTipRole)
        choices = self.layer_box.count()
        self.layer_box.addItem(QgsApplication.getThemeIcon("/mActionFileOpen.svg"), "Open dataset…", OPEN_DATASET)
        self.layer_box.setItemData(self.layer_box.count() - 1, self.dataset_button.toolTip(), Qt.ToolTipRole)
        if current is not None:
            for index in range(choices):
                choice = self.layer_box.itemData(index)
                if isinstance(choice, Choice) and choice.ident == current.ident:
                    self.layer_box.setCurrentIndex(index)
        self.layer_box.blockSignals(False)
        now = self.current_choice()
        if now is not None and (current is None or now.ident != current.ident):
            self.layer_changed(self.layer_box.currentIndex())
        elif now is None and self.active_choice is not None:  # the layer went and none is left
            self.drop_state()
        hint = ""
        if plain:
            hint = (f"{', '.join(plain)}: no embeddings yet; run Processing ▸ HQRS ▸ Models ▸ Embed tiles (or Tile, "
                    "embed and caption) on it to search it")
        elif choices == 0:
            hint = ("No tile layer with embeddings in the project: make one with Processing ▸ HQRS ▸ Models ▸ Tile, "
                    "embed and caption, or open a dataset folder")
        self.layer_hint.setText(f"<small>{hint}</small>" if hint else "")
        self.layer_hint.setVisible(bool(hint))

    def current_choice(self) -> Choice | None:
        """The chosen tile layer (or dataset) and embeddings."""
        choice = self.layer_box.currentData() if hasattr(self, "layer_box") else None
        return choice if isinstance(choice, Choice) else None

    def current_layer(self) -> QgsVectorLayer | None:
        """The chosen tile layer (None for a dataset)."""
        choice = self.current_choice()
        return QgsProject.instance().mapLayer(choice.layer_id) if choice and choice.layer_id else None

    def set_layer(self, layer: QgsMapLayer, model: str | None = None) -> bool:
        """Choose ``layer`` (and the embeddings of ``model``) in the layer box."""
        return self._select(lambda c: c.layer_id == layer.id(), model)

    def set_dataset(self, path: str, model: str | None = None) -> bool:
        """Choose the dataset at ``path`` (and the embeddings of ``model``) in the layer box."""
        folder = datasets.normalise(path)
        return self._select(lambda c: c.dataset and c.path == folder, model)

    def _select(self, match, model: str | None) -> bool:
        self.refresh_layers()
        for index in range(self.layer_box.count()):
            choice = self.layer_box.itemData(index)
            if isinstance(choice, Choice) and match(choice) and (model is None or model in (choice.model, choice.key)):
                self.layer_box.setCurrentIndex(index)
                self.layer_changed(index)
                return True
        return False

    def layer_changed(self, _index: int) -> None:
        """Another layer: the previous one's table, hits and pending answers go at once; its session
        starts with the first query; caption map tips on."""
        choice = self.current_choice()
        if choice is not None:
            self.last_choice = choice
        if self.active_choice is not None and (choice is None or choice.ident != self.active_choice.ident):
            self.drop_state()
        self.active_choice = choice
        layer = self.current_layer()
        if isinstance(layer, QgsVectorLayer):
            styles.set_tile_map_tips(layer)
            self.enable_map_tips()

    def drop_state(self) -> None:
        """Forget everything about the previous layer: the table, the hits layers, the pick tool,
        and the answer of a request still on its way (dropped when it comes)."""
        self.generation += 1
        self.active_choice = None
        if self.pick_button.isChecked():
            self.pick_button.setChecked(False)
        self.set_busy(False)
        self.clear_results()

    def watch(self, layer: QgsMapLayer) -> None:
        """Refresh the list when ``layer``'s fields or data change (an Embed, Caption or classify
        run reloads its input layer when it ends)."""
        if layer.id() in self.watched or not isinstance(layer, QgsVectorLayer):
            return
        self.watched.add(layer.id())
        layer.updatedFields.connect(self.refresh_timer.start)
        layer.dataSourceChanged.connect(self.refresh_timer.start)
        layer.willBeDeleted.connect(lambda layer_id=layer.id(): self.watched.discard(layer_id))

    @staticmethod
    def file_stamp(path: str) -> tuple:
        """Modification times and sizes of a layer file (and of a GeoPackage's write-ahead log)."""
        stamp: list[tuple[int, int] | None] = []
        for name in (path, path + "-wal"):
            try:
                info = os.stat(name)
                stamp.append((info.st_mtime_ns, info.st_size))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def reload_if_written(self, layer: QgsMapLayer, path: str) -> None:
        """A tile layer without embeddings whose file was written since it was last seen (by an
        engine run outside this QGIS, or one that did not reload it) is reloaded, so new fields show."""
        if not isinstance(layer, QgsVectorLayer):
            return
        stamp = self.file_stamp(path)
        before = self.file_stamps.get(layer.id())
        self.file_stamps[layer.id()] = stamp
        if before is not None and before != stamp and not tile_layers.embedding_sets(layer):
            layer.reload()

    def on_task_added(self, task_id: int) -> None:
        """Any background task (a Processing run among them): the list is refreshed when it ends."""
        task = QgsApplication.taskManager().task(task_id)
        if task is not None:
            task.taskCompleted.connect(self.refresh_timer.start)
            task.taskTerminated.connect(self.refresh_timer.start)

    def on_task_status(self, generation: int, text: str) -> None:
        """A status line from a request's task, shown only while that request is the latest."""
        if generation == self.generation:
            self.show_status(text)

    def layer_activated(self, index: int) -> None:
        """An entry picked by the user: "Open dataset…" opens the folder browser (the list goes back
        to the previous choice until a dataset is chosen)."""
        if self.layer_box.itemData(index) != OPEN_DATASET:
            return
        if self.last_choice is not None:
            self.refresh_layers()  # back to the previous choice
        self.browse_dataset()

    def browse_dataset(self) -> QFileDialog:
        """A folder browser for a dataset (not modal: QGIS stays usable); the chosen folder is
        opened with :meth:`add_dataset`."""
        if self.folder_dialog is not None:
            self.folder_dialog.close()
        known = datasets.project_datasets()
        start = os.path.dirname(known[-1]) if known else (QgsProject.instance().homePath() or os.path.expanduser("~"))
        dialog = QFileDialog(self, "Open a dataset folder (GeoParquet parts with _manifest.json)", start)
        dialog.setFileMode(QFileDialog.Directory)
        dialog.setOption(QFileDialog.ShowDirsOnly, True)
        dialog.fileSelected.connect(self.add_dataset)
        dialog.finished.connect(lambda _result: self._dialog_closed("folder_dialog"))
        self.folder_dialog = dialog
        dialog.open()
        return dialog

    def _dialog_closed(self, name: str) -> None:
        """A file dialog of the dock (``folder_dialog`` or ``merge_dialog``) was closed: forget and delete it."""
        dialog = getattr(self, name)
        setattr(self, name, None)
        if dialog is not None:
            dialog.deleteLater()

    def add_dataset(self, path: str, model: str | None = None) -> bool:
        """Add the dataset at ``path`` to the list (and the project) and choose it; says what is
        wrong when it is no dataset or has no embeddings."""
        try:
            info = datasets.read_dataset(path)
        except datasets.DatasetError as exc:
            self.warn(str(exc))
            return False
        if not info.embeddings:
            self.warn(f"{info.path}: no embeddings yet ({info.summary()}); it was written without an embedding "
                      "model: only a dataset written with embeddings can be searched here")
            return False
        datasets.remember(info.path)
        found = self.set_dataset(info.path, model)
        if found:
            self.show_status(f"dataset {info.name}: {info.summary()}; type a query and press Enter")
        return found

    def warn(self, text: str) -> None:
        """A problem with what the user chose: the status line and the message bar."""
        self.show_status(text)
        bar = self.message_bar()
        if bar is not None:
            bar.pushMessage("HQRS search", text, Qgis.Warning, 10)

    def enable_map_tips(self) -> None:
        """Switch QGIS's map tips on (once), so captions show when hovering over tiles."""
        action = getattr(self.iface, "actionMapTips", None)
        if callable(action) and action() is not None and not action().isChecked():
            action().trigger()

    # -- searching -----------------------------------------------------------------------------
    def search_text(self) -> None:
        """Enter pressed (or Search clicked)."""
        text = self.query.text().strip()
        if text:
            self.run_request({"text": text}, text)

    def selected_tile_ids(self) -> list[str]:
        """Examples for "find similar": selected result rows, else selected hits, else selected tiles."""
        rows = sorted({index.row() for index in self.table.selectedIndexes()})
        current = self.current_choice()
        if rows and (self.hits_choice is None or current is None or self.hits_choice.ident != current.ident):
            return []  # rows of another layer (never shown: they go when the layer changes)
        if rows:
            return [self.hits[r].result["tile_id"] for r in rows if r < len(self.hits)]
        for layer_id in self.result_layer_ids:
            layer = QgsProject.instance().mapLayer(layer_id)
            if isinstance(layer, QgsVectorLayer) and layer.selectedFeatureCount():
                return [str(f["tile_id"]) for f in layer.selectedFeatures()]
        layer = self.current_layer()
        if isinstance(layer, QgsVectorLayer):
            return [str(f["tile_id"]) for f in layer.selectedFeatures()]
        return []

    def search_similar(self, tile_ids: list[str] | None = None) -> None:
        """Tiles like the examples (see :meth:`selected_tile_ids`)."""
        ids = list(tile_ids) if tile_ids else self.selected_tile_ids()
        if not ids:
            return self.show_status("select result rows or tiles on the map first (or use 'Pick tile…')")
        self.run_request({"similar": ids}, "like " + ", ".join(ids[:3]) + ("…" if len(ids) > 3 else ""))

    def toggle_pick(self, on: bool) -> None:
        """A map tool: click a tile to find tiles like it."""
        canvas = self.iface.mapCanvas() if self.iface is not None else None
        choice = self.current_choice()
        layer = self.results_layer() if choice is not None and choice.dataset else self.current_layer()
        if canvas is None:
            return
        if on and layer is None and choice is not None and choice.dataset:
            self.pick_button.setChecked(False)
            self.show_status("a dataset is not on the map: search it first, then pick a tile among the hits")
            return
        if on and layer is not None:
            self.pick_tool = QgsMapToolIdentifyFeature(canvas, layer)
            self.pick_tool.featureIdentified.connect(lambda feature: self.search_similar([str(feature["tile_id"])]))
            self.pick_tool.deactivated.connect(lambda: self.pick_button.setChecked(False))
            canvas.setMapTool(self.pick_tool)
            self.show_status("click a tile on the map")
        elif self.pick_tool is not None:
            if canvas.mapTool() is self.pick_tool:
                canvas.unsetMapTool(self.pick_tool)
            self.pick_tool = None

    def run_request(self, payload: dict, label: str) -> tasks.CallTask | None:
        """Start a search task: the session (loading the model when needed), the query, the hits'
        captions and thumbnails; the GUI stays free meanwhile."""
        choice = self.current_choice()
        if choice is None:
            self.show_status("choose a tile layer with embeddings (run Processing ▸ HQRS ▸ Models ▸ Embed tiles "
                             "on a tile layer first)")
            return None
        replaced = self.query_text if self.task is not None and not self.task.done else None
        # a request still running is not cancelled (that would stop its session and its loaded
        # model): it ends in the background and its answer is dropped
        self.generation += 1
        generation = self.generation
        self.active_choice = choice
        key = sessions.session_key(choice.path, choice.key if choice.several else "", model=choice.model)
        session = self.session = sessions.get_session(key)
        k = self.k.value()
        heat = self.heatmap.isChecked()
        relay = self.relay
        layer = self.current_layer()
        layer_crs = layer.crs() if layer is not None else None
        crs_text = ""
        if choice.dataset:
            try:
                crs_text = datasets.read_dataset(choice.path).crs  # an engine's ready message says it too
            except datasets.DatasetError as exc:
                self.warn(str(exc))
                return None
        self.query_text = label
        what = "dataset" if choice.dataset else "layer"

        def work(task: tasks.CallTask):
            started = time.perf_counter()
            loaded = None
            if not session.running:
                relay.task_status.emit(generation, f"{before}loading the model of {choice.model} on {key.device}… "
                                                   f"(once per {what})")
                session.start()
                loaded = time.perf_counter() - started
            relay.task_status.emit(generation, f"{before}searching…")
            want = max(k, min(int(session.info.get("tiles", k)), HEAT_MAX_TILES)) if heat else k
            response = session.request({**payload, "k": want})
            results = response.get("results", [])
            relay.task_status.emit(generation, f"{before}reading the hits…")
            hits = self._dataset_hits(results, k) if choice.dataset else self._read_hits(choice.path, results, k)
            return (hits, session.info.get("crs") or crs_text, response, loaded, int(session.info.get("tiles", 0)),
                    dict(session.info))

        before = f"'{replaced}' replaced by '{label}': " if replaced is not None else ""
        similar = "similar" in payload
        self.set_busy(True, before + (f"loading the model of {choice.model}…" if not session.running else "searching…"))

        def done(result, error) -> None:
            if generation == self.generation:  # else: replaced by a newer request, or the layer changed
                self._done(result, error, label, choice, layer_crs, similar)

        self.task = tasks.start(tasks.CallTask(f"HQRS search: {label}", work, done, on_cancel=session.stop))
        return self.task

    @staticmethod
    def _dataset_hits(results: list[dict], k: int) -> list[Hit]:
        """Worker thread: hits of a dataset from the results alone (footprint, caption; thumbnails
        of the best ``k`` read from their raster windows)."""
        hits = []
        for i, result in enumerate(results):
            geometry = QgsGeometry.fromWkt(str(result.get("wkt") or ""))
            if geometry.isNull() or geometry.isEmpty():  # an engine without footprints: the bounds
                bounds = result.get("bounds") or []
                if len(bounds) != 4:
                    continue
                geometry = QgsGeometry.fromRect(QgsRectangle(*(float(v) for v in bounds)))
            thumb = None
            if i < k and result.get("source") and len(result.get("window") or []) == 4:
                thumb = tile_layers.thumbnail(str(result["source"]), tuple(result["window"]))
            hits.append(Hit(result, geometry, str(result.get("caption") or ""), thumb))
        return hits

    @staticmethod
    def _read_hits(path: str, results: list[dict], k: int) -> list[Hit]:
        """Worker thread: geometries, captions and thumbnails of the best ``k`` results (and
        geometries of the rest, for the heat map) from the tile layer's features."""
        with tile_layers.opened_in_worker(tile_layers.engine_layer_uri(path)) as layer:  # keeps the CRS cache sound
            features = tile_layers.features_by_tile(layer, [r["tile_id"] for r in results])
            has_caption = layer.fields().indexOf("caption") >= 0
        hits = []
        for i, result in enumerate(results):
            feature = features.get(str(result["tile_id"]))
            if feature is None:
                continue
            caption = feature["caption"] if has_caption else None
            thumb = None
            if i < k:
                thumb = tile_layers.thumbnail(str(feature["source"]), (feature["x_off"], feature["y_off"],
                                                                      feature["width"], feature["height"]))
            hits.append(Hit(result, QgsGeometry(feature.geometry()), str(caption) if caption else "", thumb))
        return hits

    def _done(self, result, error: EngineError | None, label: str, choice: Choice, layer_crs,
              similar: bool = False) -> None:
        self.set_busy(False)
        if error is not None:
            if error.kind == "cancelled":
                return self.show_status("cancelled")
            return self.report(error)
        hits, crs_text, response, loaded, tiles, info = result
        self.scale = styles.score_scale(info, similar)
        crs = layer_crs
        if choice.dataset or crs is None:
            crs = QgsCoordinateReferenceSystem()
            if crs_text:
                crs.createFromUserInput(crs_text)
        k = self.k.value()
        self.hits = hits[:k]
        self.hits_choice = choice
        self.show_results(label, crs, hits if self.heatmap.isChecked() else [])
        found = f"{len(self.hits)} of the dataset's {tiles:,} tiles" if choice.dataset else f"{len(self.hits)} tiles"
        took = f"{found} in {response.get('seconds', 0.0):.3f} s"
        best = max((float(h.result["score"]) for h in self.hits), default=None)
        if best is not None and not self.scale.is_match(best):
            took = f"no good match for '{label}' (best score {best:.2f}); {took}"
        self.show_status(took + (f" (model loaded in {loaded:.1f} s)" if loaded else ""))
        self.merge_button.setVisible(choice.dataset)
        self.merge_button.setEnabled(bool(self.hits) and not self.merging)

    def set_busy(self, busy: bool, text: str = "") -> None:
        """Buttons and status while a task runs."""
        self.cancel_button.setEnabled(busy)
        self.search_button.setEnabled(not busy)
        self.similar_button.setEnabled(not busy)
        if text:
            self.show_status(text)

    def cancel(self) -> None:
        """Stop the running search (a model being loaded is dropped: the next query loads it again)."""
        if self.task is not None and not self.task.done:
            self.task.cancel()

    # -- presentation --------------------------------------------------------------------------
    def show_status(self, text: str) -> None:
        """The status line."""
        self.status.setText(text)

    def report(self, error: EngineError) -> None:
        """An error in the dock and in the message bar, with the action that fixes it."""
        self.show_status(f"<b>search failed</b>: {error.text}")
        tasks.log(f"search failed: {error.text}", Qgis.Warning)
        bar = self.message_bar()
        if error.kind == "engine":
            self.show_setup()
        if bar is None:
            return
        item = bar.createMessage("HQRS search", error.text)
        action = None
        if error.kind == "engine":
            action = ("Set up engine…", self.show_setup)
        elif "no embeddings" in str(error):
            action = ("Embed tiles…", self.open_embed)
        elif "device" in str(error).lower():
            action = ("HQRS settings…", self.open_settings)
        if action is not None:
            button = QPushButton(action[0])
            button.clicked.connect(action[1])
            item.layout().addWidget(button)
        bar.pushWidget(item, Qgis.Critical if error.kind != "user" else Qgis.Warning, 15)

    def open_embed(self) -> None:
        """The Embed tiles dialog for the current layer."""
        import processing  # the Processing plugin: importable once QGIS has loaded it

        layer = self.current_layer()
        dialog = processing.createAlgorithmDialog("hqrs:embed", {"INPUT": layer.id()} if layer else {})
        if dialog is not None:
            dialog.show()

    def open_settings(self) -> None:
        """HQRS settings."""
        SettingsDialog(self, self.message_bar()).exec_()

    def show_results(self, label: str, crs, heat_hits: list[Hit]) -> None:
        """The table and the results layers (replacing the previous ones)."""
        self.clear_results(keep_table=True)
        self.table.setRowCount(len(self.hits))
        for row, hit in enumerate(self.hits):
            thumb = QTableWidgetItem()
            if hit.thumbnail:
                size = tile_layers.THUMBNAIL_PX
                image = QImage(hit.thumbnail, size, size, 3 * size, QImage.Format_RGB888).copy()
                thumb.setData(Qt.DecorationRole, QIcon(QPixmap.fromImage(image)))  # drawn at the table's icon size
            rank = QTableWidgetItem(str(hit.result["rank"]))
            score = QTableWidgetItem(f"{hit.result['score']:.4f}")
            caption = QTableWidgetItem(hit.caption or "—")
            tip = f"<b>{hit.result['tile_id']}</b><br>{hit.caption}" if hit.caption else hit.result["tile_id"]
            for item in (thumb, rank, score, caption):
                item.setToolTip(tip)
            for column, item in enumerate((thumb, rank, score, caption)):
                self.table.setItem(row, column, item)
        self.table.resizeRowsToContents()
        project = QgsProject.instance()
        root = project.layerTreeRoot()
        group = root.findGroup(RESULTS_GROUP) or root.insertGroup(0, RESULTS_GROUP)
        layers = []
        if heat_hits:
            layers.append(styles.hits_layer(f'heat: "{label}"', crs,
                                            [(h.result, h.geometry, h.caption) for h in heat_hits], heat=True,
                                            scale=self.scale))
        layers.append(styles.hits_layer(f'hits: "{label}"', crs,
                                        [(h.result, h.geometry, h.caption) for h in self.hits], scale=self.scale))
        for layer in layers:
            project.addMapLayer(layer, False)
            group.insertLayer(0, layer)
            self.result_layer_ids.append(layer.id())
        self.enable_map_tips()

    def clear_results(self, keep_table: bool = False) -> None:
        """Remove the dock's results layers (also those of an earlier session of the plugin) and
        the table."""
        project = QgsProject.instance()
        group = project.layerTreeRoot().findGroup(RESULTS_GROUP)
        ids = list(self.result_layer_ids)
        if isinstance(group, QgsLayerTreeGroup):
            ids += [node.layerId() for node in group.findLayers() if node.layer() is not None
                    and node.layer().providerType() == "memory"
                    and node.layer().customProperty(styles.STYLED) in ("hits", "heat")]
        removed = False
        for layer_id in dict.fromkeys(ids):
            if project.mapLayer(layer_id) is not None:
                project.removeMapLayer(layer_id)
                removed = True
        self.result_layer_ids = []
        if isinstance(group, QgsLayerTreeGroup) and not group.children():
            project.layerTreeRoot().removeChildNode(group)
        canvas = self.iface.mapCanvas() if removed and self.iface is not None else None
        if canvas is not None:
            canvas.refresh()  # QGIS keeps drawing removed layers' last image until the next refresh
        if not keep_table:
            self.hits = []
            self.hits_choice = None
            self.merge_button.setVisible(False)
            self.table.setRowCount(0)
            self.show_status("")

    def results_layer(self) -> QgsVectorLayer | None:
        """The current hits layer."""
        for layer_id in reversed(self.result_layer_ids):
            layer = QgsProject.instance().mapLayer(layer_id)
            if isinstance(layer, QgsVectorLayer) and layer.name().startswith("hits:"):
                return layer
        return None

    def zoom_to_row(self, row: int, _column: int = 0) -> None:
        """Clicking a result zooms the map to its tile (and flashes it)."""
        if row >= len(self.hits) or self.iface is None:
            return
        hit, layer = self.hits[row], self.results_layer() or self.current_layer()
        if layer is None:  # the results layer was removed and a dataset has none
            return
        canvas = self.iface.mapCanvas()
        crs = layer.crs()
        extent = hit.geometry.boundingBox()
        transform = QgsCoordinateTransform(crs, canvas.mapSettings().destinationCrs(), QgsProject.instance())
        extent = transform.transformBoundingBox(extent)
        extent.scale(2.5)
        canvas.setExtent(extent)
        canvas.refresh()
        if hasattr(canvas, "flashGeometries"):
            canvas.flashGeometries([hit.geometry], crs)

    # -- merging a dataset's area -------------------------------------------------------------
    def merge_area(self) -> tuple[float, float, float, float] | None:
        """The bounding box (in the dataset's CRS) of the selected result rows, else of all hits."""
        rows = sorted({index.row() for index in self.table.selectedIndexes()})
        hits = [self.hits[r] for r in rows if r < len(self.hits)] or self.hits
        if not hits:
            return None
        box = QgsRectangle(hits[0].geometry.boundingBox())
        for hit in hits[1:]:
            box.combineExtentWith(hit.geometry.boundingBox())
        return (box.xMinimum(), box.yMinimum(), box.xMaximum(), box.yMaximum())

    def merge_hits(self) -> QFileDialog | None:
        """Ask where to write the tiles of the hits' area (a GeoPackage), then :meth:`start_merge`."""
        choice, area = self.hits_choice, self.merge_area()
        if choice is None or not choice.dataset or area is None:
            self.show_status("search a dataset first: the area of its hits is merged")
            return None
        slug = re.sub(r"[^\w]+", "_", self.query_text).strip("_")[:40] or "hits"
        suggested = os.path.join(os.path.dirname(choice.path), f"{os.path.basename(choice.path)}_{slug}.gpkg")
        dialog = QFileDialog(self, "Merge the hits' area into a GeoPackage", os.path.dirname(suggested),
                             "GeoPackage (*.gpkg)")
        dialog.setAcceptMode(QFileDialog.AcceptSave)
        dialog.setDefaultSuffix("gpkg")
        dialog.selectFile(suggested)
        label = self.query_text
        dialog.fileSelected.connect(lambda output: self.start_merge(choice.path, area, output, label))
        dialog.finished.connect(lambda _result: self._dialog_closed("merge_dialog"))
        self.merge_dialog = dialog
        dialog.open()
        return dialog

    def start_merge(self, dataset: str, area: Sequence[float], output: str, label: str = "") -> tasks.EngineTask:
        """``hqrs-geo merge DATASET -o OUTPUT --bbox AREA`` in the background; the layer is added
        to the map when it is written."""
        try:
            tiles, parts = datasets.read_dataset(dataset).tiles_in(area)
            estimate = f" (at most {tiles:,} tiles of {parts:,} parts)"
        except datasets.DatasetError:
            estimate = ""
        name = os.path.basename(dataset)
        args = ["merge", dataset, "-o", output, "--bbox=" + ",".join(repr(float(v)) for v in area)]
        if os.path.exists(output):  # the save dialog asked whether to replace it
            args.append("--overwrite")
        self.merging = True
        self.merge_button.setEnabled(False)
        self.show_status(f"merging the hits' area of {name}{estimate} into {os.path.basename(output)}…")
        title = f'{name}: "{label}" area' if label else f"{name}: area"

        def done(result) -> None:
            self.merging = False
            self.merge_button.setEnabled(bool(self.hits))
            if not result.ok:
                text = "cancelled" if result.cancelled else (result.error.text if result.error else "failed")
                return self.show_status(f"<b>merge failed</b>: {text}")
            layer = QgsVectorLayer(tile_layers.engine_layer_uri(output), title, "ogr")
            if not layer.isValid():
                return self.show_status(f"<b>merge failed</b>: {output} cannot be opened")
            QgsProject.instance().addMapLayer(layer)
            self.merged_layer_id = layer.id()
            count = int(result.final.get("tiles", layer.featureCount()))
            self.show_status(f"{count:,} tiles of {name} merged into {output}; added to the map (searchable from "
                             "the list)")

        self.merge_task = tasks.start(tasks.EngineTask(f"HQRS: merge {name}", args, on_done=done,
                                                       message_bar=self.message_bar()))
        return self.merge_task

    def close_sessions(self) -> None:
        """Stop every search process (plugin unload, QGIS exit)."""
        if self.task is not None and not self.task.done:
            self.task.cancel()
        sessions.close_all()

    def unload(self) -> None:
        """Disconnect from the project and settings, stop searches and merges (plugin unload)."""
        self.toggle_pick(False)
        self.fewshot.unload()
        self.changes.unload()
        self.close_sessions()
        if self.merging and self.merge_task is not None:
            self.merge_task.on_done = None  # the dock may be gone when it ends
            self.merge_task.cancel()
        for dialog in (self.folder_dialog, self.merge_dialog):
            if dialog is not None:
                dialog.close()
        self.refresh_timer.stop()
        connected = [(signal, self.refresh_layers) for signal in self._project_signals()]
        connected.append((QgsApplication.taskManager().taskAdded, self.on_task_added))
        for signal, slot in (*connected, (settings.notifier.changed, self.on_settings_changed)):
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError):
                pass
