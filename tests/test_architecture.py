"""The import graph of ``hqrs_geo`` (read with :mod:`ast`, nothing imported): no import circle, no upward
import in the package order, and function-local imports only for heavy optional dependencies.

The package order, bottom to top (a module imports only from its own package or packages below it)::

    base (errors, _version, atomic, safe_paths, redact, progress) < raster < layer < tiling < models < engine
    < search < evaluation < training < compare < mpgi < api < cli < the package root (__init__, __main__)

Every import counts: at the top of a module, inside functions and under ``if TYPE_CHECKING:``.
A function-local import is allowed only for a heavy optional dependency (``HEAVY``) or for a module of
the package that imports one at its top (directly or through other modules' top-level imports).
"""
from __future__ import annotations

import ast
import collections
import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "hqrs_geo"

ORDER = ("base", "raster", "layer", "tiling", "models", "engine", "search", "evaluation", "training", "compare",
         "mpgi", "api", "cli", "root")
BASE_MODULES = frozenset({"errors", "_version", "atomic", "safe_paths", "redact", "progress"})
# Heavy optional dependencies: slow to import (torch: about 1 GB of memory) or not in the base install.
HEAVY = frozenset({"torch", "torchvision", "open_clip", "ray", "faiss", "transformers", "llama_cpp",
                   "pycocoevalcap", "safetensors", "huggingface_hub", "lancedb", "duckdb",
                   # optional, not in the base dependencies: STAC catalogs, GGUF files, and the Hugging Face
                   # hub client's HTTP libraries (either may be missing)
                   "pystac", "gguf", "requests", "httpx"})
LOCAL_IMPORT_LIMIT = 80


@dataclass(frozen=True)
class Import:
    """One imported name of one import statement."""

    module: str       # the importing module, dotted
    file: str         # its path relative to the folder that holds the package
    line: int
    target: str       # internal: the imported module (dotted); external: the top-level package
    statement: int    # id of the statement (one statement may import several names)
    local: bool       # inside a function
    type_only: bool   # under ``if TYPE_CHECKING:``

    @property
    def internal(self) -> bool:
        """Whether the target is a module of the analysed package."""
        return self.target == self.root or self.target.startswith(self.root + ".")

    @property
    def root(self) -> str:
        """The analysed package's name."""
        return self.module.split(".")[0]

    def where(self) -> str:
        """``file:line``."""
        return f"{self.file}:{self.line}"


