"""The documentation cannot rot.

* Every public name — what the API site shows: the package's ``__all__``, every
  public module's ``__all__``, and the public methods and properties of every
  public class — has a numpy-style docstring with an ``Examples`` section holding
  at least one ``>>>`` line.  pytest ``--doctest-modules`` runs those examples; the
  examples of module-level constants (attribute docstrings, which Python does not
  keep at runtime) are run here.  Internals (names outside ``__all__``, private
  modules) need none.
* Every public module, in every folder of the package, has an API page
  ``docs/api/<dotted name>.md`` rendering it with ``::: tensormoe.<dotted name>``
  and listed in the ``nav`` of ``mkdocs.yml``.  The compatibility modules at the
  paths of earlier versions (``tensormoe.COMPAT_MODULES``) only re-export: their
  names are documented at their new homes.
* The Python snippets of ``README.md`` and ``docs/**/*.md`` run, page by page, on
  the NumPy backend (see :func:`markdown_snippets` for the conventions).
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import functools
import importlib
import importlib.util
import inspect
import io
import pathlib
import pkgutil
import re
import sys
import textwrap
import types

import pytest

import tensormoe

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGE = tensormoe.__name__

#: Public modules of the package, below ``tensormoe``: every module and package, in every folder, with no
#: leading underscore in its dotted name, but the compatibility modules.
MODULES = sorted(
    name
    for name in (m.name.removeprefix(f"{PACKAGE}.") for m in pkgutil.walk_packages(tensormoe.__path__, f"{PACKAGE}."))
    if not any(part.startswith("_") for part in name.split(".")) and name not in tensormoe.COMPAT_MODULES
)

_EXAMPLES = re.compile(r"^Examples\n-{3,}\n(?P<body>.*?)(?=^\S[^\n]*\n-{3,}\n|\Z)", re.MULTILINE | re.DOTALL)
DOCTEST_FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def examples_section(doc: str | None) -> str | None:
    """The body of the numpy-style ``Examples`` section of ``doc``, if it has ``>>>`` lines."""
    if not doc:
        return None
    match = _EXAMPLES.search(inspect.cleandoc(doc))
    if match is None or ">>>" not in match.group("body"):
        return None
    return match.group("body")


def import_public_module(name: str):
    """Import ``tensormoe.<name>``, skipping when it needs a framework that is not installed."""
    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    except ModuleNotFoundError as err:
        if err.name and not err.name.startswith(PACKAGE):
            pytest.skip(f"{PACKAGE}.{name} needs {err.name!r}, which is not installed")
        raise


# --------------------------------------------------------------------------- names
def attribute_docstrings(module) -> dict[str, tuple[str, int]]:
    """Docstrings of module-level assignments (a string literal right after ``NAME = ...``), with line numbers."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body
    out = {}
    for stmt, nxt in zip(body, body[1:]):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        if (
            isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            for target in targets:
                if isinstance(target, ast.Name):
                    out[target.id] = (nxt.value.value, nxt.lineno)
    return out


def _class_members(cls):
    """Public methods and properties defined in ``cls`` itself (inherited ones are checked where defined)."""
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, (property, functools.cached_property)):
            yield name, value


def _method_doc(cls, name, value):
    doc = value.__doc__
    if doc is None:  # an override without a docstring inherits its base's, as inspect.getdoc does
        doc = inspect.getdoc(getattr(cls, name))
    return doc


def undocumented(module) -> list[str]:
    """``"path (kind): problem"`` for every public name of ``module`` without a docstring with examples."""
    names = getattr(module, "__all__", None)
    if names is None:
        return [f"{module.__name__} (module): defines no __all__ (list its public names there)"]
    offenders = []
    if not (module.__doc__ or "").strip():
        offenders.append(f"{module.__name__} (module): no module docstring")
    constants = None
    for name in names:
        path = f"{module.__name__}.{name}"
        if not hasattr(module, name):
            offenders.append(f"{path}: listed in __all__ but not defined")
            continue
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            where = f"{obj.__module__}.{obj.__qualname__}"
            kind = "class" if inspect.isclass(obj) else "function"
            own = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
            problem = _problem(own)
            if problem:
                offenders.append(f"{where} ({kind}): {problem}")
            if inspect.isclass(obj):
                for member, value in _class_members(obj):
                    kind = "property" if isinstance(value, (property, functools.cached_property)) else "method"
                    problem = _problem(_method_doc(obj, member, value))
                    if problem:
                        offenders.append(f"{where}.{member} ({kind}): {problem}")
        else:
            if constants is None:
                constants = attribute_docstrings(module)
            doc = constants.get(name, (None, 0))[0]
            problem = _problem(doc)
            if problem:
                hint = " (write it as a string literal on the line after the assignment)" if doc is None else ""
                offenders.append(f"{path} (data): {problem}{hint}")
    return sorted(set(offenders))


def _problem(doc: str | None) -> str | None:
    if not (doc or "").strip():
        return "no docstring"
    if examples_section(doc) is None:
        return "no Examples section"
    return None


