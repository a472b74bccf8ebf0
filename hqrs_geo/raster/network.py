"""Bounded network waits for remote inputs: COGs and rasters GDAL reads over the network
(``/vsicurl/``, ``/vsis3/``…) and STAC JSON read over HTTP.

Every wait has three limits (:class:`NetworkLimits`; defaults in brackets):

* ``connect_timeout`` [10 s]: establishing a connection;
* ``read_timeout`` [30 s]: the longest time without receiving a byte (a server that accepted the
  connection and never answers, or stopped sending);
* ``deadline`` [120 s]: one whole read — opening a scene, reading one tile's or one block's
  pixels, fetching one STAC document — retries included, however slowly the server drips its
  answer; then the read fails with a one-line error (the scene is recorded as failed and a
  dataset job goes on with the next one).

``retries`` [3] is how often GDAL retries a request that failed on the way (timeouts, HTTP 429
and 5xx), one second apart, within the deadline.

Change them with the environment variables ``HQRS_GEO_HTTP_CONNECT_TIMEOUT``,
``HQRS_GEO_HTTP_READ_TIMEOUT``, ``HQRS_GEO_HTTP_DEADLINE`` and ``HQRS_GEO_HTTP_RETRIES`` (read
at each wait; child processes inherit them) or the matching command-line options
(``--http-connect-timeout``, ``--http-read-timeout``, ``--http-deadline``, ``--http-retries``,
which set the variables). GDAL's own settings
(``GDAL_HTTP_CONNECTTIMEOUT``, ``GDAL_HTTP_LOW_SPEED_TIME``/``_LIMIT``, ``GDAL_HTTP_TIMEOUT``,
``GDAL_HTTP_MAX_RETRY``, ``GDAL_HTTP_RETRY_DELAY``) are set from them unless the user set those
and none of ours.

Each wait runs in a helper thread while the calling thread waits on it (:func:`bounded`), so the
deadline holds whatever GDAL or the server does, and Ctrl-C or SIGTERM end the wait at once (the
abandoned request ends by its own timeouts in the background).
"""
from __future__ import annotations

import base64
import math
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import HqrsError, InputError, OptionError
from ..redact import public_url, redact

T = TypeVar("T")

ENV = {
    "connect_timeout": "HQRS_GEO_HTTP_CONNECT_TIMEOUT",
    "read_timeout": "HQRS_GEO_HTTP_READ_TIMEOUT",
    "deadline": "HQRS_GEO_HTTP_DEADLINE",
    "retries": "HQRS_GEO_HTTP_RETRIES",
}
#: Highest accepted values (a day for waits; retries beyond 20 only hide a dead server).
HIGHEST = {"connect_timeout": 600.0, "read_timeout": 3600.0, "deadline": 86400.0, "retries": 20}
RETRY_DELAY = 1.0  # seconds between GDAL's retries
MAX_JSON_BYTES = 256 * 2**20  # a STAC document larger than this is refused
_POLL = 0.1  # seconds between checks of a waiting read (signals are handled at once anyway)


