"""The module paths of earlier versions, kept working without a file each.

``import tensormoe.layer`` (or ``from tensormoe.gates import entmax15``) gives a
module whose every attribute is read from the module that holds the code now
(:data:`COMPAT_MODULES`); nothing inside the package imports these paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

PACKAGE = __name__.rpartition(".")[0]

#: Old module path (below the package) -> the modules that hold its names now, searched in order.
COMPAT_MODULES: dict[str, tuple[str, ...]] = {
    "accounting": ("layers.accounting",),
    "analysis": ("tools.analysis",),
    "cli": ("tools.cli",),
    "compress": ("tools.compress",),
    "contraction": ("network.contraction",),
    "factorizations": ("network.factorizations",),
    "gates": ("routing.gates",),
    "io": ("tools.io",),
    "layer": ("layers.mmoe", "layers.params", "layers"),
    "lowering": ("network.lowering",),
    "numerics": ("tools.numerics",),
    "ops": ("frameworks", "frameworks.base"),
    "plots": ("tools.plots",),
    "ranks": ("tools.ranks",),
    "routers": ("routing.routers", "routing"),
}

#: Names an old module had under another name: old path -> {old name: (module, name)}.
RENAMED: dict[str, dict[str, tuple[str, str]]] = {"ops": {"ops_for_array": ("_array", "backend_of")}}


class CompatModule(types.ModuleType):
    """An old module path: each attribute is read from its new home."""

    def __init__(self, name: str, old: str) -> None:
        homes = COMPAT_MODULES[old]
        super().__init__(name, f"Compatibility path: :mod:`{PACKAGE}.{homes[0]}` holds this code.")
        self._old = old
        self._homes = [importlib.import_module(f"{PACKAGE}.{home}") for home in homes]
        self.__all__ = sorted({n for home in self._homes for n in getattr(home, "__all__", ())}
                              | set(RENAMED.get(old, {})))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in RENAMED.get(self._old, {}):
            module, new = RENAMED[self._old][name]
            return getattr(importlib.import_module(f"{PACKAGE}.{module}"), new)
        for home in self._homes:
            if hasattr(home, name):
                return getattr(home, name)
        raise AttributeError(f"module {self.__name__!r} (now {self._homes[0].__name__!r}) has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *self.__all__})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module paths (first: a stale file at an old path, e.g. from an older install, never wins)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        package, _, old = fullname.rpartition(".")
        if package == PACKAGE and old in COMPAT_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return CompatModule(spec.name, spec.name.rpartition(".")[2])

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run: the module reads its names from their new homes."""


def install() -> None:
    """Let the old module paths be imported (once per process)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
