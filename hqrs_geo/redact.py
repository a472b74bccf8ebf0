"""Secrets (API keys) never stored or printed: the one place that masks them.

A back end that reads a secret registers it with :func:`register`; every place that stores or
prints text a server or a library produced (the MpGI call cache and its answers, the layer's
sources table, warnings and error lines of the CLI, progress messages) passes it through
:func:`redact`, which replaces each registered secret by ``***``.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

MASK = "***"
MIN_LENGTH = 4  # shorter values would mask ordinary words

_secrets: set[str] = set()
_lock = threading.Lock()


def register(secret: str | None) -> None:
    """Remember ``secret`` (an API key) so that :func:`redact` masks it from now on."""
    if secret and len(secret) >= MIN_LENGTH:
        with _lock:
            _secrets.add(secret)


def redact(text: Any) -> Any:
    """``text`` with every registered secret replaced by ``***`` (non-strings unchanged)."""
    if not isinstance(text, str) or not _secrets:
        return text
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that masks registered secrets in every record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask the formatted message in place; never drops a record."""
        if _secrets:
            message = record.getMessage()
            masked = redact(message)
            if masked != message:
                record.msg, record.args = masked, None
        return True


__all__ = ["MASK", "RedactingFilter", "redact", "register"]
