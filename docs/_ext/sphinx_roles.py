"""Griffe extension: render numpydoc's Sphinx roles as links on the API site.

Docstrings in tensormoe follow the numpydoc convention and refer to other
objects with Sphinx roles (``:class:`MMoE```, ``:meth:`MMoE.apply```,
``:func:`get_plan```).  mkdocstrings does not know these roles; this extension
rewrites each one, before the docstring is rendered, into a Markdown
cross-reference to the fully qualified name (``[MMoE][tensormoe.layers.mmoe.MMoE]``),
resolved in the scope of the object that carries the docstring, exactly as
Python would resolve the name there.

* A name that resolves inside the package becomes a link; autorefs then checks
  that its target is documented (``mkdocs build --strict`` fails otherwise).
* A name that resolves outside the package (``opt_einsum.contract_path``)
  becomes plain code: the site loads no external inventories.
* A name that does not resolve at all is reported as a warning (which fails a
  strict build) and rendered as code.
* ``~name`` shows only the last component, as in Sphinx; an RST literal-block
  marker ``::`` at the end of a line becomes ``:``.

Loaded by ``mkdocs.yml`` (mkdocstrings' ``extensions`` option); not part of the
package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|attr|mod|data|exc|obj|const):`(?P<target>[^`]+)`")
_LITERAL_BLOCK = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _resolve(obj: griffe.Object, dotted: str) -> str | None:
    """Fully qualified name of ``dotted`` as seen from ``obj``'s scope, or None."""
    head, _, rest = dotted.partition(".")
    for scope in (obj, obj.parent):
        if scope is None:
            continue
        try:
            base = scope.resolve(head)
        except griffe.NameResolutionError:
            continue
        return f"{base}.{rest}" if rest else base
    package = obj.package.name
    if head == package:
        return dotted
    return None


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of a package into autorefs links."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite the docstrings of a package once it is loaded (griffe >= 1.14)."""
        for obj in self._walk(pkg, set()):
            if obj.docstring is not None:
                obj.docstring.value = self._rewrite(obj, obj.docstring.value)

    # The same event under its older name; rewriting twice changes nothing.
    on_package_loaded = on_package

    def _walk(self, obj: griffe.Object, seen: set[str]):
        if obj.path in seen:
            return
        seen.add(obj.path)
        yield obj
        for member in obj.members.values():
            if not member.is_alias:
                yield from self._walk(member, seen)

    def _rewrite(self, obj: griffe.Object, text: str) -> str:
        package = obj.package.name

        def link(match: re.Match) -> str:
            target = match.group("target").strip()
            short = target.startswith("~")
            target = target.lstrip("~").removesuffix("()")
            shown = target.rsplit(".", 1)[-1] if short else target
            full = _resolve(obj, target)
            if full is None:
                griffe.logger.warning(f"{obj.relative_filepath}: {obj.path}: cannot resolve {match.group(0)}")
                return f"`{shown}`"
            if full == package or full.startswith(package + "."):
                return f"[`{shown}`][{full}]"
            return f"`{shown}`"

        return _LITERAL_BLOCK.sub(":", _ROLE.sub(link, text))
