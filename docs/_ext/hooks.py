"""mkdocs hooks: generated tables on the API index page, so they cannot fall behind the code.

A page containing the line ``<!-- tensormoe:modules -->`` gets, in its place, a
table of the package's public modules (first line of each module docstring);
``<!-- tensormoe:public-names -->`` becomes a table of every name in
``tensormoe.__all__``, grouped by the module that defines it, each linked to its
entry on that module's API page.  Links are autorefs, so ``mkdocs build
--strict`` fails if a module has no API page.

MathJax is served from the site itself, not from a CDN: :func:`on_files` adds
the MathJax 3 distribution that the ``django-static-mathjax`` package ships
(a ``[docs]`` requirement) under ``javascripts/mathjax/``, so formulas render
offline and ``mkdocs serve`` serves them too.

Loaded by ``hooks:`` in ``mkdocs.yml``; not part of the package.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pathlib
import pkgutil
import re
import sys
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

PACKAGE = "tensormoe"
_ROLE = re.compile(r":(?:py:)?\w+:`~?([^`]+)`")


def _package(config: Any):
    root = str(pathlib.Path(config.config_file_path).parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(PACKAGE)


def _summary(obj: Any) -> str:
    """First paragraph of the docstring, on one line, safe inside a Markdown table cell."""
    text = (inspect.getdoc(obj) or "").split("\n\n", 1)[0]
    text = _ROLE.sub(r"``\1``", " ".join(text.split()))
    return text.replace("|", "\\|")


def _public_modules(package: Any) -> list[str]:
    """Every public module below the package, in every folder, but the compatibility modules (re-exports)."""
    names = (m.name.removeprefix(f"{PACKAGE}.") for m in pkgutil.walk_packages(package.__path__, f"{PACKAGE}."))
    return sorted(n for n in names if not any(p.startswith("_") for p in n.split(".")) and n not in package.COMPAT_MODULES)


def modules_table(package: Any) -> str:
    rows = ["| module | what it holds |", "| --- | --- |"]
    for name in _public_modules(package):
        path = f"{PACKAGE}.{name}"
        try:
            summary = _summary(importlib.import_module(path))
        except ModuleNotFoundError as err:  # a framework shell whose framework is not installed here
            summary = f"(needs {err.name})"
        rows.append(f"| [`{path}`][{path}] | {summary} |")
    return "\n".join(rows)


def names_table(package: Any) -> str:
    groups: dict[str, list[str]] = {}
    for name in package.__all__:
        obj = getattr(package, name)
        if inspect.isclass(obj) or inspect.isroutine(obj):
            module, target = obj.__module__, f"{obj.__module__}.{obj.__qualname__}"
            kind = "class" if inspect.isclass(obj) else "function"
        else:
            module, target, kind = PACKAGE, f"{PACKAGE}.{name}", "constant"
        groups.setdefault(module, []).append(f"| [`{name}`][{target}] | {kind} | {_summary(obj)} |")
    parts = []
    for module in sorted(groups):
        table = "\n".join(["| name | kind | summary |", "| --- | --- | --- |", *groups[module]])
        parts.append(f"**From [`{module}`][{module}]**\n\n{table}")
    return "\n\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the table markers of a page with the generated tables."""
    if "<!-- tensormoe:" not in markdown:
        return markdown
    package = _package(config)
    markdown = markdown.replace("<!-- tensormoe:modules -->", modules_table(package))
    return markdown.replace("<!-- tensormoe:public-names -->", names_table(package))


#: Where the site serves MathJax from (``extra_javascript`` loads ``MATHJAX_URI/tex-mml-chtml.js``).
MATHJAX_URI = "javascripts/mathjax"
#: The parts of MathJax's ``es5`` folder the CommonHTML build needs: its entry point and what it loads on demand.
_MATHJAX_PARTS = ("tex-mml-chtml.js", "input", "output/chtml", "ui", "a11y", "adaptors", "sre")


def mathjax_dir() -> pathlib.Path:
    """MathJax's ``es5`` folder as shipped by the ``django-static-mathjax`` package (import name ``mathjax``)."""
    spec = importlib.util.find_spec("mathjax")
    folder = pathlib.Path(spec.origin).parent / "static" / "mathjax" / "es5" if spec and spec.origin else None
    if folder is None or not (folder / "tex-mml-chtml.js").is_file():
        raise PluginError(
            "the docs serve MathJax from the site itself and need the 'django-static-mathjax' package "
            "(pip install -e '.[docs]'); found no mathjax/static/mathjax/es5/tex-mml-chtml.js"
        )
    return folder


def on_files(files: Any, config: Any) -> Any:
    """Add MathJax's files to the site under :data:`MATHJAX_URI`."""
    root = mathjax_dir()
    for part in _MATHJAX_PARTS:
        path = root / part
        for source in sorted([path] if path.is_file() else path.rglob("*")):
            if source.is_file():
                uri = f"{MATHJAX_URI}/{source.relative_to(root).as_posix()}"
                files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files
