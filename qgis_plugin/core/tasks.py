"""Background work as QgsTasks: the GUI never waits for the engine.

:class:`CallTask` runs a function in a worker thread and hands its result (or EngineError) to a
callback in the main thread; :class:`EngineTask` runs a CLI command with progress and cancel.
Tasks are kept referenced here until they finish (QGIS deletes a task whose Python object was
collected, crashing it).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

from qgis.core import Qgis, QgsApplication, QgsMessageLog, QgsTask

from .engine import interpreter
from .runner import CliResult, EngineError, Progress, run_cli

LOG_TAG = "HQRS"
_alive: set[QgsTask] = set()


def log(message: str, level=Qgis.Info) -> None:
    """A line in the HQRS tab of the message log."""
    QgsMessageLog.logMessage(message, LOG_TAG, level)


def start(task: QgsTask) -> QgsTask:
    """Queue ``task`` in QGIS's task manager (keeping it referenced until it ends)."""
    _alive.add(task)
    task.taskCompleted.connect(lambda: _alive.discard(task))
    task.taskTerminated.connect(lambda: _alive.discard(task))
    QgsApplication.taskManager().addTask(task)
    return task


class CallTask(QgsTask):
    """``fn(task)`` in a worker thread; ``on_done(result, error)`` in the main thread.

    ``error`` is an EngineError (kind ``cancelled`` when the task was cancelled) or None.
    ``on_cancel`` runs (in the main thread) when the task is cancelled, e.g. to stop a process.
    """

    def __init__(self, description: str, fn: Callable[[CallTask], Any],
                 on_done: Callable[[Any, EngineError | None], None] | None = None,
                 on_cancel: Callable[[], None] | None = None, can_cancel: bool = True):
        super().__init__(description, QgsTask.CanCancel if can_cancel else QgsTask.Flags())
        self.fn, self.on_done, self.on_cancel = fn, on_done, on_cancel
        self.result: Any = None
        self.error: EngineError | None = None
        self.done = False

    def run(self) -> bool:
        """Worker thread."""
        try:
            self.result = self.fn(self)
        except EngineError as exc:
            self.error = exc
        except Exception as exc:  # a bug: reported, never raised into QGIS' thread pool
            self.error = EngineError(f"{type(exc).__name__}: {exc}", "internal")
        if self.isCanceled() and self.error is None:
            self.error = EngineError("cancelled", "cancelled")
        return self.error is None

    def cancel(self) -> None:
        """Cancel: stop what the function waits for."""
        if self.on_cancel is not None:
            try:
                self.on_cancel()
            except Exception as exc:  # noqa: BLE001 - never raise into Qt
                log(f"{self.description()}: cancel: {exc}", Qgis.Warning)
        super().cancel()

    def finished(self, ok: bool) -> None:
        """Main thread: hand the outcome over."""
        self.done = True
        if self.error is None and not ok:
            self.error = EngineError("cancelled", "cancelled")
        if self.on_done is not None:
            self.on_done(self.result, self.error)


class EngineTask(QgsTask):
    """``hqrs-geo ARGS`` in the background; ``on_done(result)`` runs in the main thread.

    The CLI's one-line error goes to the message log and, with ``message_bar``, to the bar.
    """

    def __init__(self, description: str, args: Sequence[str], on_done: Callable[[CliResult], None] | None = None,
                 python: str | None = None, message_bar=None):
        super().__init__(description, QgsTask.CanCancel)
        self.args: list[str] = [str(a) for a in args]
        self.on_done = on_done
        self.python = python
        self.message_bar = message_bar
        self.result: CliResult | None = None
        self.last: Progress | None = None

    def run(self) -> bool:
        """Worker thread: run the CLI, mirroring its progress."""
        def progress(event: Progress) -> None:
            self.last = event
            self.setProgress(event.percent)

        self.result = run_cli(self.args, self.python or interpreter(), progress, self.isCanceled)
        return self.result.ok

    def finished(self, ok: bool) -> None:
        """Main thread: log the outcome and hand it to ``on_done``."""
        if self.result is None and self.isCanceled():  # cancelled before it started: nothing ran
            self.result = CliResult(returncode=-1, cancelled=True)
        if self.result is not None and not ok:
            text = "cancelled; finished work is kept" if self.result.cancelled else \
                (self.result.error.text if self.result.error else "failed")
            log(f"{self.description()}: {text}", Qgis.Warning)
            if self.message_bar is not None:
                self.message_bar.pushMessage("HQRS", text, Qgis.Info if self.result.cancelled else Qgis.Critical)
        if self.on_done is not None and self.result is not None:
            self.on_done(self.result)
