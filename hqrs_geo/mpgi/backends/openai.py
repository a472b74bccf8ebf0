"""The OpenAI-compatible chat back end: any ``POST {base_url}/chat/completions`` server."""
from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ...errors import Cancelled, InputError, OptionError
from ...redact import redact, register
from .base import (
    ChatBackend,
    ChatRequest,
    _count,
    _error_text,
    _image_data_url,
    _last_user_index,
    _one_line,
    _seconds,
    _text,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- OpenAI-compatible servers

class _Transient(Exception):
    """A failure worth retrying: connection refused or reset, timeout, HTTP 429 or 5xx."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
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


def _retry_after(value: str | None) -> float | None:
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


def _answer_text(data: Any) -> str | None:
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
    the config) and only ever goes into the ``Authorization`` header; an answer that echoes it is
    masked before it is returned (:mod:`hqrs_geo.redact`). Each attempt (connect, send, the whole
    answer) takes at most ``timeout`` seconds in total, however slowly the server sends: then its
    connection is shut down and the attempt counts as a timeout. Connection errors, timeouts,
    HTTP 429 and 5xx are retried ``retries`` times with exponential back-off from ``backoff``
    seconds, with jitter, waiting at least what ``Retry-After`` asks, never more than
    ``max_backoff``; other HTTP errors fail at once. ``complete`` keeps at most ``concurrency``
    requests in flight. One request therefore ends within ``(retries + 1) * timeout`` plus its
    back-offs; every value is range-checked (:data:`~.base.LIMITS`).

    When ``complete`` is interrupted (Ctrl-C, SIGTERM through the CLI, or one request failing
    for good), or :meth:`close` is called, every request still in flight is stopped at once: its
    connection is shut down and it is not retried, so the call returns within a second.
    """

    kind = "openai"

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, timeout: float = 60.0,
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
        self._stop = threading.Event()
        self._closed = False
        self._live: set[_Deadline] = set()
        self._live_lock = threading.Lock()

    def abort(self) -> None:
        """Stop every request in flight now (connections shut down, no retries); used on
        interruption and by :meth:`close`."""
        self._stop.set()
        with self._live_lock:
            live = list(self._live)
        for watchdog in live:
            watchdog.expire(cancelled=True)

    def close(self) -> None:
        """Stop what is in flight; the back end is unusable afterwards."""
        self._closed = True
        self.abort()

    @staticmethod
    def _read_key(env: str | None) -> str | None:
        if env is None:
            return None
        env = _text("api_key_env", env)
        key = os.environ.get(env, "").strip()
        if not key:
            raise OptionError(f"environment variable {env} (api_key_env) is not set; export it with the API key, "
                              "or drop api_key_env for a server without keys")
        register(key)
        return key

    def identity(self) -> str:
        """``openai:MODEL:BASE_URL`` (the URL without credentials or query)."""
        return f"{self.kind}:{self.model}:{_public_url(self.base_url)}"

    def _complete(self, requests: list[ChatRequest]) -> list[str]:
        if self._closed:
            raise Cancelled("the chat back end was closed")
        workers = min(self.concurrency, len(requests))
        if workers == 1:
            return [self._complete_one(request) for request in requests]
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mpgi-chat")
        futures = [pool.submit(self._complete_or_stop, request) for request in requests]
        try:
            return [future.result() for future in futures]
        except Cancelled:  # stopped because another request failed for good: raise that one's error
            wait(futures)
            for future in futures:
                error = future.exception()
                if error is not None and not isinstance(error, Cancelled):
                    raise error from None
            raise
        except BaseException:
            # the first failure (or Ctrl-C / SIGTERM in this thread) ends the others at once:
            # their connections are shut down and they are not retried
            self.abort()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if not self._closed:
                self._stop.clear()  # the next call starts afresh

    def _complete_or_stop(self, request: ChatRequest) -> str:
        """One request in a worker thread; when it fails for good, the others stop at once."""
        if self._stop.is_set():
            raise Cancelled("chat request stopped")
        try:
            return self._complete_one(request)
        except BaseException:
            self.abort()
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
        return self._redact(answer).strip()

    def _post(self, payload: bytes) -> Any:
        """POST with retries; the parsed JSON answer."""
        attempt = 0
        while True:
            try:
                return self._post_once(payload)
            except _Transient as failure:
                if failure.kind == "cancelled" or self._stop.is_set():
                    raise Cancelled("chat request stopped") from None
                if attempt == self.retries:
                    raise self._give_up(failure, attempt + 1) from None
                delay = self._delay(attempt, failure.retry_after)
                attempt += 1
                log.warning("chat server %s: %s; retry %d/%d in %.2fs", self.public_url, failure.detail,
                            attempt, self.retries, delay)
                if self._stop.wait(delay):
                    raise Cancelled("chat request stopped") from None

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential back-off with jitter, at least ``Retry-After``, at most ``max_backoff``."""
        delay = self.backoff * (2.0 ** min(attempt, 64)) * random.uniform(1.0, 1.5)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_backoff)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _post_once(self, payload: bytes) -> Any:
        """One POST; returns the parsed JSON, raises :class:`_Transient` or a one-line user error.

        The whole attempt is bounded by ``timeout``: a watchdog shuts the connection down when the
        deadline passes (a server that sends one byte a second cannot keep it alive).
        """
        request = urllib.request.Request(self.url, data=payload, headers=self._headers(), method="POST")
        watchdog = _Deadline(self.timeout)
        opener = urllib.request.build_opener(_DeadlineHTTPHandler(watchdog), _DeadlineHTTPSHandler(watchdog))
        with self._live_lock:
            self._live.add(watchdog)
        try:
            if self._stop.is_set():
                raise _Transient("cancelled", "stopped")
            with watchdog, opener.open(request, timeout=self.timeout) as response:
                raw = _read_all(response, watchdog)
        except _Transient:
            raise
        except BaseException as err:
            if watchdog.cancelled:
                raise _Transient("cancelled", "stopped") from None
            raise self._attempt_error(err, watchdog) from None
        finally:
            with self._live_lock:
                self._live.discard(watchdog)
        try:
            return json.loads(raw)
        except ValueError:
            snippet = self._redact(_one_line(raw.decode("utf-8", errors="replace"), 80))
            raise InputError(f"chat server {self.public_url} answered with something that is not JSON "
                             f"({snippet!r}); check that base_url points at an OpenAI-compatible /v1 endpoint") \
                from None

    def _attempt_error(self, err: BaseException, watchdog: _Deadline) -> BaseException:
        """What a failed attempt raises: :class:`_Transient` to retry, a user error, or ``err``
        itself when it is not a network failure (KeyboardInterrupt and the like)."""
        timeout = _Transient("timeout", f"no complete answer within {self.timeout:g}s")
        if isinstance(err, urllib.error.HTTPError):
            return timeout if watchdog.expired else self._http_error(err)
        if isinstance(err, urllib.error.URLError):
            if watchdog.expired or isinstance(err.reason, TimeoutError):
                return timeout
            reason = err.reason if isinstance(err.reason, BaseException) else OSError(str(err.reason))
            return _Transient("unreachable", _error_text(reason))
        if isinstance(err, TimeoutError):
            return timeout
        if isinstance(err, (OSError, ValueError, http.client.HTTPException)):
            return timeout if watchdog.expired else _Transient("unreachable", _error_text(err))
        return err

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
        """``text`` with the API key (and any other registered secret) masked: servers sometimes echo it."""
        text = text.replace(self._api_key, "***") if self._api_key else text
        return redact(text)


class _Deadline:
    """A watchdog over one HTTP attempt: when ``seconds`` have passed, the sockets it watches are
    shut down, so any blocked read ends at once (``expired`` then says why; ``cancelled`` when
    :meth:`expire` was called because the whole call was stopped).

    The sockets are taken when they connect: urllib drops the connection's reference to its
    socket once the headers are in, while the body is still read from it (a server that sends
    its headers, then one byte a second, would otherwise never be cut off)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self.cancelled = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._end = 0.0

    def __enter__(self) -> _Deadline:
        return self

    def start(self) -> None:
        """Start the clock (on the first connection)."""
        with self._lock:
            if self._timer is None:
                self._end = time.monotonic() + self.seconds
                self._timer = threading.Timer(self.seconds, self.expire)
                self._timer.daemon = True
                self._timer.start()

    def remaining(self) -> float:
        """Seconds left (at least a millisecond, so socket timeouts stay valid)."""
        return max(0.001, self._end - time.monotonic()) if self._timer is not None else self.seconds

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down when the deadline passes (at once when it already has)."""
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def expire(self, cancelled: bool = False) -> None:
        """End the attempt now: every watched socket is shut down."""
        with self._lock:
            self.expired = True
            self.cancelled = self.cancelled or cancelled
            for sock in self._sockets:
                _shutdown(sock)

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _read_all(response: Any, watchdog: _Deadline, chunk: int = 1 << 16) -> bytes:
    """The whole body, checking the deadline between reads."""
    parts = []
    while True:
        if watchdog.expired:
            raise TimeoutError("deadline passed")
        block = response.read1(chunk) if hasattr(response, "read1") else response.read(chunk)
        if not block:
            break
        parts.append(block)
    if watchdog.expired:
        raise TimeoutError("deadline passed")
    return b"".join(parts)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    """urllib's HTTP handler, with each connection watched by a :class:`_Deadline`."""

    def __init__(self, watchdog: _Deadline) -> None:
        super().__init__()
        self.watchdog = watchdog

    def http_open(self, req: Any) -> Any:  # noqa: D102 - urllib's hook
        return self.do_open(_watched(http.client.HTTPConnection, self.watchdog), req)


def _watched(cls: type, watchdog: _Deadline) -> Any:
    """A connection factory for urllib's ``do_open``: connections of ``cls`` whose socket is
    watched by ``watchdog`` from the moment it connects."""
    class Watched(cls):
        def connect(self) -> None:
            super().connect()
            watchdog.watch(self.sock)

    def make(host: str, **kwargs: Any) -> Any:
        watchdog.start()
        kwargs["timeout"] = min(float(kwargs.get("timeout") or watchdog.seconds), watchdog.remaining())
        return Watched(host, **kwargs)
    return make


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    """urllib's HTTPS handler, with each connection watched by a :class:`_Deadline`."""

    def __init__(self, watchdog: _Deadline) -> None:
        super().__init__()
        self.watchdog = watchdog

    def https_open(self, req: Any) -> Any:  # noqa: D102 - urllib's hook
        extra: dict[str, Any] = {"context": getattr(self, "_context", None)}
        if getattr(self, "_check_hostname", None) is not None:
            extra["check_hostname"] = self._check_hostname  # type: ignore[attr-defined]
        return self.do_open(_watched(http.client.HTTPSConnection, self.watchdog), req, **extra)


