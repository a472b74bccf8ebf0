"""Secrets never stored or printed: the one place that masks them.

Two kinds of secret pass through here:

* **registered values** — an API key a back end reads (:func:`register`), and the passwords and
  tokens found in URLs the user gives: :func:`redact` replaces each by ``***``;
* **credentials inside URLs** — ``user:password@`` and query-string tokens (``token``,
  ``api_key``, ``key``, ``sig``, ``X-Amz-*``, ``X-Goog-*``… see :func:`is_secret_parameter`):
  :func:`public_url` strips them, and :func:`redact` does so for every URL inside any text.

Every place that stores or prints text a user, a server or a library produced (layers' ``source``
and ``source_url`` columns, dataset manifests and their failed-scene entries, run records, the
MpGI call cache, warnings and error lines of the CLI, progress messages) stores the *public* form.
The URL with its credentials is kept only in memory, for the read itself: :func:`remember` maps a
public path to it and :func:`reveal` gives it back to the code that opens the raster.
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
MIN_LENGTH = 4  # shorter values would mask ordinary words

#: Query parameters whose values are credentials (compared without case).
SECRET_PARAMETERS = frozenset({
    "token", "access_token", "refresh_token", "id_token", "auth_token", "session_token", "security_token",
    "api_key", "apikey", "api-key", "key", "sig", "signature", "password", "passwd", "pwd", "secret",
    "client_secret", "auth", "authorization", "credential", "credentials", "jwt", "code", "sas",
})
#: Query parameters starting with these are credentials too (signed cloud URLs).
SECRET_PREFIXES = ("x-amz-", "x-goog-", "x-ms-")
#: ... and those ending with these (``my_token``, ``service_key``).
SECRET_SUFFIXES = ("token", "_key", "-key", "secret", "password", "signature")

#: GDAL virtual file system prefixes that wrap a URL (``/vsicurl/https://…``).
_URL_WRAPPERS = ("/vsicurl/", "/vsicurl_streaming/")
#: A URL inside free text (an error line, a GDAL message): scheme://… up to a space or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*[^\s'\"<>`).,;:]")

_secrets: set[str] = set()
_real_paths: dict[str, str] = {}
_lock = threading.Lock()


def register(secret: str | None) -> None:
    """Remember ``secret`` (an API key, a password) so that :func:`redact` masks it from now on."""
    if secret and len(secret) >= MIN_LENGTH:
        with _lock:
            _secrets.add(secret)
            decoded = unquote(secret)
            if decoded != secret and len(decoded) >= MIN_LENGTH:
                _secrets.add(decoded)


def is_secret_parameter(name: str) -> bool:
    """True when the query parameter ``name`` carries a credential (``token``, ``X-Amz-Signature``…)."""
    lowered = name.strip().lower()
    return lowered in SECRET_PARAMETERS or lowered.startswith(SECRET_PREFIXES) or lowered.endswith(SECRET_SUFFIXES)


def _split(url: str) -> tuple[str, str]:
    """``(GDAL wrapper prefix, URL)`` of a URL or a ``/vsicurl/URL`` path."""
    for wrapper in _URL_WRAPPERS:
        if url.startswith(wrapper):
            return wrapper, url[len(wrapper):]
    return "", url


def url_secrets(url: str) -> list[str]:
    """The credentials inside ``url``: its password (or a user name without password: a token), and
    the values of secret query parameters."""
    _, bare = _split(str(url))
    if "://" not in bare:
        return []
    try:
        parts = urlsplit(bare)
        found = []
        if parts.password:
            found.append(parts.password)
        elif parts.username:  # a token given as the user name (https://TOKEN@host/…)
            found.append(parts.username)
        found += [value for name, value in parse_qsl(parts.query, keep_blank_values=True)
                  if is_secret_parameter(name)]
    except ValueError:
        return []
    return [s for s in found if s]


def public_url(url: Any) -> Any:
    """``url`` (a URL or a GDAL ``/vsicurl/URL`` path) without user name, password and secret query
    parameters; other parameters and non-URL text are kept as they are (non-strings unchanged)."""
    if not isinstance(url, str) or "://" not in url:
        return url
    wrapper, bare = _split(url)
    try:
        parts = urlsplit(bare)
        netloc = parts.netloc.rpartition("@")[2]
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            kept = [(name, value) for name, value in pairs if not is_secret_parameter(name)]
            if len(kept) != len(pairs):
                query = urlencode(kept)
        if netloc == parts.netloc and query == parts.query:
            return url
        return wrapper + urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # not a parsable URL (an invalid port…): drop everything after the host
        head, _, rest = bare.partition("://")
        host = rest.split("/", 1)[0].rpartition("@")[2]
        return f"{wrapper}{head}://{host}/{MASK}"


def redact(text: Any) -> Any:
    """``text`` with every registered secret replaced by ``***`` and every URL in it made public
    (:func:`public_url`); non-strings unchanged."""
    if not isinstance(text, str):
        return text
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda m: public_url(m.group(0)), text)
    if not _secrets:
        return text
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_all(value: Any) -> Any:
    """A copy of ``value`` (JSON-like: dicts, lists, tuples, strings) with :func:`redact` applied to
    every string, keys included; used on everything written to run records and manifests."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(k): redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_all(v) for v in value)
    return value


def remember(public: str, real: str) -> None:
    """Keep, in memory only, the path with credentials (``real``) that reads what ``public`` names;
    its secrets are registered so that no message shows them."""
    if public == real:
        return
    for secret in url_secrets(real):
        register(secret)
    with _lock:
        _real_paths[public] = real


def reveal(public: str) -> str:
    """The path to open for ``public`` (the one with credentials when :func:`remember` knows it)."""
    with _lock:
        return _real_paths.get(public, public)


def private_path(path: str) -> tuple[str, str]:
    """``(public, real)`` forms of a path or URL the user gave; the real one is remembered."""
    public = public_url(path)
    if public != path:
        remember(public, path)
    return public, path


class RedactingFilter(logging.Filter):
    """A logging filter that masks registered secrets and URL credentials in every record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask the formatted message in place; never drops a record."""
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


__all__ = ["MASK", "RedactingFilter", "is_secret_parameter", "private_path", "public_url", "redact", "redact_all",
           "register", "remember", "reveal", "url_secrets"]
