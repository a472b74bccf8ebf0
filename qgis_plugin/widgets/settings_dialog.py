"""HQRS settings: the engine's interpreter (with a file browser, a check and the set-up), the
default models, checkpoint, device, batch size and tiling. Each one reaches the engine: see
:mod:`..core.settings`."""
from __future__ import annotations

from qgis.gui import QgsFileWidget
from qgis.PyQt import sip
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..core import engine, settings, tasks
from ..core.registry import CLIP_MODELS, COCA_MODELS, MODELS
from ..core.runner import EngineError
from .engine_setup import EngineSetupDialog


class SettingsDialog(QDialog):
    """Edit, check and save the plugin's settings."""

    def __init__(self, parent=None, message_bar=None):
        super().__init__(parent)
        self.message_bar = message_bar
        self.setWindowTitle("HQRS settings")
        self.setMinimumWidth(560)
        form = QFormLayout(self)
        current = settings.values()
        self.interpreter = QgsFileWidget()
        self.interpreter.setDialogTitle("Python of the engine's environment")
        self.interpreter.setFilePath(current["interpreter"])
        self.interpreter.lineEdit().setPlaceholderText(
            f"default: {engine.installed_engine() or engine.qgis_python()}")
        self.check = QPushButton("Check engine")
        self.setup = QPushButton("Set up engine…")
        engine_row = QWidget()
        row = QHBoxLayout(engine_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.check)
        row.addWidget(self.setup)
        row.addStretch(1)
        self.check_result = QLabel("")
        self.check_result.setWordWrap(True)
        self.model = self._models(CLIP_MODELS, current["model"])
        self.caption_model = self._models(COCA_MODELS, current["caption_model"])
        self.checkpoint = QgsFileWidget()
        self.checkpoint.setFilter("Checkpoints (*.pt *.pth *.bin *.safetensors *.ckpt);;All files (*.*)")
        self.checkpoint.setFilePath(current["checkpoint"])
        self.checkpoint.lineEdit().setPlaceholderText("default: the engine's checkpoint cache")
        self.device = QComboBox()
        self.device_note = QLabel("")
        self.device_note.setWordWrap(True)
        self.devices: list[str] | None = None  # what the engine reported (None: not known yet)
        self.devices_python: str | None = None  # the interpreter that reported them
        self.device_task: tasks.CallTask | None = None
        self._fill_devices(None, current["device"])
        self.batch = QSpinBox()
        self.batch.setRange(1, 4096)
        self.batch.setValue(current["batch_size"])
        self.tile_size = QDoubleSpinBox()
        self.tile_size.setRange(1, 100000)
        self.tile_size.setDecimals(1)
        self.tile_size.setValue(current["tile_size"])
        self.tile_unit = QComboBox()
        self.tile_unit.addItem("pixels", "px")
        self.tile_unit.addItem("metres on the ground", "m")
        self.tile_unit.setCurrentIndex(settings.TILE_UNITS.index(current["tile_unit"]))
        tile_row = QWidget()
        row = QHBoxLayout(tile_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.tile_size)
        row.addWidget(self.tile_unit)
        self.overlap = QDoubleSpinBox()
        self.overlap.setRange(0, 90)
        self.overlap.setSuffix(" %")
        self.overlap.setValue(current["overlap"])
        self.gsd = QDoubleSpinBox()
        self.gsd.setRange(0, 10000)
        self.gsd.setDecimals(2)
        self.gsd.setSpecialValueText("native")
        self.gsd.setValue(current["gsd"])
        for label, widget in (("Engine's Python", self.interpreter), ("", engine_row), ("", self.check_result),
                              ("Embedding model", self.model), ("Its checkpoint", self.checkpoint),
                              ("Caption model", self.caption_model), ("Device", self.device), ("", self.device_note),
                              ("Batch size", self.batch), ("Tile size", tile_row), ("Overlap", self.overlap),
                              ("Resample to (m/px)", self.gsd)):
            form.addRow(label, widget)
        note = QLabel("<small>Models, checkpoint, device, batch size and tiling are the defaults of the HQRS "
                      "Processing algorithms; the device and checkpoint also apply to the search dock.</small>")
        note.setWordWrap(True)
        form.addRow(note)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        form.addRow(buttons)
        buttons.accepted.connect(self.save)
        buttons.rejected.connect(self.reject)
        self.check.clicked.connect(self.check_engine)
        self.setup.clicked.connect(self.open_setup)
        self.device.currentIndexChanged.connect(self._device_chosen)
        self.interpreter.fileChanged.connect(lambda _path: self.list_devices())
        self.task: tasks.CallTask | None = None
        self.list_devices()

    # -- devices -------------------------------------------------------------------------------
    def _python(self) -> str:
        return self.interpreter.filePath().strip() or engine.interpreter()

    def list_devices(self) -> tasks.CallTask | None:
        """Offer the devices the chosen engine reports (a cached probe at once, else one in the
        background: importing torch takes seconds)."""
        python, device = self._python(), self.device.currentData() or settings.value("device")
        info = engine.cached(python, device) or engine.cached(python, "auto")
        if info is not None and info.devices:
            self._devices_known(info, python)
            return None
        self.device_note.setText("<small>checking which devices this engine can use…</small>")

        def done(info, error) -> None:
            if sip.isdeleted(self.device_note):
                return
            if error is None and info is not None and info.installed and info.devices:
                self._devices_known(info, python)
            else:
                self.devices, self.devices_python = None, None
                self._fill_devices(None, self.device.currentData())
                self.device_note.setText("<small>the devices are listed once the engine runs (Set up engine…)"
                                         "</small>")

        self.device_task = tasks.start(tasks.CallTask(
            "HQRS: listing the engine's devices", lambda _t: engine.probe(python, device), done, can_cancel=False))
        return self.device_task

    def _devices_known(self, info: engine.EngineInfo, python: str) -> None:
        self.devices, self.devices_python = info.devices, python
        self._fill_devices(info, self.device.currentData() or settings.value("device"))

    def _fill_devices(self, info: engine.EngineInfo | None, chosen: str) -> None:
        """auto, then the engine's devices (cpu only while they are not known); a chosen device the
        engine does not have stays listed, marked, with a note saying what to choose."""
        self.device.blockSignals(True)
        self.device.clear()
        self.device.addItem("auto", "auto")
        self.device.setItemData(0, "the best this engine has: a CUDA GPU, else Apple MPS, else the CPU", Qt.ToolTipRole)
        for name in (self.devices or ["cpu"]):
            self.device.addItem(name, name)
            self.device.setItemData(self.device.count() - 1, info.device_label(name) if info else name,
                                    Qt.ToolTipRole)
        if self.device.findData(chosen) < 0 and chosen:
            self.device.addItem(f"{chosen} (not available here)" if self.devices is not None else chosen, chosen)
        self.device.setCurrentIndex(max(0, self.device.findData(chosen)))
        self.device.blockSignals(False)
        self._device_chosen()

    def unavailable_device(self) -> str | None:
        """The chosen device when the engine reported its devices and it is not one of them."""
        chosen = str(self.device.currentData() or "")
        if self.devices is None or self.devices_python != self._python() or chosen in ("auto", *self.devices):
            return None
        return chosen

    def device_advice(self, device: str) -> str:
        """What to choose instead of ``device`` (one line)."""
        instead = " or ".join(["auto", *(self.devices or ["cpu"])][:3])
        what = "CUDA GPU" if device.startswith("cuda") else "Apple GPU (MPS)" if device == "mps" else device
        return f"{device} is not available here (this engine's torch sees no {what}): choose {instead}"

    def _device_chosen(self, *_args) -> None:
        device = self.unavailable_device()
        if device is not None:
            self.device_note.setText(f"<small><b>{self.device_advice(device)}</b></small>")
        elif self.devices is not None:
            self.device_note.setText("<small>this engine can use: " + ", ".join(["auto", *self.devices]) + "</small>")

    @staticmethod
    def _models(names, chosen: str) -> QComboBox:
        box = QComboBox()
        for name in names:
            box.addItem(name, name)
            box.setItemData(box.count() - 1, MODELS[name][2], 3)  # 3: Qt.ToolTipRole
        box.setCurrentIndex(max(0, box.findData(chosen)))
        return box

    def check_engine(self) -> tasks.CallTask:
        """Check the chosen interpreter in the background; the result shows which device it uses."""
        python = self.interpreter.filePath().strip() or None
        device = self.device.currentData() or "auto"
        self.check_result.setText("checking… (importing torch takes a few seconds)")
        self.check.setEnabled(False)

        def done(info, error: EngineError | None) -> None:
            self.check.setEnabled(True)
            if error is not None or info is None:
                self.check_result.setText(f"check failed: {error}")
            elif info.ok:
                self.check_result.setText(f"engine OK: {info.summary}")
            else:
                self.check_result.setText(info.problem.text)
            if info is not None and info.installed and info.devices and not sip.isdeleted(self.device):
                self._devices_known(info, python or engine.interpreter())

        self.task = tasks.start(tasks.CallTask(
            "HQRS: checking the engine", lambda _t: engine.probe(python, device, use_cache=False), done,
            can_cancel=False))
        return self.task

    def open_setup(self) -> None:
        """The engine set-up dialog; its interpreter fills the field."""
        dialog = EngineSetupDialog(self, self.message_bar)
        dialog.panel.engine_ready.connect(lambda _summary: self.interpreter.setFilePath(settings.value("interpreter")))
        dialog.exec_()

    def save(self) -> None:
        """Store the settings (announcing what changed) and close; a device the engine does not
        have is refused with what to choose instead."""
        device = self.unavailable_device()
        if device is not None:
            self.device_note.setText(f"<small><b>{self.device_advice(device)}</b></small>")
            self.device.setFocus()
            return
        settings.set_values({
            "interpreter": self.interpreter.filePath().strip(), "model": self.model.currentData(),
            "caption_model": self.caption_model.currentData(), "checkpoint": self.checkpoint.filePath().strip(),
            "device": self.device.currentData() or "auto", "batch_size": self.batch.value(),
            "tile_size": self.tile_size.value(), "tile_unit": self.tile_unit.currentData(),
            "overlap": self.overlap.value(), "gsd": self.gsd.value()})
        self.accept()
