"""Batch augmentations for overhead imagery, on tensors (CPU or GPU).

Aerial and satellite tiles have no "up": the eight rotations/reflections of the square are
all valid views, which multiplies a small dataset by eight at no cost. Add to that a random
resized crop (the scale range of objects varies between sensors) and mild brightness/contrast
jitter (sun angle, haze). Two more, off by default, move training images toward other sensors:
a per-band colour cast (``colour``: each band's gain drawn from [1 - colour, 1 + colour], as
the colour balance of Google Earth mosaics varies from scene to scene) and a loss of resolution
(``coarsen``: on half of the images, down-sampling by a factor drawn from [1, coarsen] and back,
as a 2 m scene shows what a 0.3 m one shows, blurred). Everything is driven by a
:class:`torch.Generator`, so a seeded run augments identically on resume; with both off the
draws are those of the earlier releases, so their training runs reproduce.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """What :func:`augment_batch` may do."""

    min_scale: float = 0.6  # smallest crop side, as a fraction of the image side
    dihedral: bool = True  # random 90 degree rotations and flips
    jitter: float = 0.15  # brightness and contrast factors drawn from [1 - jitter, 1 + jitter]
    colour: float = 0.0  # per-band gains drawn from [1 - colour, 1 + colour]; 0: off
    coarsen: float = 1.0  # half of the images down-sampled by a factor from [1, coarsen] and back; 1: off


def augment_batch(pixels: Sequence, size: int, generator, config: AugmentConfig = AugmentConfig(),
                  device="cpu"):
    """Augment uint8 ``[3, L, L]`` images into a float ``[B, 3, size, size]`` batch in 0..255."""
    out = torch.empty((len(pixels), 3, size, size), dtype=torch.float32, device=device)
    draws = torch.rand((len(pixels), 7), generator=generator).tolist()
    extra = (torch.rand((len(pixels), 5), generator=generator).tolist() if config.colour or config.coarsen > 1.0
             else [[0.0] * 5] * len(pixels))  # drawn only when on: the earlier releases' draws are unchanged
    for i, (image, r, e) in enumerate(zip(pixels, draws, extra)):
        x = image.to(device, non_blocking=True).float()
        side = x.shape[-1]
        crop = max(8, int(round(side * (config.min_scale + (1.0 - config.min_scale) * r[0]))))
        top = int(r[1] * (x.shape[-2] - crop + 1))
        left = int(r[2] * (side - crop + 1))
        x = x[:, top:top + crop, left:left + crop]
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        if config.coarsen > 1.0 and e[0] < 0.5:
            low = max(8, int(round(size / (1.0 + (config.coarsen - 1.0) * e[1]))))
            x = F.interpolate(x[None], size=(low, low), mode="bilinear", antialias=True, align_corners=False)
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)[0]
        if config.colour:
            x = x * torch.tensor([1.0 + config.colour * (2 * v - 1) for v in e[2:5]], device=x.device).view(3, 1, 1)
        if config.dihedral:
            x = torch.rot90(x, int(r[3] * 4) % 4, dims=(1, 2))
            if r[4] < 0.5:
                x = x.flip(2)
        if config.jitter:
            brightness = 1.0 + config.jitter * (2 * r[5] - 1)
            contrast = 1.0 + config.jitter * (2 * r[6] - 1)
            mean = x.mean()
            x = ((x - mean) * contrast + mean) * brightness
        out[i] = x.clamp_(0, 255)
    return out


def normalise(batch, mean: Sequence[float], std: Sequence[float]):
    """``(x/255 - mean) / std`` per channel, for a float batch in 0..255."""
    m = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(1, 3, 1, 1) * 255.0
    return (batch - m) / s
