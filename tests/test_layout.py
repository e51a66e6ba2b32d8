"""The package's layout: no import cycle among kdinpaint and kdinpaint_adapters, Distiller's private members used
only in kdinpaint/attach.py, and moved modules and names importable from their old paths (with a warning) while
nothing in the repository uses those paths any more.

The import graph is read from the source with ``ast`` (every ``import`` and ``from ... import``, inside functions
too), so an import hidden in a function to break a cycle still counts as an edge.
"""

from __future__ import annotations

import ast
import importlib
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdinpaint import _moved

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kdinpaint": ROOT / "kdinpaint", "kdinpaint_adapters": ROOT / "adapters"}


# ---- the import graph ---------------------------------------------------------------------------
def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the two packages (a package is its ``__init__.py``)."""
    mods = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _known(name: str) -> str | None:
    """The longest prefix of ``name`` that is one of our modules (``kdinpaint.x.Class`` -> ``kdinpaint.x``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> Iterator[tuple[str, bool]]:
    """``(imported module, at import time)`` for every import of ours in ``module``; "at import time": not inside a
    function body (module level, class bodies, top-level ``if`` / ``try``)."""
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool) -> Iterator[tuple[str, bool]]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _known(alias.name)) is not None:
                    yield target, not in_function
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:  # `from pkg import sub` imports the submodule, `from mod import f` the module
                target = f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else _known(source)
                if target is not None:
                    yield target, not in_function
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            yield from visit(child, inner)

    yield from visit(ast.parse(path.read_text(), str(path)), False)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Two graphs over our modules: every import (design dependencies), and what runs when a module is imported:
    its imports at import time, each with the packages above the imported module (importing ``a.b.c`` runs
    ``a/__init__.py`` and ``a/b/__init__.py`` first) except the importer's own, which are already running."""
    every: dict[str, set[str]] = {m: set() for m in MODULES}
    at_import: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        own = set(_ancestors(module))
        for target, import_time in _imports(module, path):
            every[module].add(target)
            if import_time:
                at_import[module] |= {target, *(a for a in _ancestors(target) if a not in own)}
        every[module].discard(module)
        at_import[module].discard(module)
    return every, at_import


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def _path(graph: dict[str, set[str]], component: list[str]) -> str:
    """One cycle through the first module of ``component``, for the message: ``a -> b -> a``."""
    start, inside = component[0], set(component)
    trail, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[trail[-1]] if w in inside)
        if start in nxt and len(trail) > 1:
            return " -> ".join([*trail, start])
        step = next((w for w in nxt if w not in seen), None)
        if step is None:
            return " <-> ".join(component)
        trail.append(step)
        seen.add(step)


