"""The chat back-end interface (:class:`ChatBackend`), requests and the checks they share."""
from __future__ import annotations

import base64
import io
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ...errors import InputError, OptionError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_MESSAGE_LIMIT = 200  # characters of a server's or library's message quoted in our errors


# --------------------------------------------------------------------------- requests

@dataclass
class ChatRequest:
    """One chat turn to answer.

    ``messages`` are OpenAI-style ``{"role": "system"|"user"|"assistant", "content": str}``
    dicts; ``images`` (uint8 H x W x 3 arrays or PNG/JPEG bytes) are attached to the last
    user message. ``temperature`` 0 means greedy decoding.
    """

    messages: list[dict]
    images: list = field(default_factory=list)
    max_tokens: int = 256
    temperature: float = 0.0


def _check_request(request: ChatRequest, index: int) -> None:
    """Raise a one-line :class:`OptionError` or :class:`InputError` for a malformed request."""
    where = f"chat request {index}"
    if not isinstance(request, ChatRequest):
        raise OptionError(f"{where} is a {type(request).__name__}, not a ChatRequest")
    if not isinstance(request.messages, (list, tuple)) or not request.messages:
        raise OptionError(f"{where} has no messages; give at least one {{'role': 'user', 'content': ...}}")
    for number, message in enumerate(request.messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise OptionError(f"{where}, message {number}: needs a role among {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise OptionError(f"{where}, message {number}: content must be a string")
    if isinstance(request.max_tokens, bool) or not isinstance(request.max_tokens, int) or request.max_tokens < 1:
        raise OptionError(f"{where}: max_tokens must be a whole number >= 1, not {request.max_tokens!r}")
    if not isinstance(request.temperature, (int, float)) or request.temperature < 0:
        raise OptionError(f"{where}: temperature must be a number >= 0, not {request.temperature!r}")
    if not isinstance(request.images, (list, tuple)):
        raise OptionError(f"{where}: images must be a list (of arrays or PNG/JPEG bytes), "
                          f"not {type(request.images).__name__}")
    if request.images:
        _last_user_index(request.messages, where)
        for number, image in enumerate(request.images):
            _image_format(image, f"{where}, image {number}")


def _last_user_index(messages: Sequence[dict], where: str = "chat request") -> int:
    """Index of the last user message (the one images go with)."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "user":
            return index
    raise OptionError(f"{where} has images but no user message to attach them to")


# --------------------------------------------------------------------------- images

def _image_format(image: Any, where: str = "image") -> str:
    """``png``, ``jpeg``, ``array`` or ``pil``; an unusable image raises :class:`InputError`."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        head = bytes(image[:8])
        if head.startswith(_PNG_MAGIC):
            return "png"
        if head.startswith(_JPEG_MAGIC):
            return "jpeg"
        raise InputError(f"{where}: bytes are neither PNG nor JPEG; pass PNG/JPEG bytes or a uint8 H x W x 3 array")
    if type(image).__module__.startswith("PIL."):
        return "pil"
    shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", None)
    if shape is None or len(shape) != 3 or shape[2] != 3 or str(dtype) != "uint8":
        raise InputError(f"{where}: expected a uint8 H x W x 3 array or PNG/JPEG bytes, "
                         f"got {type(image).__name__} shape={shape} dtype={dtype}")
    return "array"


def _image_to_pil(image: Any):
    """The image as an RGB ``PIL.Image``."""
    kind = _image_format(image)
    if kind == "array":
        return Image.fromarray(image).convert("RGB")
    if kind == "pil":
        return image.convert("RGB")
    return Image.open(io.BytesIO(bytes(image))).convert("RGB")


def _image_data_url(image: Any) -> str:
    """A ``data:`` URL for the image; PNG/JPEG bytes are sent as they are, arrays as PNG."""
    kind = _image_format(image)
    if kind in ("png", "jpeg"):
        data = bytes(image)
    else:
        buffer = io.BytesIO()
        _image_to_pil(image).save(buffer, format="PNG")
        data, kind = buffer.getvalue(), "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


# --------------------------------------------------------------------------- the interface

class ChatBackend(ABC):
    """One chat model behind :meth:`complete`; also a context manager that calls :meth:`close`."""

    kind: str = ""
    model: str = ""
    supports_images: bool = False

    def complete(self, requests: Sequence[ChatRequest]) -> list[str]:
        """Answer each request (same order); the answer is the model's new text, stripped."""
        requests = list(requests)
        for index, request in enumerate(requests):
            _check_request(request, index)
            if request.images and not self.supports_images:
                raise OptionError(f"{self.identity()} does not take images (chat request {index} has "
                                  f"{len(request.images)}); use a transformers-vlm or openai back end for images")
        return self._complete(requests) if requests else []

    @abstractmethod
    def _complete(self, requests: list[ChatRequest]) -> list[str]:
        """Answer checked, non-empty requests."""

    def identity(self) -> str:
        """Stable ``kind:model[:extra]`` string for cache keys; never holds secrets."""
        return f"{self.kind}:{self.model}"

    def close(self) -> None:
        """Release the model or connections; the back end is unusable afterwards."""

    def __enter__(self) -> ChatBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity()!r})"