@dataclass(frozen=True)
class NetworkLimits:
    """Time limits of network waits (seconds) and GDAL's retries; see the module text."""

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    deadline: float = 120.0
    retries: int = 3

    def validated(self) -> NetworkLimits:
        """Check the ranges (one-line OptionError naming the option)."""
        for name in ("connect_timeout", "read_timeout", "deadline"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 < value <= HIGHEST[name]:
                raise OptionError(f"invalid {name.replace('_', ' ')} {value!r}: give seconds above 0 and at most "
                                  f"{HIGHEST[name]:g}", option=f"http_{name}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) \
                or not 0 <= self.retries <= HIGHEST["retries"]:
            raise OptionError(f"invalid retries {self.retries!r}: give a whole number from 0 to {HIGHEST['retries']}",
                              option="http_retries")
        return self

    @classmethod
    def from_env(cls, environ: Any = None) -> NetworkLimits:
        """The limits set by ``HQRS_GEO_HTTP_*`` (defaults for the others), checked."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable in ENV.items():
            text = environ.get(variable, "").strip()
            if not text:
                continue
            try:
                values[name] = int(text) if name == "retries" else float(text)
            except ValueError:
                kind = "a whole number" if name == "retries" else "seconds"
                raise OptionError(f"${variable}={text[:40]!r} is not {kind}; fix or unset it") from None
        try:
            return cls(**values).validated()
        except OptionError as exc:
            name = (exc.option or "").removeprefix("http_")
            raise OptionError(f"${ENV.get(name, 'HQRS_GEO_HTTP_*')}: {exc}") from None

    def gdal_options(self) -> dict[str, str]:
        """GDAL's configuration options for these limits (one request of a read never outlives
        the deadline; a request without data for ``read_timeout`` is aborted and retried)."""
        return {
            "GDAL_HTTP_CONNECTTIMEOUT": f"{self.connect_timeout:g}",
            "GDAL_HTTP_LOW_SPEED_TIME": str(max(1, math.ceil(self.read_timeout))),
            "GDAL_HTTP_LOW_SPEED_LIMIT": "1",
            "GDAL_HTTP_TIMEOUT": f"{self.deadline:g}",
            "GDAL_HTTP_MAX_RETRY": str(self.retries),
            "GDAL_HTTP_RETRY_DELAY": f"{RETRY_DELAY:g}",
        }


def set_limits(connect_timeout: float | None = None, read_timeout: float | None = None,
               deadline: float | None = None, retries: int | None = None) -> NetworkLimits:
    """Set the limits of this process and its children (the given ones; the others keep their
    current value); returns the limits now in force. Values are checked first."""
    current = limits()
    given: dict[str, Any] = {"connect_timeout": connect_timeout, "read_timeout": read_timeout, "deadline": deadline,
             "retries": retries}
    chosen = NetworkLimits(**{k: (v if v is not None else getattr(current, k)) for k, v in given.items()}).validated()
    for name, value in given.items():
        if value is not None:
            os.environ[ENV[name]] = str(value)
    return chosen


def limits() -> NetworkLimits:
    """The limits in force (from the environment; defaults where unset)."""
    return NetworkLimits.from_env()


def apply_gdal_options(chosen: NetworkLimits | None = None) -> None:
    """Set GDAL's network options from the limits (environment variables, inherited by child
    processes). A GDAL variable the user set is kept unless one of ours is set too."""
    chosen = chosen or limits()
    ours = any(os.environ.get(v, "").strip() for v in ENV.values())
    for name, value in chosen.gdal_options().items():
        if ours or name not in os.environ:
            os.environ[name] = value


# -- bounded waits ---------------------------------------------------------------------------------
class NetworkTimeout(InputError):
    """A network read did not finish within its deadline."""


_busy: dict[str, int] = {}
_busy_lock = threading.Lock()


def busy(key: str) -> bool:
    """True while a read of ``key`` runs (or was abandoned and still runs) in a helper thread:
    its dataset must not be closed under it."""
    with _busy_lock:
        return _busy.get(key, 0) > 0


class _Helper:
    """The helper thread of one calling thread: it runs that thread's network reads one after the
    other, so GDAL's connections (kept per thread) are reused from read to read. Abandoned after a
    read past its deadline or an interrupted wait (it ends when that read ends); ended when its
    calling thread ends (this object is then collected)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=_serve, args=(self.jobs,), name="hqrs-network-read", daemon=True)
        self.thread.start()

    def abandon(self) -> None:
        """Let the thread end after the read it runs."""
        self.jobs.put(None)

    def __del__(self) -> None:
        self.jobs.put(None)


def _serve(jobs: queue.SimpleQueue) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        job()


_helpers = threading.local()


def _helper() -> _Helper:
    helper = getattr(_helpers, "helper", None)
    if helper is None or not helper.thread.is_alive():  # none yet, or a forked process
        helper = _helpers.helper = _Helper()
    return helper


