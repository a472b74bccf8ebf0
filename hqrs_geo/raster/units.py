"""Lengths given by users: pixels (``256``, ``256px``), ground units (``64m``, ``0.5km``)
or a percentage of the tile (``25%``, overlaps only)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from ..errors import OptionError

Unit = Literal["px", "m", "%"]

_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(px|m|km|ft|%)?\s*$", re.IGNORECASE)
_TO_METRES = {"m": 1.0, "km": 1000.0, "ft": 0.3048}


@dataclass(frozen=True)
class Length:
    """A length in pixels, metres on the ground, or percent of the tile size."""

    value: float
    unit: Unit = "px"

    def __str__(self) -> str:
        number = f"{self.value:g}"
        return number + ("" if self.unit == "px" else self.unit)


LengthLike = Length | int | float | str


def parse_length(spec: LengthLike, what: str = "length", allow_percent: bool = False,
                 option: str | None = None) -> Length:
    """Parse ``spec`` (``256``, ``"256px"``, ``"64m"``, ``"0.1km"``, ``"25%"``) into a :class:`Length`.

    Raises :class:`OptionError` with a one-line explanation when it cannot be parsed.
    """
    usage = "use pixels (256), ground units (64m, 0.5km)" + (" or a percentage (25%)" if allow_percent else "")
    if isinstance(spec, Length):
        length = spec
    elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
        length = Length(float(spec), "px")
    else:
        text = str(spec)
        match = _PATTERN.match(text)
        if not match:
            negative = text.strip().startswith("-")
            raise OptionError(f"{text[:40]!r} is not a valid {what}" + ("; it must not be negative" if negative else "")
                              + f"; {usage}", option=option)
        value, unit = float(match.group(1)), (match.group(2) or "px").lower()
        if unit in _TO_METRES:
            length = Length(value * _TO_METRES[unit], "m")
        else:
            length = Length(value, unit)  # type: ignore[arg-type]
    if not math.isfinite(length.value) or length.value > 1e9:
        raise OptionError(f"{spec!r} is not a usable {what}; {usage}", option=option)
    if length.unit == "%" and not allow_percent:
        raise OptionError(f"{spec!r}: a percentage is only allowed for overlaps; {usage}", option=option)
    if length.value < 0:
        raise OptionError(f"{spec!r}: a {what} must not be negative; {usage}", option=option)
    if length.unit == "%" and length.value >= 100:
        raise OptionError(f"{spec!r}: an overlap must be below 100%; give a smaller percentage", option=option)
    if length.unit == "px" and length.value != int(length.value):
        raise OptionError(f"{spec!r}: pixel counts must be whole numbers; {usage}", option=option)
    return length
