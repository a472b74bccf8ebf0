"""The docs stay true to the tree: names they mention exist, links lead somewhere, the README stays short.

Names are resolved by reading the source with ``ast`` (nothing is imported, so no torch): a
dotted name ``hqrs_geo.a.b`` is a module or package, or a name defined at the top level of one
(assigned, defined, imported, or in the package's lazy table), or an attribute of a class
defined there. Sphinx roles with a relative target (``:mod:`.facts```) are resolved against the
package of the docstring's module.
"""
from __future__ import annotations

import argparse
import ast
import collections
import re
import sys
from functools import cache
from pathlib import Path

import pytest
import tomllib
from conftest import ROOT

PACKAGES = ("hqrs_geo", "qgis_plugin")
MAX_README_LINES = 350
#: A dotted name (at least one dot) starting with a package of the project.
DOTTED = re.compile(r"(?<![\w.])(?:hqrs_geo|qgis_plugin)(?:\.[A-Za-z_]\w*)+")
#: Text that reads like a dotted name and is not one: the format name written in dataset manifests.
NOT_NAMES = {"hqrs_geo.dataset"}
ROLE = re.compile(r":(?:mod|class|func|meth|data|attr|exc|obj):`~?(\.[A-Za-z_][\w.]*)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
#: Internal work items must never reach the docs or messages (issue numbers, commits as "the previous release").
WORK_ITEM = re.compile(r"\bissues? #?\d+\b|\bthe issue's\b|previous release \([0-9a-f]{7,}\)", re.IGNORECASE)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "DESIGN.md", ROOT / "CHANGES.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def docstrings(path: Path) -> tuple[str, ...]:
    """Every module, class and function docstring of a source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    return tuple(d for d in (ast.get_docstring(n, clean=False) for n in nodes) if d)


def module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _top_level(body: list[ast.stmt]) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
        elif isinstance(node, ast.If):
            names.update(_top_level(node.body))
            names.update(_top_level(node.orelse))
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                names.update(_top_level(block))
    return names


@cache
def defined(path: Path) -> dict[str, ast.AST]:
    """Top-level names of a module, and the keys of a package's lazy import table (``_LAZY``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = _top_level(tree.body)
    lazy = names.get("_LAZY")
    if isinstance(lazy, ast.Assign) and isinstance(lazy.value, ast.Dict):
        for key in lazy.value.keys:
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                names[key.value] = lazy
    return names


def _class_has(cls: ast.ClassDef, attr: str, module: Path, depth: int = 0) -> bool:
    if attr in _top_level(cls.body):
        return True
    for base in cls.bases:  # bases defined in the same module
        if isinstance(base, ast.Name) and depth < 5:
            node = defined(module).get(base.id)
            if isinstance(node, ast.ClassDef) and _class_has(node, attr, module, depth + 1):
                return True
    return False


def resolves(dotted: str) -> bool:
    """True when ``dotted`` names a module of the project or something defined in one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_file(parts[:cut])
        if path is not None:
            break
    else:
        return False
    rest = parts[cut:]
    if not rest:
        return True
    node = defined(path).get(rest[0])
    if node is None:
        return False
    if len(rest) == 1:
        return True
    if isinstance(node, ast.ImportFrom):  # a re-exported name: follow it to its module
        package = module_name(path).split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        if node.level:
            package = package[:len(package) - node.level + 1]
            source = [*package, *(node.module.split(".") if node.module else [])]
        else:
            source = (node.module or "").split(".")
        return resolves(".".join([*source, *rest]))
    if isinstance(node, ast.ClassDef):
        return len(rest) == 2 and _class_has(node, rest[1], path)
    return False


def resolves_relative(target: str, path: Path) -> bool:
    """A relative Sphinx target (``.facts``, ``.Class.method``) from the docstring of ``path``:
    against its package, or against the module itself."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    bases = [package, name]
    return any(resolves(base + target) for base in bases)


def names_in(text: str) -> set[str]:
    return {m.rstrip(".") for m in DOTTED.findall(text)} - NOT_NAMES


def test_dotted_names_in_docstrings_exist():
    missing = []
    for path in code_files():
        for doc in docstrings(path):
            missing += [f"{path.relative_to(ROOT)}: {name}" for name in sorted(names_in(doc)) if not resolves(name)]
            missing += [f"{path.relative_to(ROOT)}: {target}" for target in sorted(set(ROLE.findall(doc)))
                        if not resolves_relative(target, path)]
    assert not missing, "docstrings name what does not exist:\n" + "\n".join(missing)


def test_dotted_names_in_docs_exist():
    missing = []
    for path in [*doc_files(), ROOT / "pyproject.toml"]:
        missing += [f"{path.relative_to(ROOT)}: {name}" for name in sorted(names_in(path.read_text(encoding="utf-8")))
                    if not resolves(name)]
    assert not missing, "docs name what does not exist:\n" + "\n".join(missing)


#: Short names in backticks, relative to the package (```engine.jobs.tile_job```), and source paths (```layer/io.py```).
SHORT = re.compile(r"`((?:raster|layer|tiling|models|engine|search|training|compare|mpgi|cli)(?:\.[A-Za-z_]\w*)+)`")
SOURCE_PATH = re.compile(r"`([\w.-]+(?:/[\w.-]+)+\.py)`")


def test_short_names_and_source_paths_in_docs_exist():
    missing = []
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        missing += [f"{path.relative_to(ROOT)}: {name}" for name in sorted(set(SHORT.findall(text)))
                    if not re.search(r"\.(py|md|json|toml|gpkg|txt)$", name) and not resolves(f"hqrs_geo.{name}")]
        missing += [f"{path.relative_to(ROOT)}: {file}" for file in sorted(set(SOURCE_PATH.findall(text)))
                    if not any((base / file).exists() for base in (ROOT, ROOT / "hqrs_geo", ROOT / "qgis_plugin"))]
    assert not missing, "docs name modules or files that do not exist:\n" + "\n".join(missing)


def test_design_gives_every_module_a_home():
    """DESIGN.md's table of where each concept lives names every module of the package."""
    design = (ROOT / "DESIGN.md").read_text(encoding="utf-8")
    modules = [p.relative_to(ROOT / "hqrs_geo").as_posix() for p in (ROOT / "hqrs_geo").rglob("*.py")
               if p.name != "__init__.py"]
    missing = sorted(m for m in modules if f"`{m}`" not in design and f"`hqrs_geo/{m}`" not in design)
    assert not missing, "DESIGN.md says nowhere what these modules are for:\n" + "\n".join(missing)


def test_pyproject_entry_points_and_package_data_exist():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    for name, target in project["project"]["scripts"].items():
        module, _, attr = target.partition(":")
        assert resolves(f"{module}.{attr}"), f"[project.scripts] {name} = {target!r}: no such function"
    for package, globs in project["tool"]["setuptools"]["package-data"].items():
        folder = ROOT.joinpath(*package.split("."))
        assert folder.is_dir(), f"[tool.setuptools.package-data]: no package {package}"
        for pattern in globs:
            assert list(folder.glob(pattern)), f"[tool.setuptools.package-data] {package}: {pattern!r} matches no file"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; at most {MAX_README_LINES} (the rest: docs/)"


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    found, fenced, seen = set(), False, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            base = slug(line.lstrip("#"))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_relative_links_lead_to_files_and_headings():
    broken = []
    for path in doc_files():
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading #{anchor}")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("group", ["docs", "code"])
def test_no_internal_work_items(group):
    if group == "docs":
        texts = [(p, p.read_text(encoding="utf-8")) for p in [*doc_files(), ROOT / "metadata.txt"]]
    else:
        texts = [(p, d) for p in code_files() for d in docstrings(p)]
    found = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p, text in texts for m in WORK_ITEM.finditer(text)]
    assert not found, "internal work items named where users read:\n" + "\n".join(found)


