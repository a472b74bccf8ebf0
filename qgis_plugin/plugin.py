"""The plugin object QGIS loads: Processing provider, search dock, engine set-up, settings.

Menu **Raster ▸ HQRS** (the plugin's category): HQRS search (also on the toolbar), Set up
engine…, HQRS settings…. Loading starts no process: the engine is checked when the dock is first
shown (on the first run it opens by itself, on its set-up page when there is no engine yet).
Tile layers added to the project get an outline style and caption map tips once.
"""
from __future__ import annotations

import os

from qgis.core import QgsApplication, QgsProject, QgsSingleSymbolRenderer, QgsVectorLayer
from qgis.PyQt.QtCore import Qt, QTimer
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from .core import sessions, styles, tile_layers
from .processing.provider import HqrsProvider

ICON = os.path.join(os.path.dirname(__file__), "icon.png")
MENU = "&HQRS"


class HqrsPlugin:
    """Everything ``initGui`` adds, ``unload`` removes (actions, dock, provider, processes, signals)."""

    def __init__(self, iface):
        self.iface = iface
        self.provider = None
        self.dock = None
        self.actions = []
        self.toolbar_action = None
        self._from_project: set[str] = set()

    def initProcessing(self) -> None:  # noqa: N802 - QGIS API name
        """Register the "HQRS" Processing provider (also called by QGIS without a GUI)."""
        if self.provider is None:
            self.provider = HqrsProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802 - QGIS API name
        """Provider, dock (hidden until asked for, or on the first run), menu and toolbar."""
        # the widgets are imported with the GUI: QGIS without one (qgis_process) loads the plugin for
        # its Processing provider only
        from .widgets.dock import SearchDock
        from .widgets.engine_setup import first_run_seen

        self.initProcessing()
        if self.iface is None:
            return
        window = self.iface.mainWindow()
        self.dock = SearchDock(self.iface, window)
        self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
        self.dock.hide()
        search = QAction(QIcon(ICON), "HQRS search", window)
        search.setCheckable(True)
        search.toggled.connect(self.dock.setVisible)
        self.dock.visibilityChanged.connect(search.setChecked)
        setup = QAction("Set up engine…", window)
        setup.triggered.connect(self.open_setup)
        settings = QAction("HQRS settings…", window)
        settings.triggered.connect(self.open_settings)
        for action in (search, setup, settings):
            self.iface.addPluginToRasterMenu(MENU, action)
            self.actions.append(action)
        self.iface.addToolBarIcon(search)
        self.toolbar_action = search
        project = QgsProject.instance()
        project.layersAdded.connect(self.on_layers_added)
        project.readMapLayer.connect(self.on_read_map_layer)
        if not first_run_seen():
            QTimer.singleShot(0, self.first_run)

    def first_run(self) -> None:
        """Show the dock once: it checks the engine and offers the set-up when there is none."""
        from .widgets.engine_setup import mark_first_run_seen

        mark_first_run_seen()
        if self.dock is not None:
            self.dock.show()

    # -- tile layers ---------------------------------------------------------------------------
    def on_read_map_layer(self, layer, _element) -> None:
        """A layer read from a project file keeps the style saved with it."""
        self._from_project.add(layer.id())

    def on_layers_added(self, layers) -> None:
        """Style new tile layers once (after the project finished adding them)."""
        ids = [layer.id() for layer in layers if isinstance(layer, QgsVectorLayer)]
        if ids:
            QTimer.singleShot(0, lambda: self.style_new_tile_layers(ids))

    def style_new_tile_layers(self, layer_ids) -> None:
        """Outlines over the imagery and caption map tips for tile layers with QGIS's default look;
        tile and result layers above the imagery, their embedding columns hidden (see
        :func:`.core.tile_layers.settle_new_layer`)."""
        for layer_id in layer_ids:
            layer = QgsProject.instance().mapLayer(layer_id)
            if layer is not None and (tile_layers.is_tile_layer(layer) or layer.customProperty(styles.STYLED)):
                tile_layers.settle_new_layer(layer, new=layer_id not in self._from_project)
            if layer_id in self._from_project or not tile_layers.is_tile_layer(layer):
                continue
            if layer.customProperty(styles.STYLED) or not isinstance(layer.renderer(), QgsSingleSymbolRenderer):
                continue
            styles.style_tile_layer(layer)
            if self.dock is not None:
                self.dock.enable_map_tips()
        self._from_project.difference_update(layer_ids)

    # -- dialogs ---------------------------------------------------------------------------
    def open_settings(self) -> None:
        """Show the settings dialog."""
        from .widgets.settings_dialog import SettingsDialog

        SettingsDialog(self.iface.mainWindow() if self.iface else None,
                       self.iface.messageBar() if self.iface else None).exec_()

    def open_setup(self) -> None:
        """The engine set-up, in the dock."""
        if self.dock is not None:
            self.dock.show()
            self.dock.raise_()
            self.dock.show_setup()

    def unload(self) -> None:
        """Remove the provider, actions and dock; stop search processes; disconnect signals."""
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        for action in self.actions:
            if self.iface is not None:
                self.iface.removePluginRasterMenu(MENU, action)
                if action is self.toolbar_action:
                    self.iface.removeToolBarIcon(action)
            action.deleteLater()
        self.actions, self.toolbar_action = [], None
        project = QgsProject.instance()
        for signal, slot in ((project.layersAdded, self.on_layers_added),
                             (project.readMapLayer, self.on_read_map_layer)):
            try:
                signal.disconnect(slot)
            except (TypeError, RuntimeError):
                pass
        if self.dock is not None:
            self.dock.unload()
            try:
                self.dock.visibilityChanged.disconnect()
            except TypeError:
                pass
            if self.iface is not None:
                self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        sessions.close_all()
