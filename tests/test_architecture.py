"""The package's imports point one way (ARCHITECTURE.md).

Read from the source with :mod:`ast`, without importing anything:

* the graph of imports between the package's modules has no cycle;
* each module imports only from its own layer or the layers below it
  (:data:`LAYERS`, bottom first);
* no import of a package module sits inside a function, but of the modules that
  load a framework (PyTorch, JAX) when imported, which load lazily on purpose.

The check also runs on its own: ``python tests/test_architecture.py`` prints the
layers and any violation.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / "tensormoe"

#: The package's layers, bottom first: a module may import from its own layer and the layers below.
#: A name stands for the module and, where it is a folder, everything in it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves: the version, old module paths, what an array is, the backend flag, argument checks",
     ("_version", "_compat", "_array", "backend", "validation")),
    ("framework code where frameworks differ", ("frameworks",)),
    ("the factorized network: formats, lowering, contraction", ("network",)),
    ("routing: gates, routers, losses", ("routing",)),
    ("the functional layer", ("layers",)),
    ("tools over layers: weights, accounting, ranks, analysis, plots, the command line; parallel layouts",
     ("tools", "distributed")),
    ("framework shells: PyTorch modules, JAX pytrees, their parallel training", ("torch", "jax", "distributed.torch",
                                                                                "distributed.jax")),
    ("python -m tensormoe", ("__main__",)),
]

#: Third-party modules whose import loads a framework; a package module importing one at its top loads lazily.
FRAMEWORKS = ("torch", "jax", "jaxlib")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[str]:
    """The package modules an import statement loads (each target and its parent packages but the root)."""
    if isinstance(node, ast.Import):
        bases = [alias.name for alias in node.names]
        targets = [b for b in bases if b.split(".")[0] == PACKAGE_DIR.name]
    else:
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base.split(".")[0] != PACKAGE_DIR.name:
            return []
        folder = PACKAGE_DIR.parent.joinpath(*base.split("."))
        submodules = [a.name for a in node.names if f"{base}.{a.name}" in known or any(folder.glob(f"{a.name}.*"))]
        targets = [f"{base}.{name}" for name in submodules if f"{base}.{name}" in known]
        if len(submodules) < len(node.names):  # a name defined in the module ``base`` itself
            targets.append(base)
    loaded = set()
    for target in targets:
        parts = target.split(".")
        loaded.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    # Python initialises a module's own packages before the module: no edge back to them, unless a name
    # defined in one is imported (``from . import NAME`` above keeps ``base`` for that case).
    ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return sorted((loaded - ancestors | set(targets)) & known)


def _imports(tree: ast.Module, *, inside_functions: bool) -> list[ast.Import | ast.ImportFrom]:
    """Import statements at module level (``inside_functions=False``; not under ``if TYPE_CHECKING``) or in functions."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function == inside_functions:
                found.append(child)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]], set[str]]:
    """Module-level edges, function-level edges, and the modules that import a framework at their top."""
    trees = _modules()
    known = set(trees)
    packages = {_module_name(p) for p in PACKAGE_DIR.rglob("__init__.py")}
    top, lazy, framework_modules = {}, {}, set()
    for name, tree in trees.items():
        for edges, inside in ((top, False), (lazy, True)):
            edges[name] = {
                t for node in _imports(tree, inside_functions=inside)
                for t in _resolve(name, name in packages, node, known) if t != name
            }
        for node in _imports(tree, inside_functions=False):
            roots = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if (isinstance(node, ast.Import) or not node.level) and any(r.split(".")[0] in FRAMEWORKS for r in roots):
                framework_modules.add(name)
    return top, lazy, framework_modules


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of a package module (the longest name that holds it); ``None`` if none does."""
    rel = module.split(".", 1)[1] if "." in module else ""
    best, found = -1, None
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if (rel == name or rel.startswith(name + ".")) and len(name) > best:
                best, found = len(name), index
    return found


def violations() -> list[str]:
    top, lazy, framework_modules = graph()
    import tensormoe

    compat = {f"tensormoe.{name}" for name in tensormoe.COMPAT_MODULES}
    found = []
    if cycle := _find_cycle(top):
        found.append("import cycle: " + " -> ".join(cycle))
    for module, targets in sorted(top.items()):
        here = layer_of(module)
        if module == "tensormoe" or module in compat:
            continue
        if here is None:
            found.append(f"{module} is in no layer of tests/test_architecture.LAYERS (nor a compatibility module)")
            continue
        for target in sorted(targets):
            there = layer_of(target)
            if target in compat or target == "tensormoe":
                found.append(f"{module} imports {target}, which only re-exports: import from the new home")
            elif there is not None and there > here:
                found.append(f"{module} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]}), a layer above")
    for module, targets in sorted(lazy.items()):
        for target in sorted(targets - framework_modules):
            found.append(f"{module} imports {target} inside a function; only modules that load a framework "
                         "(PyTorch, JAX) load lazily")
    return found


def test_imports_point_one_way():
    found = violations()
    assert not found, "\n".join(found)


def test_every_module_is_in_a_layer_or_compat():
    """The layer table names only folders and modules that exist, so a renamed folder cannot escape the check."""
    for _, members in LAYERS:
        for member in members:
            path = PACKAGE_DIR.joinpath(*member.split("."))
            assert path.is_dir() or path.with_suffix(".py").is_file(), (
                f"tests/test_architecture.LAYERS names {member!r}, not in tensormoe/")


@pytest.mark.parametrize("source, expected", [
    ("from .a import b\n", ["tensormoe.x.a"]),
    ("from .. import backend\n", ["tensormoe.backend"]),
    ("import tensormoe.x.a\n", ["tensormoe.x.a"]),
    ("from . import a\n", ["tensormoe.x.a"]),
])
def test_resolve_reads_relative_imports(source, expected):
    """The resolver the graph rests on: ``from .a`` in tensormoe/x/m.py is tensormoe.x.a (and the package)."""
    known = {"tensormoe.x", "tensormoe.x.a", "tensormoe.backend"}
    node = ast.parse(source).body[0]
    got = _resolve("tensormoe.x.m", False, node, known)
    assert set(expected) <= set(got) and set(got) <= {"tensormoe.x", *expected}


def test_a_cycle_is_found():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("old", sorted(__import__("tensormoe").COMPAT_MODULES))
def test_old_module_paths_still_import(old):
    """``import tensormoe.<old>`` works with no file at the old path, and gives the objects of the new homes."""
    import importlib

    import tensormoe

    assert not (PACKAGE_DIR / f"{old}.py").exists(), f"tensormoe/{old}.py: an old path needs no file (see _compat.py)"
    module = importlib.import_module(f"tensormoe.{old}")
    assert module is getattr(tensormoe, old)
    homes = [importlib.import_module(f"tensormoe.{home}") for home in tensormoe.COMPAT_MODULES[old]]
    names = {name for home in homes for name in getattr(home, "__all__", ())}
    assert names and names <= set(module.__all__)
    for name in names:
        owner = next(home for home in homes if hasattr(home, name))
        assert getattr(module, name) is getattr(owner, name), name
    with pytest.raises(AttributeError, match="no attribute"):
        module.no_such_name  # noqa: B018


def test_old_paths_of_renamed_names():
    from tensormoe._array import backend_of
    from tensormoe.layer import MMoE, convert_params
    from tensormoe.ops import ops_for_array

    import tensormoe

    assert ops_for_array is backend_of and MMoE is tensormoe.MMoE and convert_params is tensormoe.convert_params


if __name__ == "__main__":
    for i, (what, names) in enumerate(LAYERS):
        print(i, what, names)
    problems = violations()
    print("\n".join(problems) or "imports point one way")
    sys.exit(bool(problems))
