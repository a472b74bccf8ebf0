"""The Processing fixture the plugin's Processing tests share: real QGIS, the HQRS provider registered."""
from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("qgis.core")
from qgis.core import QgsApplication  # noqa: E402

from qgis_plugin.core import sessions, settings  # noqa: E402
from qgis_plugin.processing.provider import HqrsProvider  # noqa: E402


@pytest.fixture(scope="module")
def processing_run() -> Iterator[Any]:
    """QGIS with Processing initialised and the HQRS provider registered; yields ``processing.run``.

    The engine is this test venv's interpreter, set explicitly (never an engine found elsewhere)."""
    app = QgsApplication.instance() or QgsApplication([], False)
    app.initQgis()
    settings.set_value("interpreter", sys.executable)
    from processing.core.Processing import Processing

    Processing.initialize()
    import processing

    registry = QgsApplication.processingRegistry()
    provider = None
    if registry.providerById("hqrs") is None:
        provider = HqrsProvider()
        assert registry.addProvider(provider)
    yield processing.run
    sessions.close_all()
    settings.set_value("interpreter", "")
    if provider is not None:
        registry.removeProvider(provider)
