"""Finding or installing the engine: the panel shown on first run (in the dock) and from the menu.

Installing runs :class:`..core.installer.Installer` in a QgsTask (progress bar, log, cancel).
Before it starts the panel shows what the chosen build costs (download and disk, from
:data:`..core.installer.ENGINE_SIZES`) and the pinned torch/torchvision pair. An installation
ends with the engine self-test; when it fails, the task is marked failed and the real error with
what to do goes to the panel, the message bar and the log (HQRS tab). On success the
``interpreter`` setting points at the new environment, so the dock's next query uses it without
restarting QGIS.
"""
from __future__ import annotations

import html
from pathlib import Path

from qgis.core import Qgis, QgsSettings
from qgis.gui import QgsCollapsibleGroupBox, QgsFileWidget
from qgis.PyQt.QtCore import QObject, Qt, pyqtSignal
from qgis.PyQt.QtGui import QFont
from qgis.PyQt.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..core import engine, installer, sessions, settings, tasks
from ..core.runner import EngineError

TORCH_CHOICES = (("auto", "Automatic: CUDA build with an NVIDIA GPU, else CPU build"), ("cpu", "CPU build"),
                 ("cuda", "CUDA build (NVIDIA GPU)"), ("reuse", "Reuse the PyTorch of another environment"))


class LogRelay(QObject):
    """Carries log lines and progress from the installer's thread to the panel."""

    line = pyqtSignal(str)
    progress = pyqtSignal(float, str)


