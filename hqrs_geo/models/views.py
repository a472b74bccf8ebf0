"""Test-time views of overhead images: one embedding from several views of a tile.

Aerial and satellite tiles have no "up", so the eight rotations and reflections of the square
show the same scene; so does a closer look at its centre. Averaging the normalised embeddings
of these views (and normalising the mean) gives an embedding that depends less on how the tile
happens to be oriented and framed. The counts offered:

* ``1``: the tile as it is (the default everywhere);
* ``8``: the eight rotations/flips;
* ``16``: those eight, and the same eight of the central crop of :data:`CROP` of the side (the
  model's preprocessing resizes it to the input size, as it does the tile).

Measured with the shipped hqrs-mini-clip (docs/models.md): zero-shot top-1 on the selection sets
(UCM val, EuroSAT) +1.0 point on average with 16 views (83.22 -> 84.26), at about 12× the
embedding time (`benchmarks/embed.py --views 16`: 0.082× the one-view rate on 2 CPU threads).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import OptionError

#: The view counts :func:`image_views` makes.
VIEW_COUNTS = (1, 8, 16)
#: Side of the central crop of the 16-view set, as a fraction of the tile side.
CROP = 0.75


def check_views(count: Any, option: str = "views") -> int:
    """``count`` when it is one of :data:`VIEW_COUNTS`, else a one-line :class:`OptionError`."""
    if isinstance(count, bool) or count not in VIEW_COUNTS:
        raise OptionError(f"invalid view count {count!r}: use {', '.join(map(str, VIEW_COUNTS))}", option=option)
    return int(count)


def _dihedral(images: Any) -> list[Any]:
    """The eight rotations/flips of ``[..., H, W]`` images (the identity first)."""
    import torch

    out = []
    for quarter in range(4):
        turned = torch.rot90(images, quarter, dims=(-2, -1))
        out += [turned, turned.flip(-1)]
    return out


def _centre(images: Any) -> Any:
    """The central :data:`CROP` of the side of ``[..., H, W]`` images."""
    height, width = images.shape[-2:]
    h, w = max(1, round(height * CROP)), max(1, round(width * CROP))
    top, left = (height - h) // 2, (width - w) // 2
    return images[..., top:top + h, left:left + w]


def image_views(images: Any, count: int) -> list[Any]:
    """The ``count`` views (see the module text) of a ``[B, 3, H, W]`` batch, each a batch of
    the same images; for a list of ``[3, H, W]`` images of different sizes, each view is a list."""
    check_views(count)
    if isinstance(images, (list, tuple)):
        per_image = [image_views(image[None], count) for image in images]
        return [[views[i][0] for views in per_image] for i in range(count)]
    if count == 1:
        return [images]
    views = _dihedral(images)
    return views + _dihedral(_centre(images)) if count == 16 else views


def mean_view_features(encode: Callable[[Any], Any], images: Any, count: int) -> Any:
    """The normalised mean of the normalised ``encode(view)`` features over the ``count`` views
    of ``images`` (float32 ``[B, D]``); with ``count`` 1 the normalised features of the images."""
    import torch.nn.functional as F

    views = image_views(images, count)
    total = F.normalize(encode(views[0]).float(), dim=-1)
    for view in views[1:]:
        total = total + F.normalize(encode(view).float(), dim=-1)
    return F.normalize(total, dim=-1)