def find_modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under *package_dir*."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.with_suffix("").relative_to(package_dir.parent).parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _internal_target(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of *name* that is a module of the package."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _targets(module: str, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    root = module.split(".")[0]
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if modules[module].name != "__init__.py":
                package = package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        if base != root and not base.startswith(root + "."):
            names = [base]
        else:
            # ``from pkg import name``: the submodule pkg.name when there is one, else pkg itself
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    out = []
    for name in names:
        if name == root or name.startswith(root + "."):
            out.append(_internal_target(name, modules))
        else:
            out.append(name.split(".")[0])
    return list(dict.fromkeys(out))


def collect_imports(modules: dict[str, Path]) -> list[Import]:
    """Every import of every module, with where it is and whether it runs inside a function."""
    found: list[Import] = []

    def visit(module: str, file: str, node: ast.AST, local: bool, type_only: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _targets(module, node, modules):
                found.append(Import(module, file, node.lineno, target, id(node), local, type_only))
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            local = True
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.body:
                visit(module, file, statement, local, True)
            for statement in node.orelse:
                visit(module, file, statement, local, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(module, file, child, local, type_only)

    for module, path in modules.items():
        root = path.parents[len(module.split(".")) - (0 if path.name == "__init__.py" else 1)]
        file = path.relative_to(root).as_posix()
        visit(module, file, ast.parse(path.read_text(encoding="utf-8"), str(path)), False, False)
    return found


def layer_of(module: str, modules: dict[str, Path]) -> str | None:
    """The place of *module* in ``ORDER`` (None: not placed)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "root"
    if modules.get(module, Path()).name == "__init__.py" or len(parts) > 2:
        return parts[1] if parts[1] in ORDER else None
    if parts[1] in BASE_MODULES:
        return "base"
    return parts[1] if parts[1] in ("api", "evaluation") else None


def import_cycles(imports: Iterable[Import]) -> list[list[str]]:
    """The strongly connected components (Tarjan) of more than one module in the import graph."""
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for imp in imports:
        if imp.internal and imp.target != imp.module:
            edges[imp.module].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(start: str) -> None:
        # iterative Tarjan: (node, iterator over its successors)
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(edges[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))

    for node in sorted(set(edges) | {t for targets in edges.values() for t in targets}):
        if node not in index:
            connect(node)
    return sorted(components)


def heavy_modules(imports: Iterable[Import], modules: dict[str, Path]) -> dict[str, str]:
    """Modules that load a heavy dependency when imported -> the dependency or module that makes them heavy.

    Only imports that run at import time count (top of the module, not under ``TYPE_CHECKING``);
    importing a submodule runs its package's ``__init__`` too (the package root excepted: it is lazy).
    """
    runtime = [imp for imp in imports if not imp.local and not imp.type_only]
    heavy: dict[str, str] = {}
    for imp in runtime:
        if not imp.internal and imp.target in HEAVY:
            heavy.setdefault(imp.module, imp.target)
    changed = True
    while changed:
        changed = False
        for imp in runtime:
            if imp.module not in heavy and imp.internal and imp.target in heavy:
                heavy[imp.module] = imp.target
                changed = True
        for module in modules:
            parent = module.rsplit(".", 1)[0]
            if module not in heavy and "." in parent and parent in heavy:
                heavy[module] = parent
                changed = True
    return heavy


def upward_imports(imports: Iterable[Import], modules: dict[str, Path]) -> list[str]:
    """One line per import of a module placed higher in ``ORDER`` than the importer."""
    problems = []
    for imp in imports:
        if not imp.internal:
            continue
        here, there = layer_of(imp.module, modules), layer_of(imp.target, modules)
        if here is not None and there is not None and ORDER.index(there) > ORDER.index(here):
            problems.append(f"{imp.where()}: {imp.module} ({here}) imports {imp.target} ({there}, above it)")
    return problems


def bad_local_imports(imports: Iterable[Import], modules: dict[str, Path]) -> list[str]:
    """One line per function-local import that is neither of a heavy dependency nor of a heavy module."""
    imports = list(imports)
    heavy = heavy_modules(imports, modules)
    problems = []
    for imp in imports:
        if not imp.local:
            continue
        if imp.internal and imp.target not in heavy:
            problems.append(f"{imp.where()}: {imp.module} imports {imp.target} inside a function; "
                            f"it loads no heavy dependency: import it at the top")
        elif not imp.internal and imp.target not in HEAVY:
            problems.append(f"{imp.where()}: {imp.module} imports {imp.target} inside a function; "
                            f"{imp.target} is not a heavy optional dependency: import it at the top")
    return problems


def local_statement_count(imports: Iterable[Import]) -> int:
    """The number of function-local import statements."""
    return len({(imp.module, imp.statement) for imp in imports if imp.local})


@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Import]]:
    modules = find_modules(PACKAGE_DIR)
    return modules, collect_imports(modules)


def _cycle_report(cycle: list[str], imports: list[Import]) -> str:
    members = set(cycle)
    lines = [f"import circle: {' <-> '.join(cycle)}"]
    for imp in imports:
        if imp.module in members and imp.target in members and imp.target != imp.module:
            lines.append(f"    {imp.where()}: {imp.module} -> {imp.target}")
    return "\n".join(dict.fromkeys(lines))


def test_the_graph_is_read(graph):
    """The reader finds the modules and their imports (guards the checks below against passing on nothing)."""
    modules, imports = graph
    assert len(modules) > 50
    assert any(imp.module == "hqrs_geo.__main__" and imp.target == "hqrs_geo.cli" for imp in imports)
    assert any(imp.local for imp in imports)


def test_every_module_has_a_place_in_the_order(graph):
    modules, _ = graph
    unplaced = [module for module in modules if layer_of(module, modules) is None]
    assert not unplaced, f"modules outside the package order {ORDER}: {unplaced}"


def test_no_import_circle(graph):
    _, imports = graph
    cycles = import_cycles(imports)
    assert not cycles, "\n" + "\n".join(_cycle_report(cycle, imports) for cycle in cycles)


def test_no_upward_import(graph):
    modules, imports = graph
    problems = upward_imports(imports, modules)
    assert not problems, f"{len(problems)} upward imports:\n" + "\n".join(problems)


def test_only_the_cli_and_the_package_root_import_the_public_api(graph):
    modules, imports = graph
    problems = [f"{imp.where()}: {imp.module} imports hqrs_geo.api" for imp in imports
                if imp.target == "hqrs_geo.api" and layer_of(imp.module, modules) not in ("cli", "root")]
    assert not problems, "\n".join(problems)


def test_few_function_local_imports(graph):
    _, imports = graph
    count = local_statement_count(imports)
    by_module = collections.Counter(imp.module for imp in {(i.module, i.statement): i for i in imports
                                                           if i.local}.values())
    assert count < LOCAL_IMPORT_LIMIT, (f"{count} function-local import statements (fewer than {LOCAL_IMPORT_LIMIT} "
                                        f"wanted); most: {by_module.most_common(12)}")


def test_function_local_imports_are_of_heavy_dependencies(graph):
    modules, imports = graph
    problems = bad_local_imports(imports, modules)
    assert not problems, f"{len(problems)} function-local imports of light modules:\n" + "\n".join(problems)


def test_public_names_resolve():
    """Every name in ``hqrs_geo.__all__`` and in its lazy table resolves to an object."""
    import hqrs_geo

    lazy = hqrs_geo._LAZY
    missing = [name for name in lazy if name not in hqrs_geo.__all__]
    assert not missing, f"lazy names left out of __all__: {missing}"
    assert len(set(hqrs_geo.__all__)) == len(hqrs_geo.__all__)
    for name in hqrs_geo.__all__:
        assert getattr(hqrs_geo, name) is not None, name
    for name, module in lazy.items():
        assert getattr(importlib.import_module(module, "hqrs_geo"), name) is getattr(hqrs_geo, name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        getattr(hqrs_geo, "not_a_name")


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return find_modules(root / "hqrs_geo")


def test_the_checks_find_circles_upward_and_light_local_imports(tmp_path):
    """On a small made-up package the checks report each kind of problem, with its file and line."""
    modules = _write(tmp_path, {
        "hqrs_geo/__init__.py": "",
        "hqrs_geo/errors.py": "import json\n",
        "hqrs_geo/raster/__init__.py": "",
        "hqrs_geo/raster/a.py": "from . import b\n",
        "hqrs_geo/raster/b.py": "def f():\n    from .a import x\n    import numpy\n",
        "hqrs_geo/models/__init__.py": "",
        "hqrs_geo/models/net.py": "import torch\n",
        "hqrs_geo/models/uses.py": "from .net import Net\n",
        "hqrs_geo/layer/__init__.py": "",
        "hqrs_geo/layer/io.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..tiling import t\n"
                                 "def g():\n    import torch\n    from ..models import uses\n"
                                 "    from hqrs_geo import api\n"),
        "hqrs_geo/tiling/__init__.py": "",
        "hqrs_geo/tiling/t.py": "",
        "hqrs_geo/api.py": "",
        "hqrs_geo/oddity.py": "",
    })
    imports = collect_imports(modules)
    assert import_cycles(imports) == [["hqrs_geo.raster.a", "hqrs_geo.raster.b"]]
    assert heavy_modules(imports, modules) == {"hqrs_geo.models.net": "torch",
                                               "hqrs_geo.models.uses": "hqrs_geo.models.net"}
    upward = sorted(upward_imports(imports, modules))
    assert [line.split(":")[:2] for line in upward] == [["hqrs_geo/layer/io.py", "3"], ["hqrs_geo/layer/io.py", "6"],
                                                       ["hqrs_geo/layer/io.py", "7"]]
    bad = bad_local_imports(imports, modules)
    assert sorted(line.split(" imports ")[0] for line in bad) == [
        "hqrs_geo/layer/io.py:7: hqrs_geo.layer.io",
        "hqrs_geo/raster/b.py:2: hqrs_geo.raster.b", "hqrs_geo/raster/b.py:3: hqrs_geo.raster.b"]
    assert local_statement_count(imports) == 5
    assert layer_of("hqrs_geo.oddity", modules) is None
    assert layer_of("hqrs_geo.errors", modules) == "base"
    assert layer_of("hqrs_geo", modules) == "root"
