"""Image preprocessing as one batched tensor operation on the model's device.

Equivalent to open_clip's PIL pipeline (resize the shortest side with antialiased bicubic,
round to 8 bits as PIL does, centre-crop, scale to 0..1, normalise), without a PIL round trip
per tile.
"""
from __future__ import annotations

from typing import Any


class BatchPreprocess:
    """Callable turning uint8 ``[B, 3, H, W]`` tensors into normalised model input."""

    def __init__(self, cfg: dict, device):
        import torch

        self.size = tuple(int(s) for s in cfg["size"])
        self.mode = cfg.get("resize_mode", "shortest")
        self.interpolation = cfg.get("interpolation", "bicubic")
        self.mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(cfg["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0

    def _resized_shape(self, height: int, width: int) -> tuple[int, int]:
        th, tw = self.size
        if self.mode == "squash":
            return th, tw
        short = min(th, tw)
        if height <= width:
            return short, int(short * width / height)
        return int(short * height / width), short

    def __call__(self, images):
        """``images``: uint8 ``[B, 3, H, W]`` on the target device; returns float32 ``[B, 3, h, w]``."""
        import torch.nn.functional as F

        x = images.float()
        height, width = x.shape[-2:]
        new_h, new_w = self._resized_shape(height, width)
        if (new_h, new_w) != (height, width):
            mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
            x = F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255)  # PIL resizes in 8 bits
        th, tw = self.size
        if (new_h, new_w) != (th, tw):
            top, left = int(round((new_h - th) / 2.0)), int(round((new_w - tw) / 2.0))
            x = x[:, :, top:top + th, left:left + tw]
        return (x - self.mean) / self.std


def preprocess_config(model: Any) -> dict:
    """The input size, normalisation and resizing an open_clip model expects (from its config)."""
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return {
        "size": list(size),
        "mean": list(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "std": list(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
    }
