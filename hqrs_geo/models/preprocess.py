"""Image preprocessing as one batched tensor operation on the model's device.

Equivalent to open_clip's PIL pipeline (resize the shortest side with antialiased bicubic,
round to 8 bits as PIL does, centre-crop, scale to 0..1, normalise), without a PIL round trip
per tile. On the CPU the resize runs on the uint8 pixels themselves (torch's fixed-point
kernel, the one PIL-SIMD uses: within a grey level or two of PIL, about ten times faster than
resizing floats); elsewhere, and where torch lacks that kernel, on floats rounded to 8 bits.
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
        mean = torch.tensor(cfg["mean"], dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(cfg["std"], dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        self.mean, self.std = mean, std
        self.scale, self.shift = 1.0 / std, -mean / std  # (x - mean) / std as one multiply-add
        self.uint8_resize = True  # cleared once if this torch has no uint8 kernel for the mode

    def _resized_shape(self, height: int, width: int) -> tuple[int, int]:
        th, tw = self.size
        if self.mode == "squash":
            return th, tw
        short = min(th, tw)
        if height <= width:
            return short, int(short * width / height)
        return int(short * height / width), short

    def _resize(self, images, size: tuple[int, int]):
        """Antialiased resize to ``size``, values rounded to 8 bits as PIL does (float32 out)."""
        import torch
        import torch.nn.functional as F

        mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
        if images.device.type == "cpu" and images.dtype == torch.uint8 and self.uint8_resize:
            try:
                x = F.interpolate(images.contiguous(memory_format=torch.channels_last), size=size, mode=mode,
                                  antialias=True, align_corners=False)
                return x.float()
            except (RuntimeError, NotImplementedError):
                self.uint8_resize = False
        x = F.interpolate(images.float(), size=size, mode=mode, antialias=True, align_corners=False)
        return x.round_().clamp_(0, 255)

    def __call__(self, images):
        """``images``: uint8 ``[B, 3, H, W]`` on the target device; returns contiguous float32 ``[B, 3, h, w]``."""
        import torch

        height, width = images.shape[-2:]
        new_h, new_w = self._resized_shape(height, width)
        if (new_h, new_w) != (height, width):
            x = self._resize(images, (new_h, new_w))
        else:
            x = images.float()
        th, tw = self.size
        if (new_h, new_w) != (th, tw):
            top, left = int(round((new_h - th) / 2.0)), int(round((new_w - tw) / 2.0))
            x = x[:, :, top:top + th, left:left + tw]
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)  # contiguous, whatever x's layout
        return torch.addcmul(self.shift, x, self.scale, out=out)


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
