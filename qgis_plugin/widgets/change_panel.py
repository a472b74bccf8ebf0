"""The change part of the search dock: "Compare with…" two dates, the change layer, the top changed tiles.

"Compare with…" opens a small dialog on the current date (the dock's tile layer, else the active
raster or tile layer of the layers panel): pick the other date (a raster or tile layer of the
project, or a file), optionally a text for "tiles that became …" / "stopped being …" and class
labels, then Compare. The engine runs ``hqrs-geo change`` as a cancellable QgsTask (the GUI never
waits); when it ends the change layer is added above the imagery with the change style and the
panel lists the most changed tiles (rank, score, before → after classes and captions). Clicking a
row zooms the map to the tile, selects it in the change layer and flashes it. A failed run shows
the engine's one-line error.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from qgis.core import (
    Qgis,
    QgsCoordinateTransform,
    QgsMapLayer,
    QgsMapLayerProxyModel,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.gui import QgsCollapsibleGroupBox, QgsFileWidget, QgsMapLayerComboBox
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QObject, Qt, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..core import changes, styles, tasks, tile_layers
from ..core.changes import ChangedTile, ChangeError, ChangeOptions
from ..core.runner import CliResult, EngineError

if TYPE_CHECKING:
    from .dock import SearchDock

COLUMNS = ("#", "score", "before → after")
DATE_FILTER = ("Rasters and tile layers (*.tif *.tiff *.vrt *.jp2 *.img *.gpkg *.parquet *.geoparquet *.fgb);;"
               "All files (*.*)")


def date_layers(project: QgsProject | None = None) -> list[QgsMapLayer]:
    """The project's layers that can be a date: file rasters and tile layers."""
    return [layer for layer in (project or QgsProject.instance()).mapLayers().values()
            if changes.is_date_layer(layer) and layer.customProperty(styles.STYLED) not in ("classes",
                                                                                           styles.CHANGE_STYLE)]


class DateBox(QWidget):
    """One date: a layer box (rasters and tile layers of the project) and a file button; a file
    chosen is listed in the box as its path."""

    changed = pyqtSignal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.combo = QgsMapLayerComboBox()
        self.combo.setFilters(QgsMapLayerProxyModel.RasterLayer | QgsMapLayerProxyModel.PolygonLayer)
        self.combo.setAllowEmptyLayer(True)
        self.combo.setShowCrs(False)
        self.file_button = QToolButton()
        self.file_button.setText("File…")
        self.file_button.setToolTip("A raster file or tile layer file of this date that is not in the project")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 1)
        layout.addWidget(self.file_button)
        self.file_button.clicked.connect(self.browse)
        self.combo.layerChanged.connect(lambda _layer: self.changed.emit())
        self.combo.currentIndexChanged.connect(lambda _index: self.changed.emit())
        self.refresh()

    def refresh(self) -> None:
        """Offer only the layers that can be a date (file rasters, tile layers)."""
        allowed = {layer.id() for layer in date_layers()}
        self.combo.setExceptedLayerList([layer for layer in QgsProject.instance().mapLayers().values()
                                         if layer.id() not in allowed])

    def set_layer(self, layer: QgsMapLayer | None) -> None:
        """Choose ``layer``."""
        self.combo.setLayer(layer)

    def set_file(self, path: str) -> None:
        """Choose a file (listed in the box by its path)."""
        items = list(self.combo.additionalItems())
        if path not in items:
            self.combo.setAdditionalItems([*items, path])
        self.combo.setCurrentIndex(self.combo.findText(path))

    def browse(self) -> None:
        """A file dialog for a raster or tile layer file."""
        start = QgsProject.instance().homePath() or os.path.expanduser("~")
        path, _filter = QFileDialog.getOpenFileName(self, "A raster or tile layer of this date", start, DATE_FILTER)
        if path:
            self.set_file(path)

    def layer(self) -> QgsMapLayer | None:
        """The chosen layer (None for a file)."""
        return self.combo.currentLayer()

    def path(self) -> str:
        """The file the engine reads for the chosen date; a one-line ChangeError when none fits."""
        layer = self.combo.currentLayer()
        if layer is not None:
            return changes.date_path(layer)
        text = self.combo.currentText().strip()
        if text and os.path.exists(text):
            return text
        raise ChangeError("choose a raster or tile layer for this date (or a file with File…)")

    def is_raster(self) -> bool:
        """True when the chosen date is a raster (tiled and embedded by the run)."""
        layer = self.combo.currentLayer()
        if layer is not None:
            return isinstance(layer, QgsRasterLayer)
        return os.path.splitext(self.combo.currentText())[1].lower() not in tile_layers.TILE_SUFFIXES


