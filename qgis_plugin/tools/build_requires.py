"""Print the ``[build-system] requires`` of a ``pyproject.toml``, one requirement a line.

``make plugin`` installs them into its small build environment (``build/plugin-venv``) to build the
engine's wheel without the project's own environment. Standard library only: it runs on the
system's Python, which may be 3.10 (no ``tomllib``; then the one-line ``requires = [...]`` array
of the table is read as a Python literal)::

    python3 qgis_plugin/tools/build_requires.py pyproject.toml
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path


def build_requires(pyproject: Path) -> list[str]:
    """The build requirements named in ``pyproject``; ValueError when it has none."""
    text = pyproject.read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        table = re.search(r"^\[build-system\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        line = re.search(r"^requires\s*=\s*(\[.*?\])\s*$", table.group(1), re.M) if table else None
        requires = ast.literal_eval(line.group(1)) if line else None
    else:
        requires = tomllib.loads(text).get("build-system", {}).get("requires")
    if not requires or not all(isinstance(r, str) for r in requires):
        raise ValueError(f"{pyproject} has no [build-system] requires list")
    return list(requires)


def main(argv: list[str] | None = None) -> int:
    """Print the requirements; exit 1 with a one-line error when there are none."""
    parser = argparse.ArgumentParser(description="print the [build-system] requires of a pyproject.toml")
    parser.add_argument("pyproject", type=Path, nargs="?", default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    try:
        print("\n".join(build_requires(args.pyproject)))
    except (OSError, ValueError, SyntaxError) as exc:
        print(f"build_requires: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