def test_the_cycle_finder_finds_cycles_through_function_imports_and_parent_packages(tmp_path, monkeypatch):
    """The checker itself, on a made-up package: an import inside a function closes a cycle (a, b); importing a
    submodule runs its package's __init__, which imports the importer back (c, sub); a module's imports of its
    siblings do not count its own package (sub.d)."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from pkg import b\n",
        "b.py": "def f():\n    from pkg.a import x\n",
        "c.py": "from pkg.sub.d import y\n",
        "sub/__init__.py": "from pkg.c import w\n",
        "sub/d.py": "from . import e\n",
        "sub/e.py": "",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "PACKAGES", {"pkg": pkg})
    monkeypatch.setattr(this, "MODULES", _modules())
    every, at_import = _graphs()
    assert every["pkg.b"] == {"pkg.a"} and at_import["pkg.b"] == set()  # inside a function: not at import time
    assert every["pkg.c"] == {"pkg.sub.d"} and at_import["pkg.c"] == {"pkg.sub.d", "pkg.sub"}
    assert at_import["pkg.sub.d"] == {"pkg.sub.e"}
    assert _cycles(every) == [["pkg.a", "pkg.b"]]
    assert _cycles(at_import) == [["pkg.c", "pkg.sub"]]
    assert _path(every, ["pkg.a", "pkg.b"]) == "pkg.a -> pkg.b -> pkg.a"


def test_no_import_cycle_among_kdinpaint_and_its_adapters():
    every, at_import = _graphs()
    assert len(MODULES) > 50 and "kdinpaint.inference.inpainter" in every["kdinpaint.evaluation.floor"]
    cycles = [_path(every, c) for c in _cycles(every)]
    assert not cycles, "import cycles (imports inside functions included): " + "; ".join(cycles)
    cycles = [_path(at_import, c) for c in _cycles(at_import)]
    assert not cycles, "import cycles when the modules are imported (parent packages included): " + "; ".join(cycles)


# ---- Distiller's private members ----------------------------------------------------------------
def _distiller_private_names() -> set[str]:
    """The private methods and attributes of ``Distiller`` (read from kdinpaint/attach.py), and the ones other
    modules used to reach for."""
    names = {"_call", "_session", "_root", "_install", "_uninstall"}
    tree = ast.parse((ROOT / "kdinpaint" / "attach.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Distiller")
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_only_attach_touches_distiller_private_members():
    names = _distiller_private_names()
    assert {"_call", "_session", "_install", "_uninstall"} <= names
    uses = []
    for folder in ("kdinpaint", "adapters", "recipes", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "kdinpaint" / "attach.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                # x._name on anything but the object's own self / cls, and getattr(x, "_name")
                if (isinstance(node, ast.Attribute) and node.attr in names
                        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                    uses.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr")
                        and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in names):
                    uses.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
    assert not uses, "Distiller's private members used outside kdinpaint/attach.py: " + ", ".join(uses)


# ---- moved modules and names --------------------------------------------------------------------
@pytest.mark.parametrize("old, new", sorted(_moved.MOVED.items()))
def test_a_moved_module_imports_from_its_old_path_with_a_warning(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)  # imported by an earlier test: import it afresh
    namespace: dict = {}
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old} moved to {new}")) as caught:
        exec(compile(f"import {old} as module", "old_import.py", "exec"), namespace)
    assert caught[0].filename == "old_import.py"  # the warning points at the import statement
    assert namespace["module"] is importlib.import_module(new) and namespace["module"].__spec__.name == new


MOVED_NAMES = sorted((module, name, new) for module, names in _moved.MOVED_NAMES.items() for name, new in names.items())


@pytest.mark.parametrize("module, name, new", MOVED_NAMES)
def test_a_moved_name_imports_from_its_old_module_with_a_warning(module, name, new):
    with pytest.warns(DeprecationWarning, match=re.escape(f"{name} moved to {new}")):
        value = getattr(importlib.import_module(module), name)
    assert value is getattr(importlib.import_module(new), name)


def test_inference_keeps_every_name_it_had_and_refuses_others():
    inference = importlib.import_module("kdinpaint.inference")
    before = ["Crop", "InferenceOutOfMemory", "NonFiniteOutput", "Inpainter", "default_device", "resolve_device",
              "pad_to_multiple", "unpad", "deployed_model", "evaluate_model", "GeneratedMasks", "generated_masks",
              "load_image", "load_mask", "save_image", "mask_to_rgb", "crop_top_left", "pad_bottom_right", "MemoryModel"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # these never left: no warning
        assert all(getattr(inference, name) is not None for name in before)
    assert set(inference.__all__) == set(before)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        inference.nope  # noqa: B018
    with pytest.raises(ImportError):
        exec("from kdinpaint.evaluation.metrics import nope", {})


def _fallbacks(tree: ast.AST) -> set[int]:
    """``id`` of every node inside an ``except ImportError`` (or ``ModuleNotFoundError``) handler: an old path
    imported there runs only where the new one is missing (a script run against an older checkout)."""
    inside: set[int] = set()
    for handler in ast.walk(tree):
        if isinstance(handler, ast.ExceptHandler) and handler.type is not None:
            types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            if any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError") for t in types):
                inside |= {id(n) for stmt in handler.body for n in ast.walk(stmt)}
    return inside


def _old_imports(path: Path) -> Iterator[str]:
    """Imports of a moved module, or of a moved name from the module it left, in a Python file (fallbacks in an
    ``except ImportError`` handler aside)."""
    moved_names = {(m, n) for m, names in _moved.MOVED_NAMES.items() for n in names}
    tree = ast.parse(path.read_text(), str(path))
    fallbacks = _fallbacks(tree)
    for node in ast.walk(tree):
        if id(node) in fallbacks:
            continue
        if isinstance(node, ast.Import):
            yield from (f"{node.lineno}: import {a.name}" for a in node.names if _known_old(a.name))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if _known_old(node.module) or full in _moved.MOVED or (node.module, alias.name) in moved_names:
                    yield f"{node.lineno}: from {node.module} import {alias.name}"
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
                and node.args and isinstance(node.args[0], ast.Constant) and _known_old(str(node.args[0].value))):
            yield f"{node.lineno}: import_module({node.args[0].value!r})"


def _known_old(name: str) -> bool:
    return any(name == old or name.startswith(old + ".") for old in _moved.MOVED)


def test_nothing_in_the_repository_imports_an_old_path():
    this = Path(__file__).resolve()
    found = []
    for folder in ("kdinpaint", "adapters", "recipes", "examples", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() != this:
                found += [f"{path.relative_to(ROOT)}:{hit}" for hit in _old_imports(path)]
    pattern = re.compile(r"^\s*(from|import)\s+(" + "|".join(map(re.escape, _moved.MOVED)) + r")\b", re.M)
    for doc in (ROOT / "README.md", ROOT / "recipes" / "decisions.md"):
        found += [f"{doc.relative_to(ROOT)}: {m.group(0).strip()}" for m in pattern.finditer(doc.read_text())]
    assert not found, "old import paths (they warn; import the new module): " + ", ".join(found)
