"""HQRS settings (QgsSettings): engine interpreter, model, device, batch size, tiling defaults."""
from __future__ import annotations

from qgis.gui import QgsFileWidget
from qgis.PyQt.QtWidgets import (
    QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFormLayout, QLabel, QLineEdit, QPushButton, QSpinBox,
)

from .engine import default_interpreter, engine_problem, set_setting, setting

DEFAULTS = {"interpreter": "", "model": "", "checkpoint": "", "device": "auto", "batch_size": 32,
            "tile_size": 256, "overlap": 0, "gsd": 0.0}


def value(name: str):
    """A setting with its documented default and type."""
    default = DEFAULTS[name]
    raw = setting(name, default)
    return type(default)(raw) if raw not in (None, "") else default


class SettingsDialog(QDialog):
    """Edit and check the plugin's settings."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWindowTitle("HQRS settings")
        form = QFormLayout(self)
        self.interpreter = QLineEdit(value("interpreter"))
        self.interpreter.setPlaceholderText(default_interpreter())
        self.check = QPushButton("Check engine")
        self.check_result = QLabel("")
        self.check_result.setWordWrap(True)
        self.model = QLineEdit(value("model"))
        self.model.setPlaceholderText("registry name (empty: the shipped demo model hqrs-mini-clip)")
        self.checkpoint = QgsFileWidget()
        self.checkpoint.setFilePath(value("checkpoint"))
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda", "mps"])
        self.device.setCurrentText(value("device"))
        self.batch = QSpinBox()
        self.batch.setRange(1, 4096)
        self.batch.setValue(value("batch_size"))
        self.tile_size = QSpinBox()
        self.tile_size.setRange(16, 8192)
        self.tile_size.setValue(value("tile_size"))
        self.overlap = QSpinBox()
        self.overlap.setRange(0, 90)
        self.overlap.setSuffix(" %")
        self.overlap.setValue(value("overlap"))
        self.gsd = QDoubleSpinBox()
        self.gsd.setRange(0, 10000)
        self.gsd.setSpecialValueText("native")
        self.gsd.setValue(value("gsd"))
        for label, widget in (("Python interpreter", self.interpreter), ("", self.check), ("", self.check_result),
                              ("Model", self.model), ("Checkpoint", self.checkpoint), ("Device", self.device),
                              ("Batch size", self.batch), ("Tile size (px)", self.tile_size),
                              ("Overlap", self.overlap), ("Target resolution (m)", self.gsd)):
            form.addRow(label, widget)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        form.addRow(buttons)
        buttons.accepted.connect(self.save)
        buttons.rejected.connect(self.reject)
        self.check.clicked.connect(self.check_engine)

    def check_engine(self) -> None:
        """Show whether the chosen interpreter can run the engine (or what to install)."""
        problem = engine_problem(self.interpreter.text().strip() or None)
        self.check_result.setText(problem or "engine OK")

    def save(self) -> None:
        """Store the settings and close."""
        for name, val in (("interpreter", self.interpreter.text().strip()), ("model", self.model.text().strip()),
                          ("checkpoint", self.checkpoint.filePath()), ("device", self.device.currentText()),
                          ("batch_size", self.batch.value()), ("tile_size", self.tile_size.value()),
                          ("overlap", self.overlap.value()), ("gsd", self.gsd.value())):
            set_setting(name, val)
        self.accept()