# --------------------------------------------------------------------------- config checks

def _one_line(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    """Whitespace collapsed to single spaces, cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_text(exc: BaseException) -> str:
    """An exception as one short line."""
    return _one_line(str(exc) or type(exc).__name__)


#: Ranges of the numeric back-end options, checked when a recipe is read and when a back end is
#: built: ``name: (low, high)``; seconds must be finite and above ``low``, counts at least ``low``.
#: A request therefore waits at most ``(retries + 1) * timeout`` plus its back-offs (each at most
#: ``max_backoff``): with the highest values about 4.2 days, with the defaults
#: (60 s, 4 retries, back-off from 1 s, at most 60 s) under 6 minutes.
LIMITS: dict[str, tuple[float, float]] = {
    "timeout": (0.0, 3600.0), "backoff": (0.0, 600.0), "max_backoff": (0.0, 3600.0),
    "retries": (0, 100), "concurrency": (1, 64), "batch_size": (1, 4096), "seed": (0, 2**63 - 1),
}


def _count(name: str, value: Any, minimum: int) -> int:
    """A whole-number option >= ``minimum`` (and within :data:`LIMITS` when it has a range there)."""
    low, high = LIMITS.get(name, (minimum, float("inf")))
    low = max(low, minimum)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        span = f">= {low:g}" if high == float("inf") else f"in {low:g}..{high:g}"
        raise OptionError(f"back end option {name}: {str(value)[:40]!r} is not a whole number {span}; "
                          "fix it in the recipe")
    return value


def _seconds(name: str, value: Any, minimum: float = 0.0) -> float:
    """A finite number-of-seconds option > ``minimum`` (and at most its :data:`LIMITS` bound)."""
    high = LIMITS.get(name, (minimum, 86400.0))[1]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum < value <= high:
        raise OptionError(f"back end option {name}: {str(value)[:40]!r} is not a number of seconds above "
                          f"{minimum:g} and at most {high:g}; fix it in the recipe")
    return float(value)


def check_ranges(config: dict) -> None:
    """A one-line :class:`OptionError` for a numeric option of ``config`` outside :data:`LIMITS`."""
    for key, value in config.items():
        if key not in LIMITS or value is None:
            continue
        if key in ("timeout", "backoff", "max_backoff"):
            _seconds(key, value)
        else:
            _count(key, value, int(LIMITS[key][0]))


def _text(name: str, value: Any) -> str:
    """A non-empty string option."""
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"back end option {name}: {str(value)[:40]!r} is not a non-empty string; "
                          "fix it in the recipe")
    return value.strip()