def bounded(call: Callable[[], T], key: str, what: str | None = None, deadline: float | None = None) -> T:
    """``call()`` run in this thread's helper thread, waited for at most ``deadline`` seconds
    (default: the limits' deadline). Past it: :class:`NetworkTimeout` naming ``what`` (default
    ``key``, made public); the helper is abandoned (it ends with GDAL's or the socket's own
    timeouts) and the next read gets a new one. The wait is interruptible: Ctrl-C and SIGTERM are
    raised in the caller at once."""
    seconds = limits().deadline if deadline is None else deadline
    box: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc
        finally:
            with _busy_lock:
                _busy[key] -= 1
                if not _busy[key]:
                    del _busy[key]
            done.set()

    with _busy_lock:
        _busy[key] = _busy.get(key, 0) + 1
    helper = _helper()
    helper.jobs.put(run)
    end = time.monotonic() + seconds
    try:
        while not done.wait(max(0.0, min(_POLL, end - time.monotonic()))):
            if time.monotonic() >= end:
                raise NetworkTimeout(f"{public_url(what or key)}: no answer within the {seconds:g} s deadline of "
                                     "one read (the server accepted the connection but sent too little); check the "
                                     "server, or allow more time with $HQRS_GEO_HTTP_DEADLINE")
    except BaseException:
        if not done.is_set():
            _helpers.helper = None
            helper.abandon()
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- what went wrong, in words ---------------------------------------------------------------------
def http_advice(url: str, code: int) -> str:
    """A one-line error for HTTP status ``code`` answered for ``url`` (shown without credentials)."""
    where = public_url(url)
    if code in (404, 410):
        return f"{where}: does not exist on the server (HTTP {code}); check the URL"
    if code == 401:
        return (f"{where}: the server asks for credentials (HTTP 401); give them in the URL (user:password@, "
                "?token=…) or with GDAL_HTTP_USERPWD / GDAL_HTTP_HEADERS, and check they are right")
    if code == 403:
        return (f"{where}: access denied (HTTP 403): the credentials are missing, wrong or expired (a signed "
                "URL that has expired?); check them")
    if code == 407:
        return f"{where}: the proxy asks for credentials (HTTP 407); check the proxy settings"
    if code == 416:
        return f"{where}: the server refused a byte range (HTTP 416): it serves a shorter or changed file"
    if code == 429:
        return f"{where}: too many requests (HTTP 429), also after retries; try again later or with fewer workers"
    if 500 <= code < 600:
        return f"{where}: server error (HTTP {code}), also after retries; try again later"
    if 300 <= code < 400:
        return f"{where}: redirected (HTTP {code}) where it cannot be followed; give the final URL"
    return f"{where}: the server answered HTTP {code}; check the URL"


_HTTP_CODE = re.compile(r"HTTP (?:response )?(?:code|error)[: ]+(\d{3})", re.IGNORECASE)


def network_reason(path: str, message: str) -> str | None:
    """A one-line error for a failed network read of ``path`` from GDAL's or curl's ``message``
    (an HTTP status, a timeout, a refused or unresolvable connection); None when it is none of these."""
    where = public_url(path)
    text = redact(" ".join(str(message).split()))
    match = _HTTP_CODE.search(text)
    if match:
        return http_advice(path, int(match.group(1)))
    lowered = text.lower()
    if "connection timed out" in lowered or "connect timed out" in lowered:
        return (f"{where}: no connection within the connect timeout ({text[:160]}); check the URL and that the "
                "server is up, or allow more time with $HQRS_GEO_HTTP_CONNECT_TIMEOUT")
    if "timed out" in lowered or "timeout" in lowered or "too slow" in lowered:
        return (f"{where}: the server did not answer in time ({text[:160]}); check the server, or allow more time "
                "with $HQRS_GEO_HTTP_READ_TIMEOUT or $HQRS_GEO_HTTP_DEADLINE")
    if "could not resolve" in lowered or "name or service not known" in lowered:
        return f"{where}: unknown host ({text[:160]}); check the URL"
    if "failed to connect" in lowered or "connection refused" in lowered or "could not connect" in lowered:
        return f"{where}: cannot connect ({text[:160]}); check the URL and that the server is up"
    if "curl error" in lowered or "ssl" in lowered or "connection reset" in lowered:
        return f"{where}: the connection failed ({text[:160]}); check the URL and the network"
    return None


