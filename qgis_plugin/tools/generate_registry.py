"""Write ``qgis_plugin/core/registry.py``: the engine's model registry as plain data for the plugin.

The plugin never imports ``hqrs_geo`` (it runs in another Python), yet its Processing dialogs and
settings must list the engine's models without starting the engine. The module is committed and
``make plugin`` packages it as it is; after a change to ``hqrs_geo.models.registry`` regenerate it
with the engine's interpreter and commit the result::

    python -m qgis_plugin.tools.generate_registry            # rewrite the module
    python -m qgis_plugin.tools.generate_registry --check    # exit 1 when it is out of date

``tests/plugin/test_plugin_runner.py`` checks that the committed module is up to date.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hqrs_geo.models.registry import ModelSpec

TARGET = Path(__file__).resolve().parents[1] / "core" / "registry.py"
FIELDS = ("name", "kind", "arch", "description", "bundled")
HEADER = '''"""The engine's model registry as data (GENERATED from ``hqrs_geo.models.registry``; do not
edit: regenerate with ``python -m qgis_plugin.tools.generate_registry``; the tests check it is current).

The shipped demo models come first in each list: they are the defaults and need no download.
"""
'''


def render() -> str:
    """The module text for the registry of the ``hqrs_geo`` importable here."""
    from hqrs_geo.models.registry import list_models

    built_in = list(list_models())  # a fresh engine process: the built-in entries only
    clip = [s for s in built_in if s.kind == "clip"]
    coca = [s for s in built_in if s.kind == "coca"]

    def ordered(specs: list[ModelSpec]) -> list[ModelSpec]:  # shipped (bundled) models first, else registry order
        return [s for s in specs if s.bundled] + [s for s in specs if not s.bundled]

    # PEP 585 annotations (strings under the __future__ import, so Python 3.9 QGIS builds read them)
    lines = [HEADER, "from __future__ import annotations", "",
             "# name -> (kind, open_clip architecture, description, shipped with the engine)",
             "MODELS: dict[str, tuple[str, str, str, bool]] = {"]
    for spec in ordered(clip) + ordered(coca):
        lines.append(f"    {spec.name!r}: (")
        lines.append(f"        {spec.kind!r}, {spec.arch!r},")
        parts = textwrap.wrap(spec.description, 96, drop_whitespace=False) or [""]
        lines += [f"        {part!r}" for part in parts[:-1]] + [f"        {parts[-1]!r},"]
        lines.append(f"        {bool(spec.bundled)!r},")
        lines.append("    ),")
    lines += ["}", ""]
    for name, specs in (("CLIP_MODELS", ordered(clip)), ("COCA_MODELS", ordered(coca))):
        lines.append(f"{name}: tuple[str, ...] = (")
        lines += [f"    {s.name!r}," for s in specs]
        lines.append(")")
    lines.append("DEFAULT_CLIP = CLIP_MODELS[0]")
    lines.append("DEFAULT_COCA = COCA_MODELS[0]")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) the generated module."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the module is up to date")
    args = parser.parse_args(argv)
    text = render()
    current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
    if args.check:
        if current != text:
            print(f"{TARGET} is out of date: run python -m qgis_plugin.tools.generate_registry", file=sys.stderr)
            return 1
        return 0
    if current != text:
        TARGET.write_text(text, encoding="utf-8")
        print(f"written: {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
