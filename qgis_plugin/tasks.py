"""Engine jobs as QgsTasks: progress in the task manager, cancel stops the child process."""
from __future__ import annotations

from typing import Callable, List, Optional

from qgis.core import Qgis, QgsMessageLog, QgsTask

from .engine import CliResult, run_cli


class EngineTask(QgsTask):
    """Runs ``hqrs-geo ARGS`` in the background; ``on_done(result)`` runs in the main thread."""

    def __init__(self, description: str, args: List[str], on_done: Optional[Callable[[CliResult], None]] = None,
                 python: Optional[str] = None, message_bar=None):
        super().__init__(description, QgsTask.CanCancel)
        self.args = list(args)
        self.on_done = on_done
        self.python = python
        self.message_bar = message_bar  # e.g. iface.messageBar(): the CLI's one-line error goes there
        self.result: Optional[CliResult] = None

    def run(self) -> bool:
        """Worker thread: run the CLI, mirroring its progress."""
        self.result = run_cli(self.args, on_progress=lambda p, _m: self.setProgress(p),
                              is_cancelled=self.isCanceled, python=self.python)
        return self.result.ok

    def finished(self, ok: bool) -> None:
        """Main thread: log the outcome and hand it to ``on_done``."""
        if self.result is not None and not ok:
            text = "cancelled; finished work is kept" if self.result.cancelled else (self.result.error or "failed")
            QgsMessageLog.logMessage(f"{self.description()}: {text}", "HQRS", Qgis.Warning)
            if self.message_bar is not None:
                self.message_bar.pushMessage("HQRS", text, Qgis.Info if self.result.cancelled else Qgis.Critical)
        if self.on_done is not None and self.result is not None:
            self.on_done(self.result)