# -- HTTP(S) documents (STAC JSON) -----------------------------------------------------------------
def _opener(chosen: NetworkLimits) -> urllib.request.OpenerDirector:
    """A urllib opener whose HTTP(S) connections connect within ``connect_timeout`` and then wait
    at most ``read_timeout`` for each piece of the answer."""

    def connect(connection: HTTPConnection, connect: Callable[[], None]) -> None:
        connection.timeout = chosen.connect_timeout
        try:
            connect()
        except TimeoutError:
            raise TimeoutError(f"connection timed out after {chosen.connect_timeout:g} s") from None
        connection.sock.settimeout(chosen.read_timeout)

    class Http(HTTPConnection):
        def connect(self) -> None:
            connect(self, super().connect)

    class Https(HTTPSConnection):
        def connect(self) -> None:
            connect(self, super().connect)

    http_class: Any = Http
    https_class: Any = Https

    class HttpHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(http_class, req)

    class HttpsHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(https_class, req, context=getattr(self, "_context", None))

    return urllib.request.build_opener(HttpHandler, HttpsHandler)


def _request(url: str) -> urllib.request.Request:
    """A GET of ``url`` with user:password moved into an Authorization header."""
    parts = urlsplit(url)
    headers = {"User-Agent": "hqrs-geo", "Accept": "application/json, application/geo+json, */*"}
    if parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        url = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, parts.fragment))
    return urllib.request.Request(url, headers=headers)


def fetch(url: str, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The body of ``url`` (http or https) within the network limits: connect and read timeouts,
    the deadline over the whole answer (retries included: connection failures, timeouts, 429 and
    5xx are retried). Errors are one-line InputErrors with advice that fits them, the URL shown
    without credentials."""
    chosen = limits()
    opener = _opener(chosen)
    end = time.monotonic() + chosen.deadline

    def attempt() -> bytes:
        with opener.open(_request(url)) as answer:
            declared = answer.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise InputError(f"{public_url(url)}: the document is {int(declared):,} bytes, more than "
                                 f"{max_bytes:,}; is it a STAC document?")
            chunks: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() > end:
                    raise NetworkTimeout(f"{public_url(url)}: no answer within the {chosen.deadline:g} s deadline; "
                                         "check the server, or allow more time with $HQRS_GEO_HTTP_DEADLINE")
                chunk = answer.read(65536)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > max_bytes:
                    raise InputError(f"{public_url(url)}: the document is larger than {max_bytes:,} bytes; "
                                     "is it a STAC document?")
                chunks.append(chunk)

    def with_retries() -> bytes:
        for tried in range(chosen.retries + 1):
            try:
                return attempt()
            except HqrsError:
                raise
            except urllib.error.HTTPError as exc:
                retry = exc.code == 429 or 500 <= exc.code < 600
                if not retry or tried == chosen.retries:
                    raise InputError(http_advice(url, exc.code)) from None
            except (urllib.error.URLError, OSError, HTTPException) as exc:
                if tried == chosen.retries:
                    reason = getattr(exc, "reason", exc)
                    text = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
                    if isinstance(reason, TimeoutError) or "timed out" in text:
                        text = f"timed out: {text}"
                    raise InputError(network_reason(url, text) or f"{public_url(url)}: cannot read ({redact(text)})") \
                        from None
            if time.monotonic() + RETRY_DELAY > end:
                break
            time.sleep(RETRY_DELAY)
        raise NetworkTimeout(f"{public_url(url)}: no answer within the {chosen.deadline:g} s deadline; "
                             "check the server, or allow more time with $HQRS_GEO_HTTP_DEADLINE")

    return bounded(with_retries, url, deadline=chosen.deadline)


__all__ = ["ENV", "NetworkLimits", "NetworkTimeout", "apply_gdal_options", "bounded", "busy", "fetch",
           "http_advice", "limits", "network_reason", "set_limits"]
