"""The plugin object QGIS loads: Processing provider, search dock, settings."""
from __future__ import annotations

import os

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

ICON = os.path.join(os.path.dirname(__file__), "icon.png")
MENU = "&HQRS"


class HqrsPlugin:
    """Everything ``initGui`` adds, ``unload`` removes (actions, dock, provider, processes)."""

    def __init__(self, iface):
        self.iface = iface
        self.provider = None
        self.dock = None
        self.actions = []

    def initProcessing(self) -> None:  # noqa: N802 - QGIS API name
        """Register the "HQRS" Processing provider (also called by QGIS without a GUI)."""
        from .processing_provider import HqrsProvider

        if self.provider is None:
            self.provider = HqrsProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802 - QGIS API name
        """Provider, dock (hidden until asked for) and menu/toolbar actions."""
        from .dock import SearchDock

        self.initProcessing()
        if self.iface is None:
            return
        self.dock = SearchDock(self.iface, self.iface.mainWindow())
        self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
        self.dock.hide()
        search = QAction(QIcon(ICON), "HQRS search", self.iface.mainWindow())
        search.setCheckable(True)
        search.toggled.connect(self.dock.setVisible)
        self.dock.visibilityChanged.connect(search.setChecked)
        settings = QAction("HQRS settings…", self.iface.mainWindow())
        settings.triggered.connect(self.open_settings)
        for action in (search, settings):
            self.iface.addPluginToMenu(MENU, action)
            self.actions.append(action)
        self.iface.addToolBarIcon(search)

    def open_settings(self) -> None:
        """Show the settings dialog."""
        from .settings_dialog import SettingsDialog

        SettingsDialog(self.iface.mainWindow() if self.iface else None).exec_()

    def unload(self) -> None:
        """Remove the provider, actions and dock; stop search processes; disconnect signals."""
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        for action in self.actions:
            if self.iface is not None:
                self.iface.removePluginMenu(MENU, action)
                self.iface.removeToolBarIcon(action)
            action.deleteLater()
        self.actions = []
        if self.dock is not None:
            self.dock.close_sessions()
            try:
                self.dock.visibilityChanged.disconnect()
            except TypeError:
                pass
            if self.iface is not None:
                self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
