"""Change between two dates of the same place, tile by tile, from the tiles' embeddings.

``hqrs_geo.change(before, after, output, ...)`` (:func:`~hqrs_geo.change.pipeline.change`) pairs
the tiles of a BEFORE and an AFTER layer (:mod:`.pairs`), scores every pair (:mod:`.scores`:
cosine distance calibrated per reference scene, texts the tiles became or stopped being,
zero-shot classes of each date, few-shot change) and writes the change layer (:mod:`.pipeline`);
:mod:`.dates` reads each date block by block, :mod:`.inputs` makes the date layers from rasters
and computes missing results. The reference is docs/change.md.

This package and the function share the name ``hqrs_geo.change``: once the package is imported,
Python binds the name to the package, so the package itself can be called like the function.
"""
from __future__ import annotations

import inspect
import sys
import types
from typing import Any

from .pipeline import CHANGE_COLUMNS, change


class _CallableModule(types.ModuleType):
    """The package, callable as :func:`change`."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return change(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(change)

__all__ = ["CHANGE_COLUMNS", "change"]