class CompareDialog(QDialog):
    """Compare with…: the two dates and what to compute (not modal: QGIS stays usable)."""

    def __init__(self, panel: ChangePanel, before: QgsMapLayer | None = None):
        super().__init__(panel)
        self.setWindowTitle("HQRS: compare with another date")
        self.panel = panel
        self.before = DateBox()
        self.after = DateBox()
        self.before.set_layer(before)
        self.after.set_layer(self.other_date(before))
        self.became = QLineEdit()
        self.became.setPlaceholderText("optional, e.g. a solar farm")
        self.became.setToolTip("Rank tiles by how much more like this text they look after than before")
        self.stopped = QLineEdit()
        self.stopped.setPlaceholderText("optional, e.g. a forest")
        self.stopped.setToolTip("Rank tiles by how much less like this text they look after than before")
        self.labels = QLineEdit()
        self.labels.setPlaceholderText("optional, e.g. farmland, forest, residential, water")
        self.labels.setToolTip("Comma-separated class names: each date gets the most similar one (farmland → "
                               "residential)")
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 100.0)
        self.threshold.setDecimals(1)
        self.threshold.setSingleStep(0.5)
        self.threshold.setValue(changes.DEFAULT_THRESHOLD)
        self.threshold.setToolTip("A tile pair counts as changed from this change score on (a robust z-score "
                                  "within this pair of scenes: 3 is far beyond the scene's usual differences)")
        self.captions = QCheckBox("caption both dates")
        self.captions.setChecked(True)
        self.output = QgsFileWidget()
        self.output.setStorageMode(QgsFileWidget.SaveFile)
        self.output.setFilter("GeoPackage (*.gpkg);;GeoParquet (*.parquet);;FlatGeobuf (*.fgb)")
        self.output.lineEdit().setPlaceholderText("[beside the earlier date]")
        self.hint = QLabel("")
        self.hint.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Earlier date (before)", self.before)
        form.addRow("Later date (after)", self.after)
        form.addRow("Tiles that became…", self.became)
        form.addRow("…or stopped being", self.stopped)
        form.addRow("Class labels", self.labels)
        form.addRow("Changed from score", self.threshold)
        form.addRow("", self.captions)
        form.addRow("Change layer", self.output)
        self.buttons = QDialogButtonBox(QDialogButtonBox.Cancel)
        self.compare_button = self.buttons.addButton("Compare", QDialogButtonBox.AcceptRole)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.hint)
        layout.addWidget(self.buttons)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        self.before.changed.connect(self.check)
        self.after.changed.connect(self.check)
        self.resize(560, self.sizeHint().height())
        self.check()

    @staticmethod
    def other_date(before: QgsMapLayer | None) -> QgsMapLayer | None:
        """A guess at the other date: another layer of the same kind (raster or tile layer) that
        overlaps ``before``, else any other date layer."""
        if before is None:
            return None
        others = [layer for layer in date_layers() if layer.id() != before.id()]
        same = [layer for layer in others if isinstance(layer, QgsRasterLayer) == isinstance(before, QgsRasterLayer)]
        for layer in same + [layer for layer in others if layer not in same]:
            try:
                transform = QgsCoordinateTransform(layer.crs(), before.crs(), QgsProject.instance())
                if transform.transformBoundingBox(layer.extent()).intersects(before.extent()):
                    return layer
            except Exception:  # noqa: BLE001 - a CRS that cannot be transformed: not a guess
                continue
        return None

    def check(self) -> bool:
        """Say what is missing; the Compare button only when both dates are usable."""
        problems = []
        for word, box in (("before", self.before), ("after", self.after)):
            try:
                box.path()
            except ChangeError as exc:
                problems.append(f"{word}: {exc}")
        self.hint.setText("<small>" + "<br>".join(problems) + "</small>" if problems else "")
        self.compare_button.setEnabled(not problems)
        return not problems

    def options(self) -> ChangeOptions:
        """What the dialog asks for, with the HQRS settings' models and tiling for raster dates."""
        return changes.settings_options(
            models=self.before.is_raster() or self.after.is_raster(), tiling=self.before.is_raster(),
            became=self.became.text().strip(), stopped=self.stopped.text().strip(),
            labels=changes.split_labels(self.labels.text()), threshold=self.threshold.value(),
            captions=self.captions.isChecked())

    def accept(self) -> None:
        """Start the comparison in the panel (the dialog stays open with the one-line problem when
        it cannot start)."""
        if not self.check():
            return
        try:
            before, after = self.before.path(), self.after.path()
            output = self.output.filePath().strip() or changes.default_output(before, after)
            self.panel.compare(before, after, output, self.options())
        except ChangeError as exc:
            self.hint.setText(f"<b>{exc}</b>")
            return
        super().accept()


