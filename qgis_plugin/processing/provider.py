"""The HQRS Processing provider (id ``hqrs``): the engine's jobs as Processing algorithms.

Loading the provider starts nothing: the algorithms check the engine (and say what to install)
only when they run. Register it from the plugin with
``QgsApplication.processingRegistry().addProvider(HqrsProvider())``.
"""
from __future__ import annotations

from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from .algorithms import algorithms

ICON = Path(__file__).resolve().parents[1] / "icon.png"
VECTOR_EXTENSIONS = ["gpkg", "fgb", "parquet"]  # the tile layer formats the engine writes


class HqrsProvider(QgsProcessingProvider):
    """Processing provider "HQRS" with the tile, model, search and MpGI algorithms."""

    def id(self) -> str:
        """The provider id: algorithms are ``hqrs:<name>``."""
        return "hqrs"

    def name(self) -> str:
        """The name shown in the toolbox."""
        return "HQRS"

    def longName(self) -> str:  # noqa: N802 - QGIS API name
        """A longer name for tooltips."""
        return "HQRS remote-sensing vision-language models"

    def icon(self) -> QIcon:
        """The plugin icon."""
        return QIcon(str(ICON))

    def loadAlgorithms(self) -> None:  # noqa: N802
        """Add one instance of every algorithm."""
        for algorithm in algorithms():
            self.addAlgorithm(algorithm)

    def supportsNonFileBasedOutput(self) -> bool:  # noqa: N802
        """No memory layers: the engine writes files (temporary outputs become temporary files)."""
        return False

    def supportedOutputVectorLayerExtensions(self) -> list[str]:  # noqa: N802
        """Vector outputs are tile layers: GeoPackage (default), FlatGeobuf, GeoParquet."""
        return list(VECTOR_EXTENSIONS)

    def defaultVectorFileExtension(self, hasGeometry: bool = True) -> str:  # noqa: N802,N803
        """GeoPackage."""
        return "gpkg"
