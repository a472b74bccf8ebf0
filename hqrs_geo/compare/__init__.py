"""Change between two dates of the same place, tile by tile, from the tiles' embeddings.

``hqrs_geo.change(before, after, output, ...)`` (:func:`~hqrs_geo.compare.pipeline.change`) pairs
the tiles of a BEFORE and an AFTER layer (:mod:`.pairs`), scores every pair (:mod:`.scores`:
cosine distance calibrated per reference scene, texts the tiles became or stopped being,
zero-shot classes of each date, few-shot change) and writes the change layer (:mod:`.pipeline`,
:mod:`.output`); :mod:`.dates` reads each date block by block, :mod:`.inputs` makes the date
layers from rasters and computes missing results. The reference is docs/change.md.
"""
from __future__ import annotations

from .pipeline import CHANGE_COLUMNS, change

__all__ = ["CHANGE_COLUMNS", "change"]