class _Relay(QObject):
    progress = pyqtSignal(float, str)


class ChangePanel(QgsCollapsibleGroupBox):
    """Compare with…, the run's progress and Cancel, and the list of the most changed tiles."""

    def __init__(self, dock: SearchDock):
        super().__init__("What changed (compare two dates)")
        self.setObjectName("HqrsChanges")
        self.dock = dock
        self.task: tasks.EngineTask | None = None
        self.read_task: tasks.CallTask | None = None
        self.dialog: CompareDialog | None = None
        self.rows: list[ChangedTile] = []
        self.layer_id: str | None = None
        self.serial = 0
        self.relay = _Relay()
        self.relay.progress.connect(self.show_progress)
        self._build()

    def _build(self) -> None:
        # one body under the group box: expanding it shows every widget directly under it, which
        # would show the progress bar between runs
        body = QWidget()
        QVBoxLayout(self).addWidget(body)
        layout = QVBoxLayout(body)
        layout.setContentsMargins(0, 0, 0, 0)
        self.compare_button = QPushButton("Compare with…")
        self.compare_button.setToolTip("Compare the current tile layer or raster with another date of the same "
                                       "place: a change layer over the imagery and the most changed tiles")
        self.k = QSpinBox()
        self.k.setRange(1, 1000)
        self.k.setValue(50)
        self.k.setPrefix("list ")
        self.k.setToolTip("How many of the most changed tiles to list (all are on the map)")
        self.cancel_button = QToolButton()
        self.cancel_button.setText("Cancel")
        self.cancel_button.setEnabled(False)
        row = QHBoxLayout()
        row.addWidget(self.compare_button)
        row.addWidget(self.k)
        row.addStretch(1)
        row.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setVisible(False)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setWordWrap(True)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.Stretch)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addLayout(row)
        layout.addWidget(self.progress)
        layout.addWidget(self.table, 1)  # the section's height beyond its buttons (the dock's splitter)
        layout.addWidget(self.status)
        self.compare_button.clicked.connect(self.open_dialog)
        self.cancel_button.clicked.connect(self.cancel)
        self.table.cellClicked.connect(self.row_clicked)

    # -- starting ------------------------------------------------------------------------------
    def current_date(self) -> QgsMapLayer | None:
        """The date to compare from: the dock's tile layer, else the active layer of the layers
        panel when it is a raster or tile layer."""
        layer = self.dock.current_layer()
        if layer is not None and changes.is_date_layer(layer):
            return layer
        iface = self.dock.iface
        active = iface.activeLayer() if iface is not None and hasattr(iface, "activeLayer") else None
        return active if changes.is_date_layer(active) else None

    def open_dialog(self, before: QgsMapLayer | None = None) -> CompareDialog:
        """The Compare with… dialog on ``before`` (default: :meth:`current_date`)."""
        if self.dialog is not None and not sip.isdeleted(self.dialog):
            self.dialog.close()
            self.dialog.deleteLater()
        self.setCollapsed(False)
        self.dialog = CompareDialog(self, before if isinstance(before, QgsMapLayer) else self.current_date())
        self.dialog.show()
        return self.dialog

    def compare(self, before: str, after: str, output: str, options: ChangeOptions) -> tasks.EngineTask:
        """Run ``hqrs-geo change BEFORE AFTER -o OUTPUT`` in the background; the change layer and the
        list follow when it ends. A comparison still running is cancelled first."""
        args = changes.change_args(before, after, output, options)  # ChangeError: the caller says it
        if self.task is not None and self.result_pending():
            self.task.on_done = None
            self.task.cancel()
        self.serial += 1
        serial = self.serial
        name = changes.layer_name(before, after, options)
        relay = self.relay

        def done(result: CliResult) -> None:
            if serial == self.serial and not sip.isdeleted(self):
                self.finished(result, output, name, options)

        task = tasks.EngineTask(f"HQRS: {name}", args, on_done=done, message_bar=None)
        task.progressChanged.connect(
            lambda percent, task=task: relay.progress.emit(percent, task.last.text if task.last else ""))
        self.task = task  # (the list of the previous comparison stays until this one's replaces it)
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self.cancel_button.setEnabled(True)
        self.compare_button.setEnabled(False)
        self.show_status(f"comparing {changes.date_name(before)} {changes.ARROW} {changes.date_name(after)}… "
                         "(a raster date is tiled, embedded and captioned first)")
        tasks.log(f"{name}: hqrs-geo {' '.join(args)}")
        tasks.start(task)
        return task

    def result_pending(self) -> bool:
        """True while a comparison runs."""
        return self.task is not None and self.cancel_button.isEnabled()

    def show_progress(self, percent: float, text: str) -> None:
        """A progress event of the engine."""
        if not self.result_pending():
            return
        self.progress.setValue(int(percent))
        if text:
            self.show_status(text)

    def cancel(self) -> None:
        """Stop the running comparison (finished embeddings and captions of the dates are kept)."""
        if self.task is not None and self.result_pending():
            self.task.cancel()

    # -- ending --------------------------------------------------------------------------------
    def finished(self, result: CliResult, output: str, name: str, options: ChangeOptions) -> None:
        """Main thread: the change layer on the map and the list, or the engine's one-line error."""
        self.progress.setVisible(False)
        self.cancel_button.setEnabled(False)
        self.compare_button.setEnabled(True)
        if not result.ok:
            if result.cancelled:
                return self.show_status("comparison cancelled; finished embeddings and captions of the dates are "
                                        "kept, so comparing again resumes")
            error = result.error or EngineError("the engine failed")
            return self.report(error)
        layer = self.add_change_layer(output, name, options.threshold)
        if layer is None:
            return self.report(EngineError(f"the change layer {output} cannot be opened", "internal"))
        said = changes.summary(result.final or {}, options.ranking)
        self.show_status(f"{said}; reading the most changed tiles…" if said else "reading the most changed tiles…")
        k, ranking, serial = self.k.value(), options.ranking, self.serial

        def read(_task: tasks.CallTask) -> list[ChangedTile]:
            try:
                return changes.read_change_file(output, k, ranking)
            except ChangeError as exc:
                raise EngineError(str(exc), "user") from None

        def shown(rows, error: EngineError | None) -> None:
            if serial != self.serial or sip.isdeleted(self):
                return
            if error is not None:
                return self.report(error)
            self.show_rows(rows or [])
            self.show_status(f"{said}. Click a row to zoom to its tile." if said else
                             "Click a row to zoom to its tile.")

        self.read_task = tasks.start(tasks.CallTask("HQRS: most changed tiles", read, shown, can_cancel=False))

    def report(self, error: EngineError) -> None:
        """The engine's one-line error in the panel and the message bar."""
        text = error.text
        self.show_status(f"<b>comparison failed</b>: {text}")
        tasks.log(f"comparison failed: {text}", Qgis.Warning)
        bar = self.dock.message_bar()
        if bar is not None:
            bar.pushMessage("HQRS compare", text, Qgis.Warning if error.kind == "user" else Qgis.Critical, 15)

    def add_change_layer(self, output: str, name: str, threshold: float) -> QgsVectorLayer | None:
        """The change layer of ``output`` at the top of the layers (over the imagery), styled; an
        earlier change layer of the same file is replaced."""
        uri = changes.change_layer_uri(output)
        layer = QgsVectorLayer(uri, name, "ogr")
        if not layer.isValid() or layer.fields().indexOf("change_score") < 0:
            return None
        project = QgsProject.instance()
        for other in list(project.mapLayers().values()):
            if other.customProperty(styles.STYLED) == styles.CHANGE_STYLE and other.source() == layer.source():
                project.removeMapLayer(other.id())
        tile_layers.settle_new_layer(layer, new=False)
        styles.change_style(layer, threshold)
        project.addMapLayer(layer, False)
        project.layerTreeRoot().insertLayer(0, layer)
        styles.show_feature_counts(layer, project)
        self.layer_id = layer.id()
        canvas = self.dock.iface.mapCanvas() if self.dock.iface is not None else None
        if canvas is not None:
            canvas.refresh()
        return layer

    def change_layer(self) -> QgsVectorLayer | None:
        """The change layer of the last comparison, while it is in the project."""
        layer = QgsProject.instance().mapLayer(self.layer_id) if self.layer_id else None
        return layer if isinstance(layer, QgsVectorLayer) else None

    def show_rows(self, rows: list[ChangedTile]) -> None:
        """The most changed tiles: rank, score, before → after."""
        self.rows = rows
        self.table.setRowCount(len(rows))
        self.table.scrollToTop()
        for row, tile in enumerate(rows):
            what = tile.what or tile.tile_id
            tip = f"<b>{tile.tile_id}</b>"
            if tile.change_score is not None:
                tip += f"<br>change score {tile.change_score:.2f}" + (" (changed)" if tile.changed else "")
            if tile.class_before or tile.class_after:
                tip += f"<br>class: {tile.class_before or '?'} {changes.ARROW} {tile.class_after or '?'}"
            if tile.caption_before or tile.caption_after:
                tip += f"<br>before: {tile.caption_before or '—'}<br>after: {tile.caption_after or '—'}"
            items = (QTableWidgetItem(str(tile.rank)), QTableWidgetItem(f"{tile.score:.2f}"), QTableWidgetItem(what))
            for column, item in enumerate(items):
                item.setToolTip(tip)
                self.table.setItem(row, column, item)
        self.table.resizeRowsToContents()

    def row_clicked(self, row: int, _column: int = 0) -> None:
        """Zoom the map to the row's tile, select it in the change layer and flash it."""
        if row >= len(self.rows):
            return
        tile = self.rows[row]
        layer = self.change_layer()
        if layer is not None:
            quoted = tile.tile_id.replace("'", "''")
            layer.selectByExpression(f"\"tile_id\" = '{quoted}'")
        iface = self.dock.iface
        if iface is None or layer is None:
            return
        canvas = iface.mapCanvas()
        transform = QgsCoordinateTransform(layer.crs(), canvas.mapSettings().destinationCrs(), QgsProject.instance())
        extent = transform.transformBoundingBox(tile.geometry.boundingBox())
        extent.scale(4.0)
        canvas.setExtent(extent)
        canvas.refresh()
        if hasattr(canvas, "flashGeometries"):
            canvas.flashGeometries([tile.geometry], layer.crs())

    def show_status(self, text: str) -> None:
        """The panel's status line."""
        self.status.setText(text)

    def unload(self) -> None:
        """The dock goes away: a running comparison is cancelled, the dialog closed."""
        self.serial += 1
        if self.task is not None and self.result_pending():
            self.task.on_done = None
            self.task.cancel()
        if self.read_task is not None and not self.read_task.done:
            self.read_task.on_done = None
        if self.dialog is not None and not sip.isdeleted(self.dialog):
            self.dialog.close()
