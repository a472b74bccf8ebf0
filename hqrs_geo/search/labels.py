"""Reading class names and prompt templates from text files (one per line)."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError

MAX_BYTES = 1 << 20  # a label list is text: refuse anything bigger than 1 MiB


def read_lines(path: str, what: str = "text file") -> list[str]:
    """The non-empty lines of a UTF-8 text file (one-line errors for missing, binary or huge files)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: {what} not found; check the path")
    if file.stat().st_size > MAX_BYTES:
        raise InputError(f"{path}: {what} is larger than 1 MiB; give a text file with one entry per line")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: {what} is not UTF-8 text; give a text file with one entry per line") from None
    if "\x00" in text:
        raise InputError(f"{path}: {what} is a binary file; give a text file with one entry per line")
    return [line.strip() for line in text.splitlines() if line.strip()]
