"""Device and precision choices for inference."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from ..errors import OptionError


def pick_device(name: str = "auto"):
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
        raise OptionError(f"invalid device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {name} requested but CUDA is not available here; use --device cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"device {name} requested but MPS is not available here; use --device cpu or auto")
    return device


def autocast_dtype(device, precision: str = "auto"):
    """Mixed-precision dtype: bf16 where CUDA supports it, else fp16 on CUDA/MPS; None (fp32) on CPU."""
    import torch

    if precision == "fp32" or device.type == "cpu":
        return None
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


@contextmanager
def inference_context(device, dtype: Optional[object]) -> Iterator[None]:
    """``torch.inference_mode`` plus autocast when a mixed-precision dtype is given."""
    import torch

    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield
