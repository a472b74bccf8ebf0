"""Choosing the device models run on (the precision rule is in :mod:`.precision`)."""
from __future__ import annotations

from typing import Any

from ..errors import OptionError


def pick_device(name: str = "auto") -> Any:
    """``auto`` picks cuda, then mps, then cpu; explicit names are checked."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionError(f"{str(name)[:40]!r} is not a device; use auto, cpu, cuda, cuda:N or mps",
                          option="device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"{name} requested but CUDA is not available here; use cpu or auto", option="device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"{name} requested but MPS is not available here; use cpu or auto", option="device")
    return device
