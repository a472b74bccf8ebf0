"""User-facing errors.

Every problem a user can fix (bad path, bad option, unsupported raster) is raised as a
:class:`HqrsError` whose message is one line: what is wrong, with which file or parameter,
what to do. The errors also subclass the builtin a Python caller would expect, as rasterio's
do: :class:`InputError` and :class:`OutputError` are :class:`OSError`, :class:`OptionError`
is a :class:`ValueError`.

Messages never name command-line flags: an error about a parameter carries its Python name in
``option`` (``tile_size``), and a message that advises another parameter writes it as
``«name»``. Each front end words them its own way through :meth:`HqrsError.worded` (the CLI as
``--tile-size``, the QGIS plugin as the field's label); ``str(err)`` uses the Python names.
"""
from __future__ import annotations

import re
from collections.abc import Callable

_MENTION = re.compile(r"«([a-z_]+)»")


class HqrsError(Exception):
    """A problem the user can fix; ``str(err)`` is a complete one-line explanation.

    ``option``: the Python name of the parameter at fault (``tile_size``), when there is one.
    """

    exit_code = 2

    def __init__(self, message: str = "", *, option: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.option = option

    def __reduce__(self):  # keep ``option`` across processes (DataLoader workers, Ray tasks)
        return _rebuild, (type(self), self.message, self.option, self.exit_code)

    def __str__(self) -> str:
        return self.worded(lambda name: name)

    def worded(self, name_of: Callable[[str], str]) -> str:
        """The one-line message with every parameter named by ``name_of(python_name)``."""
        text = _MENTION.sub(lambda m: name_of(m.group(1)), self.message)
        return text if not self.option else f"{name_of(self.option)}: {text}"


def _rebuild(cls: type, message: str, option: str | None, exit_code: int) -> HqrsError:
    err = cls(message, option=option)
    err.exit_code = exit_code
    return err


class InputError(HqrsError, OSError):
    """An input file is missing, unreadable or unsuitable."""


class OptionError(HqrsError, ValueError):
    """A parameter (CLI option or API argument) has an invalid value."""


class OutputError(HqrsError, OSError):
    """An output cannot be written where the user asked."""


class Cancelled(HqrsError):
    """The job was cancelled (Ctrl-C, SIGTERM or a cancel callback)."""

    exit_code = 130