class EngineSetupPanel(QWidget):
    """Engine status, the installer form, progress, log; emits ``engine_ready(summary)``."""

    engine_ready = pyqtSignal(str)

    def __init__(self, parent=None, message_bar=None):
        super().__init__(parent)
        self.message_bar = message_bar
        self.gpu: str | None = None
        self.cpu_index_online: bool | None = None  # None: not checked yet
        self.task: tasks.CallTask | None = None
        self.installer: installer.Installer | None = None
        layout = QVBoxLayout(self)
        title = QLabel("<b>Set up the HQRS engine</b>")
        intro = QLabel("The models run in a Python environment of their own (PyTorch, open_clip), never inside "
                       "QGIS. Install it here once, or choose the Python of an environment that has "
                       "<i>hqrs_geo</i>.")
        intro.setWordWrap(True)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        form = QFormLayout()
        self.venv = QgsFileWidget()
        self.venv.setStorageMode(QgsFileWidget.GetDirectory)
        self.venv.setFilePath(str(engine.default_engine_dir()))
        self.torch = QComboBox()
        for value, label in TORCH_CHOICES:
            self.torch.addItem(label, value)
        self.reuse_from = QgsFileWidget()
        self.reuse_from.setDialogTitle("Python of the environment whose PyTorch to reuse")
        self.reuse_from.setEnabled(False)
        self.size = QLabel("")
        self.size.setWordWrap(True)
        self.wheel = QgsFileWidget()
        self.wheel.setFilter("Python wheels (*.whl)")
        wheels = installer.bundled_wheels()
        self.wheel.setFilePath(wheels[0] if wheels else "")
        self.wheel.lineEdit().setPlaceholderText("hqrs_geo-….whl file or URL")
        form.addRow("Environment folder", self.venv)
        form.addRow("PyTorch", self.torch)
        form.addRow("  its Python", self.reuse_from)
        form.addRow("Expected size", self.size)
        form.addRow("hqrs_geo wheel", self.wheel)
        advanced = QgsCollapsibleGroupBox("Advanced")
        advanced.setCollapsed(True)
        advanced_form = QFormLayout(advanced)
        self.base_python = QgsFileWidget()
        self.base_python.lineEdit().setPlaceholderText(engine.qgis_python())
        self.find_links = QLineEdit()
        self.find_links.setPlaceholderText("folders of wheels, separated by ;")
        self.no_index = QCheckBox("Only these folders (no package index: offline install)")
        self.mpgi = QCheckBox("MpGI captions (transformers, gguf)")
        self.mpgi.setChecked(True)
        self.replace = QCheckBox("Replace the environment (delete the existing one and install anew)")
        advanced_form.addRow("Create it with", self.base_python)
        advanced_form.addRow("Wheel folders", self.find_links)
        advanced_form.addRow("", self.no_index)
        advanced_form.addRow("Extras", self.mpgi)
        advanced_form.addRow("", self.replace)
        buttons = QHBoxLayout()
        self.install_button = QPushButton("Install engine")
        self.install_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.existing_button = QPushButton("Use an existing Python…")
        for button in (self.install_button, self.cancel_button, self.existing_button):
            buttons.addWidget(button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setVisible(False)
        self.step = QLabel("")
        self.step.setWordWrap(True)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(5000)
        self.log.setFont(QFont("Monospace", 8))
        self.log.setVisible(False)
        for widget in (title, intro, self.status):
            layout.addWidget(widget)
        layout.addLayout(form)
        layout.addWidget(advanced)
        layout.addLayout(buttons)
        for widget in (self.progress, self.step, self.log):
            layout.addWidget(widget)
        layout.addStretch(1)
        self.relay = LogRelay()
        self.relay.line.connect(self.add_log)
        self.relay.progress.connect(self.show_progress)
        self.torch.currentIndexChanged.connect(lambda _i: self.reuse_from.setEnabled(self.torch_choice() == "reuse"))
        self.torch.currentIndexChanged.connect(lambda _i: self.show_size())
        self.show_size()
        self.install_button.clicked.connect(self.install)
        self.cancel_button.clicked.connect(self.cancel)
        self.existing_button.clicked.connect(self.choose_existing)
        self.checking = False

    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        """Check the engine when the panel is first shown (never at plugin load)."""
        super().showEvent(event)
        if not self.status.text():
            self.check()

    # -- state -------------------------------------------------------------------------------
    def torch_choice(self) -> str:
        """Auto | cpu | cuda | reuse."""
        return str(self.torch.currentData())

    def build_kind(self) -> str:
        """The build an installation would get now: ``cpu`` | ``cuda`` | ``reuse`` (auto: by the GPU found)."""
        choice = self.torch_choice()
        if choice == "auto":
            return "cuda" if self.gpu else "cpu"
        return choice

    def show_size(self) -> None:
        """The chosen build's download and disk size, and the pinned pair, before anything starts."""
        kind = self.build_kind()
        size = installer.ENGINE_SIZES[kind]
        try:
            pins = installer.pins_text(installer.read_pins(installer.constraints_file()))
        except EngineError as exc:
            self.size.setText(f"<b>{exc.text}</b>")
            return
        extra = ""
        if kind == "cpu":
            cuda = installer.ENGINE_SIZES["cuda"]
            instead = (f"PyPI's build instead (on Linux the CUDA one: {cuda.download_gb:g} GB download, "
                       f"{cuda.disk_gb:g} GB on disk)")
            if self.cpu_index_online is False:
                host = installer.PYTORCH_CPU_INDEX.split("/")[2]
                extra = f"; <b>the PyTorch CPU index ({host}) cannot be reached from this computer</b>: {instead}"
            else:
                extra = f"; when the PyTorch CPU index cannot be reached, {instead}"
        self.size.setText(f"{size.label}: <b>{installer.size_text(kind)}</b> ({pins}, pinned){extra}")

    def check(self) -> None:
        """Probe the current engine and the machine (GPU, index) in the background."""
        if self.checking:
            return
        self.checking = True
        python = engine.interpreter()
        self.status.setText(f"Checking the engine in {python}…")

        def work(_task):
            info = engine.probe(python, use_cache=False)
            gpu = installer.detect_nvidia_gpu()
            online = installer.index_reachable()
            cpu_online = installer.index_reachable(installer.PYTORCH_CPU_INDEX)
            return info, gpu, online, cpu_online

        tasks.start(tasks.CallTask("HQRS: checking the engine", work, self._checked, can_cancel=False))

    def _checked(self, result, error: EngineError | None) -> None:
        self.checking = False
        if error is not None or result is None:
            self.status.setText(f"Check failed: {error}")
            return
        info, gpu, online, self.cpu_index_online = result
        machine = f"NVIDIA GPU: {gpu}" if gpu else "no NVIDIA GPU (the CPU build of PyTorch is chosen)"
        index = "package index reachable" if online else \
            "<b>the package index (pypi.org) cannot be reached</b>: connect this computer, or give wheel folders " \
            "under Advanced and tick 'Only these folders' (see the guide: docs/qgis-plugin.md)"
        if info.ok:
            text = f"<b>Engine ready</b>: {info.summary}<br><small>{info.python}</small>"
        elif info.installed:  # only the device setting is wrong: a setting to change, nothing to install
            text = (f"<b>Engine ready</b>: hqrs_geo {info.hqrs_geo}, torch {info.torch}<br><b>but</b> "
                    f"{html.escape(info.problem.text if info.problem else '')}<br><small>{info.python}</small>")
        else:
            heading = "Engine broken" if "is broken" in str(info.problem) else "No engine yet"
            text = f"<b>{heading}</b>: {html.escape(str(info.problem))}"
        self.status.setText(f"{text}<br>This computer: {machine}; {index}.")
        self.torch.setItemText(0, f"Automatic: {'CUDA build (' + gpu + ')' if gpu else 'CPU build (no NVIDIA GPU)'}")
        self.gpu = gpu
        self.show_size()
        if info.installed:
            self.engine_ready.emit(info.summary)

    def options(self) -> installer.InstallOptions:
        """The installer options the form describes."""
        extras = ("models", "mpgi") if self.mpgi.isChecked() else ("models",)
        links = tuple(part.strip() for part in self.find_links.text().split(";") if part.strip())
        return installer.InstallOptions(
            venv=self.venv.filePath().strip() or str(engine.default_engine_dir()),
            wheel=self.wheel.filePath().strip() or "hqrs_geo", base_python=self.base_python.filePath().strip(),
            torch=self.torch_choice(), reuse_torch_from=self.reuse_from.filePath().strip(), extras=extras,
            find_links=links, no_index=self.no_index.isChecked(), replace=self.replace.isChecked())

    # -- installing ------------------------------------------------------------------------
    def install(self, options: installer.InstallOptions | None = None) -> tasks.CallTask:
        """Start the installation task (``options`` default to the form's)."""
        options = options if isinstance(options, installer.InstallOptions) else self.options()
        self.log.clear()
        self.log.setVisible(True)
        self.progress.setVisible(True)
        self.progress.setValue(0)
        self.install_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.step.setText(f"Installing the engine into {options.venv}…")
        if any(key.python == options.python for key in sessions.running_sessions()):
            sessions.close_all()  # a search process must not run from files being reinstalled
        relay = self.relay

        def work(task: tasks.CallTask):
            def progress(percent: float, title: str) -> None:
                task.setProgress(percent)
                relay.progress.emit(percent, title)

            self.installer = installer.Installer(options, on_log=relay.line.emit, on_progress=progress,
                                                 is_cancelled=task.isCanceled)
            result = self.installer.run()
            if not result.ok:
                raise installer.InstallFailed(result)  # the task fails: QGIS's task list says so
            return result

        self.task = tasks.start(tasks.CallTask("HQRS: installing the engine", work, self._installed,
                                               on_cancel=self._stop_installer))
        return self.task

    def _stop_installer(self) -> None:
        if self.installer is not None:
            self.installer.cancel()

    def cancel(self) -> None:
        """Cancel the installation."""
        if self.task is not None and not self.task.done:
            self.task.cancel()

    def add_log(self, line: str) -> None:
        """Main thread: one installer log line."""
        self.log.appendPlainText(line)

    def show_progress(self, percent: float, title: str) -> None:
        """Main thread: the installer's progress."""
        self.progress.setValue(int(percent))
        self.step.setText(title)

    def _installed(self, result, error: EngineError | None) -> None:
        self.install_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.task = None
        if error is not None or result is None or not result.ok:
            if isinstance(error, installer.InstallFailed):
                result = error.result
            message = result.message if result is not None and not result.ok else (
                error.text if error is not None else "failed")
            if error is not None and error.kind == "cancelled":
                message = str(error) if result is None else result.message
            first = message.splitlines()[0]
            self.step.setText("<b>Not installed</b>: " + html.escape(message).replace("\n", "<br>"))
            self._bar(f"engine not installed: {first}", Qgis.Info if error and error.kind == "cancelled"
                      else Qgis.Critical)
            tasks.log(f"engine not installed in {result.python if result else ''}: {message}", Qgis.Critical)
            return  # no check here: a working engine elsewhere would switch the dock away from this message
        self.progress.setValue(100)
        settings.set_value("interpreter", result.python)
        self.step.setText(f"<b>{html.escape(result.message)}</b> ({result.seconds:.0f} s). The search dock and the "
                          "Processing algorithms use it now.")
        self._bar(result.message, Qgis.Success)
        tasks.log(result.message, Qgis.Success)
        self.check()

    def choose_existing(self) -> None:
        """Pick the Python of an existing environment; it becomes the interpreter when it works."""
        path, _ = QFileDialog.getOpenFileName(self, "Python of an environment with hqrs_geo",
                                              str(Path(engine.interpreter()).parent))
        if path:
            self.use_python(path)

    def use_python(self, python: str) -> None:
        """Check ``python`` in the background and use it when it runs the engine."""
        self.status.setText(f"Checking {python}…")

        def done(info, error):
            if error is None and info is not None and info.installed:
                settings.set_value("interpreter", python)
                self.status.setText(f"<b>Engine ready</b>: {info.summary}<br><small>{python}</small>")
                self.engine_ready.emit(info.summary)
            else:
                problem = error or (info.problem if info else "")
                self.status.setText(f"<b>{python} cannot run the engine</b>: {problem}")

        tasks.start(tasks.CallTask("HQRS: checking an engine", lambda _t: engine.probe(python, use_cache=False), done,
                                   can_cancel=False))

    def _bar(self, text: str, level) -> None:
        if self.message_bar is not None:
            self.message_bar.pushMessage("HQRS", text, level, 0 if level == Qgis.Critical else 10)


class EngineSetupDialog(QDialog):
    """The set-up panel in a dialog (menu HQRS ▸ Set up engine…, or from the settings)."""

    def __init__(self, parent=None, message_bar=None):
        super().__init__(parent)
        self.setWindowTitle("HQRS engine set-up")
        self.resize(640, 560)
        layout = QVBoxLayout(self)
        self.panel = EngineSetupPanel(self, message_bar)
        layout.addWidget(self.panel)
        buttons = QDialogButtonBox(QDialogButtonBox.Close)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)


def first_run_seen() -> bool:
    """True once the first-run set-up was offered."""
    return bool(QgsSettings().value(settings.key("first_run_seen"), False, type=bool))


def mark_first_run_seen() -> None:
    """Remember that the first-run set-up was offered."""
    QgsSettings().setValue(settings.key("first_run_seen"), True)
