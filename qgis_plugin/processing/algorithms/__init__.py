"""The HQRS Processing algorithms, one class each (modules ``tiles``, ``models``, ``search``, ``mpgi``, ``detect``,
``change``).

=================  ==========================  ==============================================
id                 class                       does
=================  ==========================  ==============================================
``hqrs:tile``          :class:`TileAlgorithm`          raster to tile layer
``hqrs:embed``         :class:`EmbedAlgorithm`         CLIP embeddings onto a tile layer
``hqrs:caption``       :class:`CaptionAlgorithm`       CoCa captions onto a tile layer
``hqrs:run``           :class:`RunAlgorithm`           tile + embed + caption
``hqrs:search``        :class:`SearchAlgorithm`        text search, ranked result layer
``hqrs:similar``       :class:`SimilarAlgorithm`       tiles like example tiles, ranked result layer
``hqrs:classify``      :class:`ClassifyAlgorithm`      zero-shot labels onto a tile layer
``hqrs:detect``        :class:`DetectAlgorithm`        few-shot detection layer from example tiles
``hqrs:change``        :class:`ChangeAlgorithm`        change layer of two dates (compare two dates)
``hqrs:export_chips``  :class:`ExportChipsAlgorithm`   tiles as PNG/JPEG files with an index
``hqrs:mpgi``          :class:`MpgiAlgorithm`          MpGI captions onto a tile layer
``hqrs:export_dataset`` :class:`ExportDatasetAlgorithm` captioned tiles as an image-text dataset
=================  ==========================  ==============================================

Every algorithm runs the engine out of process (``<interpreter> -m hqrs_geo …``), see
:mod:`...core.runner` (searches: a shared ``serve-search`` session, :mod:`...core.sessions`);
none imports hqrs_geo or torch into QGIS.
"""
from __future__ import annotations

from ...core.registry import CLIP_MODELS, COCA_MODELS
from ..base import HqrsAlgorithm
from ..params import CUSTOM_MODEL
from .change import ChangeAlgorithm
from .detect import DetectAlgorithm
from .models import CaptionAlgorithm, EmbedAlgorithm, RunAlgorithm
from .mpgi import ExportDatasetAlgorithm, MpgiAlgorithm
from .search import ClassifyAlgorithm, SearchAlgorithm, SimilarAlgorithm
from .tiles import ExportChipsAlgorithm, TileAlgorithm

ALGORITHM_CLASSES = (TileAlgorithm, EmbedAlgorithm, CaptionAlgorithm, RunAlgorithm,
                     SearchAlgorithm, SimilarAlgorithm, ClassifyAlgorithm, ExportChipsAlgorithm,
                     MpgiAlgorithm, ExportDatasetAlgorithm, DetectAlgorithm, ChangeAlgorithm)


def algorithms() -> list[HqrsAlgorithm]:
    """A new instance of every HQRS algorithm."""
    return [cls() for cls in ALGORITHM_CLASSES]


__all__ = ["ALGORITHM_CLASSES", "algorithms", "HqrsAlgorithm", "CUSTOM_MODEL", "CLIP_MODELS", "COCA_MODELS",
           *[cls.__name__ for cls in ALGORITHM_CLASSES]]