# -- the command line's option reference in docs/cli.md ---------------------------------------
CLI_DOC = ROOT / "docs" / "cli.md"
CLI_MARKER = "## Every command's options"
REGENERATE = "python tests/test_docs.py --write-cli-reference"


def _row(action: argparse.Action, command: str) -> str:
    flags = ", ".join(f"`{o}`" for o in action.option_strings)
    if isinstance(action.metavar, str) and action.nargs != 0:
        flags += f" `{action.metavar}`"
    elif action.choices and action.nargs != 0:
        flags += " `{" + ",".join(map(str, action.choices)) + "}`"
    text = action.help or ""
    try:
        text = text % {"default": action.default, "prog": command}
    except (KeyError, TypeError, ValueError):
        pass
    return "| {} | {} |".format(flags, text.replace("|", "\\|").replace("\n", " "))


def _group_key(group: argparse._ArgumentGroup) -> tuple:
    return group.title, tuple(o for a in group._group_actions for o in a.option_strings)


def cli_reference() -> str:
    """The option reference of every ``hqrs-geo`` command, from the parser itself (markdown)."""
    from hqrs_geo.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    summary = {c.dest: c.help or "" for c in sub._choices_actions}
    commands = sub.choices
    uses = collections.Counter(_group_key(g) for sp in commands.values() for g in sp._action_groups[2:])
    shared = {key for key, count in uses.items() if count >= 2}
    names: dict[tuple, str] = {}
    for sp_name, sp in commands.items():
        for g in sp._action_groups[2:]:
            key = _group_key(g)
            if key in shared and key not in names:
                title = g.title.split(" (")[0]
                names[key] = title if title not in names.values() else f"{title} ({sp_name})"
    out = [CLI_MARKER, "",
           f"Generated from the parser (`hqrs-geo COMMAND --help` says the same) by `{REGENERATE}`;",
           "`tests/test_docs.py` checks it is current. Groups of options that several commands share are",
           "listed once, at the end.", ""]
    for name, sp in commands.items():
        out += [f"### `{name}`", ""]
        if summary.get(name):
            out += [summary[name][0].upper() + summary[name][1:] + ".", ""]
        positional = [a for a in sp._actions if not a.option_strings]
        if positional:
            out += ["Arguments: " + "; ".join(f"`{a.metavar or a.dest.upper()}`" + (f": {a.help}" if a.help else "")
                                              for a in positional) + ".", ""]
        own, refs = [], []
        for g in sp._action_groups[1:]:
            actions = [a for a in g._group_actions if a.option_strings and "--help" not in a.option_strings]
            if not actions:
                continue
            if _group_key(g) in shared:
                refs.append(names[_group_key(g)])
            else:
                own += ([] if g.title == "options" else [f"| *{g.title.split(' (')[0]}* | |"])
                own += [_row(a, name) for a in actions]
        if own:
            out += ["| option | meaning |", "|---|---|", *own, ""]
        if refs:
            out += ["Shared groups: " + ", ".join(f"[{r}](#{slug('Shared: ' + r)})" for r in refs) + ".", ""]
    for key in sorted(shared, key=lambda k: names[k]):
        users = [n for n, sp in commands.items() if any(_group_key(g) == key for g in sp._action_groups[2:])]
        group = next(g for sp in commands.values() for g in sp._action_groups[2:] if _group_key(g) == key)
        out += [f"### Shared: {names[key]}", "",
                group.title[0].upper() + group.title[1:] + "; used by " + ", ".join(f"`{u}`" for u in users) + ".", "",
                "| option | meaning |", "|---|---|", *[_row(a, users[0]) for a in group._group_actions], ""]
    return "\n".join(out).rstrip("\n") + "\n"


def test_cli_reference_is_current():
    text = CLI_DOC.read_text(encoding="utf-8")
    assert CLI_MARKER in text, f"{CLI_DOC.relative_to(ROOT)}: no section {CLI_MARKER!r}; run {REGENERATE}"
    assert text[text.index(CLI_MARKER):] == cli_reference(), \
        f"{CLI_DOC.relative_to(ROOT)}: the option reference differs from the parser's; run {REGENERATE}"


if __name__ == "__main__" and sys.argv[1:] == ["--write-cli-reference"]:
    current = CLI_DOC.read_text(encoding="utf-8")
    head = current[:current.index(CLI_MARKER)] if CLI_MARKER in current else current.rstrip("\n") + "\n\n"
    CLI_DOC.write_text(head + cli_reference(), encoding="utf-8")
