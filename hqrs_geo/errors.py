"""User-facing errors.

Every problem a user can fix (bad path, bad option, unsupported raster) is raised as a
:class:`HqrsError` whose message is one line: what is wrong, with which file, what to do.
The CLI prints that line and exits non-zero; it never shows a traceback for these.
"""
from __future__ import annotations


class HqrsError(Exception):
    """A problem the user can fix; ``str(err)`` is a complete one-line explanation."""

    exit_code = 2


class InputError(HqrsError):
    """An input file is missing, unreadable or unsuitable."""


class OptionError(HqrsError):
    """A command-line option or API argument has an invalid value."""


class OutputError(HqrsError):
    """An output cannot be written where the user asked."""


class Cancelled(HqrsError):
    """The job was cancelled (Ctrl-C, SIGTERM or a cancel callback)."""

    exit_code = 130
