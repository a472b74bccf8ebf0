"""The plugin object QGIS loads. For now it only registers itself; the engine runs out of process."""
from __future__ import annotations


class HqrsPlugin:
    """Minimal plugin: loads and unloads cleanly (UI follows with the plugin issue)."""

    def __init__(self, iface):
        self.iface = iface
        self.loaded = False

    def initGui(self) -> None:  # noqa: N802 - QGIS API name
        """Create actions and docks (none yet)."""
        self.loaded = True

    def unload(self) -> None:
        """Remove everything initGui added."""
        self.loaded = False
