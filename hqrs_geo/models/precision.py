"""The one precision rule, for inference and training alike.

``precision`` is one of :data:`PRECISIONS`:

* ``auto``: bf16 autocast on CUDA GPUs with native bf16 (compute capability 8.0 and newer),
  else fp16 on CUDA and MPS; plain fp32 on CPU (CPUs without bf16 units are slower in bf16);
* ``fp32``: no autocast;
* ``bf16``: bf16 autocast on any device (on CPUs with AVX512-BF16 or AMX about twice as fast);
* ``fp16``: fp16 autocast, CUDA and MPS only (training adds a gradient scaler).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import OptionError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def check_precision(precision: str) -> str:
    """``precision`` when it is one of :data:`PRECISIONS` (one-line OptionError otherwise)."""
    if precision not in PRECISIONS:
        raise OptionError(f"invalid precision {precision!r}: use one of {', '.join(PRECISIONS)}", option="precision")
    return precision


def autocast_dtype(device: Any, precision: str = "auto") -> Any | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32)."""
    import torch

    check_precision(precision)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type not in ("cuda", "mps"):
            raise OptionError("fp16 needs a CUDA or MPS device; use bf16 or fp32 on this device", option="precision")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def native_bf16(device: Any) -> bool:
    """Whether the CUDA (or ROCm) GPU ``device`` computes in bf16 natively: NVIDIA compute
    capability 8.0 (Ampere) or newer. Older cards (V100, T4) only emulate bf16, much slower than
    their fp16 tensor cores, although ``torch.cuda.is_bf16_supported()`` says yes for them."""
    import torch

    if getattr(torch.version, "hip", None):
        return bool(torch.cuda.is_bf16_supported())
    return torch.cuda.get_device_capability(device)[0] >= 8


def cpu_bf16_units() -> frozenset[str]:
    """The bf16 units of this machine's CPU: ``avx512_bf16`` (AVX512-BF16 dot products) and/or
    ``amx_bf16`` (AMX tiles); empty where bf16 is emulated in fp32 (AVX2-only CPUs: there bf16
    training was ten times slower than fp32). Asks torch's CPU probe, else Linux's
    ``/proc/cpuinfo`` flags."""
    import torch

    probe = getattr(torch, "cpu", None)
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    try:
        return frozenset(unit for unit, name in checks.items() if getattr(probe, name)())
    except (AttributeError, TypeError, RuntimeError):  # a torch without the probe
        pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return frozenset()
    return frozenset(unit for unit in checks if unit in flags)


def precision_name(dtype: Any | None) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for an autocast dtype (recorded with results)."""
    return {None: "fp32"}.get(dtype, str(dtype).replace("torch.", "").replace("bfloat16", "bf16")
                                 .replace("float16", "fp16"))


def autocast(device: Any, dtype: Any | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for plain fp32."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def inference_context(device: Any, dtype: Any | None) -> Iterator[None]:
    """``torch.inference_mode`` plus autocast when a mixed-precision dtype is given."""
    import torch

    with torch.inference_mode(), autocast(device, dtype):
        yield