def _fail_if_any(module_name: str, offenders: list[str]) -> None:
    if offenders:
        lines = "\n".join(f"  - {o}" for o in offenders)
        pytest.fail(
            f"{len(offenders)} public name(s) reachable from {module_name} need a numpy-style docstring whose "
            f"'Examples' section (a line 'Examples', a line of dashes, then >>> lines) runs as a doctest:\n{lines}",
            pytrace=False,
        )


def test_package_names_have_docstrings_with_examples():
    _fail_if_any(PACKAGE, undocumented(tensormoe))


@pytest.mark.parametrize("name", MODULES)
def test_module_names_have_docstrings_with_examples(name):
    module = import_public_module(name)
    _fail_if_any(module.__name__, undocumented(module))


def test_constant_examples_run():
    """Run the examples of exported constants' docstrings, which ``--doctest-modules`` cannot see."""
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=DOCTEST_FLAGS)
    ran, failures = [], []
    with tensormoe.backend_context("numpy"):
        for name in MODULES:
            try:
                module = importlib.import_module(f"{PACKAGE}.{name}")
            except ModuleNotFoundError as err:
                if err.name and not err.name.startswith(PACKAGE):
                    continue  # a shell whose framework is not installed
                raise
            docs = attribute_docstrings(module)
            for constant in (n for n in getattr(module, "__all__", []) if n in docs):
                text, lineno = docs[constant]
                test = parser.get_doctest(
                    inspect.cleandoc(text),
                    dict(vars(module)),
                    f"{module.__name__}.{constant}",
                    inspect.getsourcefile(module),
                    lineno,
                )
                out = io.StringIO()
                if runner.run(test, out=out.write).failed:
                    failures.append(out.getvalue())
                ran.append(test.name)
    assert ran, "no documented constants found; the attribute-docstring reader is broken"
    assert not failures, "\n".join(failures)


def test_the_checker_finds_offenders():
    """The rule above is enforced: a module with undocumented names is reported, name by name."""
    module = types.ModuleType("fake", "A module.")

    def documented():
        """Do nothing.

        Examples
        --------
        >>> documented()
        """

    def no_examples():
        """Do nothing, without examples."""

    def no_doctest():
        """Do nothing.

        Examples
        --------
        Call it.
        """

    class Thing:
        """A thing.

        Examples
        --------
        >>> Thing().size
        1
        """

        @property
        def size(self):
            return 1

        def grow(self):
            """Grow.

            Examples
            --------
            >>> Thing().grow()
            """

    for obj in (documented, no_examples, no_doctest, Thing):
        obj.__module__ = "fake"
        setattr(module, obj.__name__, obj)
    module.__all__ = ["documented", "no_examples", "no_doctest", "Thing", "missing"]
    assert undocumented(module) == [
        "fake.missing: listed in __all__ but not defined",
        f"fake.{Thing.__qualname__}.size (property): no docstring",
        f"fake.{no_doctest.__qualname__} (function): no Examples section",
        f"fake.{no_examples.__qualname__} (function): no Examples section",
    ]
    del module.__all__
    assert undocumented(module) == ["fake (module): defines no __all__ (list its public names there)"]


# --------------------------------------------------------------------------- API pages
@pytest.mark.parametrize("name", MODULES)
def test_every_public_module_has_an_api_page(name):
    page = DOCS / "api" / f"{name}.md"
    fix = (
        f"create docs/api/{name}.md containing the line '::: {PACKAGE}.{name}' and add the line "
        f"'      - {name}: api/{name}.md' under '- API reference:' in the nav of mkdocs.yml"
    )
    if not page.is_file():
        pytest.fail(f"public module {PACKAGE}.{name} has no API page; {fix}", pytrace=False)
    if not re.search(rf"^:::\s+{PACKAGE}\.{re.escape(name)}\s*$", page.read_text(), re.MULTILINE):
        pytest.fail(f"docs/api/{name}.md does not render {PACKAGE}.{name}; {fix}", pytrace=False)
    nav = (ROOT / "mkdocs.yml").read_text()
    if not re.search(rf"^\s*-\s*(?:[^:\n]+:\s*)?api/{re.escape(name)}\.md\s*$", nav, re.MULTILINE):
        pytest.fail(f"docs/api/{name}.md is not in the nav of mkdocs.yml; {fix}", pytrace=False)


# --------------------------------------------------------------------------- snippets
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
_MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<what>[^>]*?)\s*-->\s*$")


