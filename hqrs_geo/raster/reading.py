"""How a scene's pixels are read (:class:`SceneReading`): bands, stretch, resampling, size and
georeferencing.

Small, picklable and JSON-serialisable: a scene's reading is stored in the run records of the
tile layer made from it (:mod:`hqrs_geo.layer.runs`), so the pixels of a tile can be read again
exactly as when the layer was made.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .grid import SceneGrid
from .scene import BandChoice, SceneInfo
from .stretch import Scale


@dataclass
class SceneReading:
    """Everything needed to read tiles of one scene; serialisable to the run metadata."""

    source: str
    key: str
    bands: BandChoice
    scale: Scale
    resampling: str
    width: int
    height: int
    dtype: str
    all_valid: bool
    crs: str | None = None
    transform: tuple[float, ...] = ()
    url: str | None = None  # where the scene was found (URL or path), when it differs from ``source``
    item: str | None = None  # STAC item id
    info: SceneInfo | None = field(default=None, repr=False)
    grid: SceneGrid | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        """JSON-friendly form."""
        return {
            "source": self.source, "key": self.key, "bands": list(self.bands.indexes),
            "palette": self.bands.palette, "scale": self.scale.as_dict(),
            "resampling": self.resampling, "width": self.width, "height": self.height,
            "dtype": self.dtype, "all_valid": self.all_valid, "crs": self.crs,
            "transform": list(self.transform),
            **({"url": self.url} if self.url else {}), **({"item": self.item} if self.item else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> SceneReading:
        """Inverse of :meth:`as_dict` (used to read tiles of an existing layer)."""
        return cls(
            source=d["source"], key=d["key"],
            bands=BandChoice(tuple(d["bands"]), bool(d.get("palette"))),
            scale=Scale.from_dict(d["scale"]), resampling=d["resampling"],
            width=d["width"], height=d["height"], dtype=d["dtype"], all_valid=d["all_valid"],
            crs=d.get("crs"), transform=tuple(d.get("transform") or ()), url=d.get("url"), item=d.get("item"),
        )
