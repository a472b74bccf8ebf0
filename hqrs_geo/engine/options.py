"""Settings of the model engine (:class:`RunOptions`), validated in one place."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import OptionError
from ..layer.columns import DTYPES
from ..models.precision import check_precision
from ..models.views import check_views


@dataclass
class RunOptions:
    """Engine settings (all have defaults)."""

    batch_size: int = 32
    precision: str = "auto"  # see hqrs_geo.models.precision
    workers: int | None = None  # DataLoader worker processes; default: see worker_count
    embedding_dtype: str = "float16"
    overwrite: bool = False  # recompute results the layer already has
    views: int = 1  # test-time views averaged per tile embedding (hqrs_geo.models.views)

    def validated(self) -> RunOptions:
        """Check values (one-line OptionError)."""
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise OptionError(f"invalid batch size {self.batch_size!r}: use a whole number of at least 1",
                              option="batch_size")
        check_precision(self.precision)
        if self.embedding_dtype not in DTYPES:
            raise OptionError(f"invalid embedding type {self.embedding_dtype!r}: use float16 or float32",
                              option="embedding_dtype")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise OptionError(f"invalid worker count {self.workers!r}: use 0 or more", option="workers")
        check_views(self.views)
        return self

    def worker_count(self, device: Any) -> int:
        """Worker processes used: the option, else for GPU inference every core but the one that
        drives the GPU, up to 16 (a core reads about 1,100 256-px tiles/s and a GPU forward takes
        tens of thousands a second, so reading sets the pace); for CPU inference none on machines
        of up to 4 cores, where readers would take cores from the model (reading a tile costs
        ~1 ms, a CPU forward ~50 ms), else 1."""
        if self.workers is not None:
            return self.workers
        cpus = os.cpu_count() or 1
        if device.type == "cpu":
            return 0 if cpus <= 4 else 1
        return max(0, min(16, cpus - 1))