def markdown_snippets(text: str):
    """Yield ``(lang, code, lineno, marker)`` for the ```` ```python ```` and ```` ```pycon ```` blocks of a page.

    Conventions for writers of docs pages:

    * ```` ```python ```` blocks run in order, in one namespace per page (like a
      notebook), with NumPy as the default backend; ```` ```pycon ```` blocks
      (``>>>`` prompts and expected output) run as doctests in that namespace, so
      printed numbers are checked too.
    * A block that imports a module which is not installed is skipped, and so is
      every later block of the page (they may depend on it).
    * An HTML comment on the line before a block, ``<!-- docs-test: skip -->``,
      excludes it (for GPU-only or long-running snippets; say why in the text),
      ``<!-- docs-test: requires torch, jax -->`` skips it unless those modules
      are installed.
    """
    for match in _FENCE.finditer(text):
        lang = match.group("lang").lower()
        if lang not in ("python", "py", "pycon"):
            continue
        lineno = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.search(before)
        body = textwrap.dedent(match.group("body"))
        yield ("pycon" if lang == "pycon" else "python"), body, lineno, marker.group("what") if marker else None


def _imports(code: str) -> set[str]:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _installed(module: str) -> bool:
    return module in sys.modules or importlib.util.find_spec(module) is not None


#: Pages with Python blocks: the README and every page of the site.
PAGES = [p for p in sorted([ROOT / "README.md", *DOCS.rglob("*.md")]) if any(markdown_snippets(p.read_text()))]


@contextlib.contextmanager
def _numpy_default():
    """Make NumPy the process default for a page and restore the previous default afterwards."""
    previous = tensormoe.get_backend()
    tensormoe.set_backend("numpy")
    try:
        yield
    finally:
        tensormoe.set_backend(previous)


def run_page(text: str, label: str) -> tuple[list[str], list[str]]:
    """Run the blocks of one page in one namespace; return where blocks ran and which were skipped (and why)."""
    namespace = {"__name__": f"docs:{label}"}
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=DOCTEST_FLAGS)
    ran, skipped = [], []
    missing_before: set[str] = set()
    with _numpy_default():
        for lang, code, lineno, marker in markdown_snippets(text):
            where = f"{label}:{lineno}"
            if marker is not None and marker.strip() == "skip":
                skipped.append(f"{where} (marked skip)")
                continue
            needs = _imports(code if lang == "python" else _pycon_source(code))
            if marker is not None and marker.startswith("requires"):
                needs |= {m.strip() for m in marker[len("requires") :].split(",") if m.strip()}
            missing = {m for m in needs if not _installed(m)} | missing_before
            if missing:
                missing_before |= missing
                skipped.append(f"{where} (needs {', '.join(sorted(missing))})")
                continue
            if lang == "python":
                exec(compile(code, where, "exec"), namespace)  # noqa: S102
            else:
                test = parser.get_doctest(code, namespace, where, label, lineno)
                out = io.StringIO()
                result = runner.run(test, out=out.write, clear_globs=False)
                namespace.update(test.globs)  # DocTest works on a copy of the namespace
                assert not result.failed, f"{where}:\n{out.getvalue()}"
            ran.append(where)
    return ran, skipped


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_markdown_snippets_run(page):
    ran, skipped = run_page(page.read_text(), str(page.relative_to(ROOT)))
    if not ran:
        pytest.skip("every block skipped: " + "; ".join(skipped))


def test_the_snippet_runner_runs_checks_and_skips():
    page = textwrap.dedent(
        """\
        Text.

        ```python
        x = 2
        ```

        !!! note
            ```pycon
            >>> x + 1
            3
            ```

        <!-- docs-test: skip -->
        ```python
        raise AssertionError("marked skip: never runs")
        ```

        ```python
        import not_a_module_tensormoe_needs
        ```

        ```python
        raise AssertionError("after a block with a missing import: never runs")
        ```

        ```bash
        exit 1
        ```
        """
    )
    ran, skipped = run_page(page, "page.md")
    assert ran == ["page.md:3", "page.md:8"]
    assert [s.split(" ", 1)[1] for s in skipped] == [
        "(marked skip)",
        "(needs not_a_module_tensormoe_needs)",
        "(needs not_a_module_tensormoe_needs)",
    ]
    with pytest.raises(AssertionError, match="Expected:\\s+4"):
        run_page(page.replace("3\n", "4\n", 1), "page.md")
    with pytest.raises(NameError):
        run_page("```python\nundefined_name\n```\n", "page.md")


def _pycon_source(code: str) -> str:
    return "\n".join(line[4:] for line in code.splitlines() if line.startswith((">>> ", "... ")))


# --------------------------------------------------------------------------- the home page
def nav_pages() -> list[str]:
    """Every page listed in the nav of mkdocs.yml, in order."""
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:\n", 1)[1]
    return re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?([\w./-]+\.md)\s*$", nav, re.MULTILINE)


def test_the_home_page_leads_to_every_page():
    """'Where to go next' on the home page links every page of the nav but the per-module API pages."""
    home = (DOCS / "index.md").read_text().split("## Where to go next", 1)[1]
    linked = set(re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)", home))
    wanted = [p for p in nav_pages() if p != "index.md" and not (p.startswith("api/") and p != "api/index.md")]
    assert len(wanted) > 10
    assert [p for p in wanted if p not in linked] == []
