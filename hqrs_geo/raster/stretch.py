"""Conversion of raster values to 8-bit RGB with one stretch per scene.

The stretch is computed once per scene (from the smallest adequate overview, else from a
fixed, evenly spread sample of windows) and applied unchanged to every tile, so tiles of a
scene stay comparable. Per-tile stretching is deliberately not offered.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from ..errors import OptionError

SAMPLE_PIXELS = 1 << 20  # about one megapixel per band is plenty for 2nd/98th percentiles


@dataclass(frozen=True)
class StretchSpec:
    """How values become 0..255.

    ``mode``: ``auto`` (uint8 unchanged, other types: percentile stretch), ``none`` (clip to
    0..255), ``percentile`` (``low``/``high`` are percentiles) or ``range`` (``low``/``high``
    are values, the same for every band).
    """

    mode: str = "auto"
    low: float = 2.0
    high: float = 98.0

    @classmethod
    def parse(cls, text: str | StretchSpec | None) -> StretchSpec:
        """Parse ``auto``, ``none``, ``p2,98`` (percentiles) or ``0,3000`` (value range)."""
        if text is None:
            return cls()
        if isinstance(text, StretchSpec):
            return text
        value = str(text).strip().lower()
        if value in ("auto", "none"):
            return cls(mode=value)
        mode = "percentile" if value.startswith("p") else "range"
        parts = value.lstrip("p").split(",")
        try:
            low, high = (float(p) for p in parts)
        except ValueError:
            raise OptionError(
                f"{str(text)[:40]!r} is not a stretch; use auto, none, p2,98 (percentiles) or 0,3000 (value range)",
                option="stretch"
            ) from None
        if not (math.isfinite(low) and math.isfinite(high)) or not high > low \
                or (mode == "percentile" and not (0 <= low < high <= 100)):
            raise OptionError(f"{str(text)[:40]!r} is not a usable stretch; give finite low < high "
                              "(percentiles within 0..100)", option="stretch")
        return cls(mode=mode, low=low, high=high)

    def __str__(self) -> str:
        if self.mode in ("auto", "none"):
            return self.mode
        return f"{'p' if self.mode == 'percentile' else ''}{self.low:g},{self.high:g}"


@dataclass(frozen=True)
class Scale:
    """Per-band linear map ``(v - low) / (high - low) * 255``; ``None`` bounds mean clip only."""

    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    @property
    def identity(self) -> bool:
        """True when values are only clipped to 0..255 (no linear stretch)."""
        return self.low is None

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Map a channel-last (H, W, C) array to uint8 (NaN becomes 0); uint8 passes through."""
        if data.dtype == np.uint8 and self.identity:
            return data
        if self.identity:
            out = np.clip(np.nan_to_num(data, nan=0.0), 0, 255)
            return out.astype(np.uint8)
        low = np.asarray(self.low, dtype=np.float32)
        span = np.asarray(self.high, dtype=np.float32) - low
        scaled = (data.astype(np.float32) - low) * (255.0 / span)
        np.clip(np.nan_to_num(scaled, nan=0.0, copy=False), 0, 255, out=scaled)
        return (scaled + 0.5).astype(np.uint8)

    def as_dict(self) -> dict:
        """JSON-friendly form kept in the layer's run metadata."""
        return {"low": list(self.low) if self.low else None, "high": list(self.high) if self.high else None}

    @classmethod
    def from_dict(cls, d: dict) -> Scale:
        """Inverse of :meth:`as_dict`."""
        if not d or d.get("low") is None:
            return cls()
        return cls(tuple(d["low"]), tuple(d["high"]))


def _sample_windows(width: int, height: int, size: int = 256, count: int = 16) -> list[Window]:
    """Evenly spread windows covering at most ``count`` x ``size``² pixels of the scene."""
    per_axis = max(1, int(math.sqrt(count)))
    w, h = min(size, width), min(size, height)
    xs = np.linspace(0, width - w, per_axis).round().astype(int)
    ys = np.linspace(0, height - h, per_axis).round().astype(int)
    return [Window(int(x), int(y), w, h) for y in sorted(set(ys)) for x in sorted(set(xs))]


def sample_scene(src: rasterio.DatasetReader, bands: Sequence[int]) -> np.ndarray:
    """Valid values of ``bands`` from an overview or a window sample: array (bands, N), float32."""
    bands = list(dict.fromkeys(bands))
    scale = math.sqrt(src.width * src.height / SAMPLE_PIXELS)
    chunks: list[tuple[np.ndarray, np.ndarray]] = []
    if scale > 1 and src.overviews(bands[0]):
        shape = (len(bands), max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        data = src.read(bands, out_shape=shape, resampling=Resampling.nearest)
        masks = src.read_masks(bands, out_shape=shape, resampling=Resampling.nearest)
        chunks.append((data, masks))
    elif scale <= 1:
        chunks.append((src.read(bands), src.read_masks(bands)))
    else:
        for window in _sample_windows(src.width, src.height):
            chunks.append((src.read(bands, window=window), src.read_masks(bands, window=window)))
    values = []
    for data, masks in chunks:
        valid = masks.astype(bool).any(axis=0)
        if np.issubdtype(data.dtype, np.floating):
            valid &= ~np.isnan(data).any(axis=0)
        values.append(data[:, valid].astype(np.float32))
    return np.concatenate(values, axis=1) if values else np.empty((len(bands), 0), np.float32)


def scene_scale(src: rasterio.DatasetReader, bands: Sequence[int], spec: StretchSpec) -> Scale:
    """The one :class:`Scale` used for every tile of the scene, computed here once."""
    dtype = src.dtypes[bands[0] - 1]
    if spec.mode == "none" or (spec.mode == "auto" and dtype == "uint8"):
        return Scale()
    if spec.mode == "range":
        return Scale((spec.low,) * len(bands), (spec.high,) * len(bands))
    low_pct, high_pct = (spec.low, spec.high) if spec.mode == "percentile" else (2.0, 98.0)
    unique = list(dict.fromkeys(bands))
    sample = sample_scene(src, unique)
    if sample.shape[1] == 0:
        return Scale((0.0,) * len(bands), (1.0,) * len(bands))  # no valid pixels: every tile is skipped
    lows, highs = np.percentile(sample, [low_pct, high_pct], axis=1)
    by_band = {b: (float(lo), float(max(hi, lo + 1e-6))) for b, lo, hi in zip(unique, lows, highs)}
    return Scale(tuple(by_band[b][0] for b in bands), tuple(by_band[b][1] for b in bands))
