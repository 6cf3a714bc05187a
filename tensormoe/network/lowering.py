"""Contraction paths lowered to matrix products: the code a hand-written forward would run.

opt_einsum chooses *which* pairs to contract; how each pair is then executed
decides the time.  A generic pairwise contraction (``tensordot``) transposes
its operands into a standard layout, copying parameter tensors on every call.
:func:`lower` turns a path into a :class:`Program`: per step, it groups the
indices into batch, kept-left, contracted and kept-right, orders each group
the way the operands already lie in memory, and so reaches a single
``matmul`` (or a broadcast multiply when nothing is summed) over *views* of
its operands.  A copy is made only where no ordering makes the operand a
view; ``Program.copied`` counts those elements, and :func:`candidates`
searches contraction orders (and operand roles) for programs with few FLOPs
*and* few copies.

A program runs on any backend whose arrays have ``reshape``, ``@`` and ``*``
(NumPy, PyTorch, JAX): it is plain array code, so ``jax.jit`` traces it and
``torch.autograd`` differentiates it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Sequence

__all__ = ["Program", "candidates", "lower"]

# A copied element is charged this many FLOPs when ranking programs: a strided
# copy moves memory at a few elements per nanosecond while a GEMM does tens of
# FLOPs per nanosecond per core.
COPY_COST = 16

# An element read through a transposed view (or of a transposed result) is charged this many FLOPs: nothing
# on BLAS, but XLA's CPU backend may copy a transposed operand, and between programs alike it breaks the tie
TRANSPOSE_COST = 1

# Contraction orders are enumerated exhaustively up to this many operands
# (5 operands: 180 orders, 6: 2,700).
EXHAUSTIVE_OPERANDS = 6


@dataclasses.dataclass(frozen=True)
class _Step:
    """One pairwise contraction of the lowered program (internal)."""

    i: int  # positions of the two operands in the current operand list
    j: int
    kind: str  # "matmul" | "mul" | "einsum"
    a_perm: tuple[int, ...] | None  # a permutation that makes operand i match the layout (a copy), or None
    a_shape: tuple[int, ...]  # the view shape
    a_swap: bool  # swap the last two axes of the view (a transposed view)
    b_perm: tuple[int, ...] | None
    b_shape: tuple[int, ...]
    b_swap: bool
    out_shape: tuple[int, ...]
    einsum: str = ""  # the step's equation, for kind == "einsum"
    # whether the operands (after the permutation) and the product need a reshape: fixed by the shapes, so
    # decided once here rather than by comparing shapes on every call
    a_reshape: bool = True
    b_reshape: bool = True
    out_reshape: bool = True


def _einsum(backend: str) -> Any:
    if backend == "torch":
        import torch

        return torch.einsum
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.einsum
    import numpy as np

    return np.einsum


def _viewed(shape: tuple[int, ...], perm: tuple[int, ...] | None) -> tuple[int, ...]:
    return shape if perm is None else tuple(shape[p] for p in perm)


def _product_shape(kind: str, a: tuple[int, ...], a_swap: bool, b: tuple[int, ...], b_swap: bool) -> tuple[int, ...]:
    """Shape of ``a @ b`` (``a * b`` for ``kind == "mul"``) of views of shapes ``a`` and ``b`` (before swaps)."""
    if a_swap:
        a = (*a[:-2], a[-1], a[-2])
    if b_swap:
        b = (*b[:-2], b[-1], b[-2])
    if kind == "mul":
        return tuple(_broadcast(a, b))
    return (*_broadcast(a[:-2], b[:-2]), a[-2], b[-1])


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> list[int]:
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return [x if y == 1 else y for x, y in zip(a, b)]


@dataclasses.dataclass(frozen=True)
class Program:
    """A contraction path lowered to reshapes, views and matrix products.

    Attributes
    ----------
    path : tuple of tuple of int
        The pairwise contraction order (opt_einsum's format).
    flops : int
        FLOPs of the matrix products and multiplies (a multiply-add counts two).
    copied : int
        Elements the program copies per call to bring operands into a layout
        a matrix product can read (zero when every operand is used as a view).
    written : int
        Elements of the intermediate arrays the steps write.
    transposed : int
        Elements read through transposed views, and of the result when it is
        a transposed view.
    cost : float
        ``flops + COPY_COST * (copied + written) + TRANSPOSE_COST *
        transposed``: the model used to rank programs (memory traffic is
        charged, not only arithmetic).

    Examples
    --------
    >>> import numpy as np
    >>> p = lower("bi,io,on->bn", [(2, 3), (3, 4), (4, 5)], [(0, 1), (0, 1)])
    >>> p.copied
    0
    >>> x, u, v = np.ones((2, 3)), np.ones((3, 4)), np.ones((4, 5))
    >>> bool(np.allclose(p(x, u, v, backend="numpy"), x @ u @ v))
    True
    """

    path: tuple[tuple[int, ...], ...]
    flops: int
    copied: int

    written: int = 0
    transposed: int = 0
    steps: tuple[_Step, ...] = dataclasses.field(repr=False, default=())
    final_perm: tuple[int, ...] | None = dataclasses.field(repr=False, default=None)
    operands: int = dataclasses.field(repr=False, default=0)
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # the compiled functions come from exec and do not pickle; they are rebuilt on first call
        return {**self.__dict__, "_compiled": {}}

    @property
    def cost(self) -> float:
        """FLOPs plus ``COPY_COST`` per element copied or written and ``TRANSPOSE_COST`` per element read
        transposed: what programs are ranked by.

        Examples
        --------
        >>> p = lower("bi,io,on->bn", [(2, 3), (3, 4), (4, 5)], [(0, 1), (0, 1)])
        >>> p.cost == p.flops + COPY_COST * (p.copied + p.written) + TRANSPOSE_COST * p.transposed
        True
        """
        return self.flops + COPY_COST * (self.copied + self.written) + TRANSPOSE_COST * self.transposed

    def __call__(self, *operands: Any, backend: str) -> Any:
        """Run the program on ``operands`` (arrays of ``backend``: ``"numpy"``, ``"torch"`` or ``"jax"``).

        Examples
        --------
        >>> import numpy as np
        >>> lower("ij,jk->ki", [(2, 3), (3, 4)], [(0, 1)])(np.ones((2, 3)), np.ones((3, 4)), backend="numpy").shape
        (4, 2)
        """
        run = self._compiled.get(backend)
        if run is None:
            namespace = {"einsum": _einsum(backend)}
            exec(compile(self.source(backend), f"<tensormoe program {self.path}>", "exec"), namespace)  # noqa: S102
            run = self._compiled[backend] = namespace["program"]
        return run(*operands)

    def source(self, backend: str = "numpy") -> str:
        """The program as straight-line Python: what runs (compiled once per backend), as a person would write it.

        Examples
        --------
        >>> print(lower("bi,io,on->bn", [(2, 3), (3, 4), (4, 5)], [(0, 1), (1, 0)]).source())
        def program(x0, x1, x2):
            x3 = x0 @ x1
            x4 = x3 @ x2
            return x4
        >>> print(lower("bi,oi->bo", [(2, 3), (4, 3)], [(0, 1)]).source("torch"))
        def program(x0, x1):
            x2 = x0 @ x1.transpose(-1, -2)
            return x2
        """
        names = [f"x{k}" for k in range(self.operands)]
        args = ", ".join(names)
        lines = [f"def program({args}):"]
        count = len(names)

        def view(name: str, perm: Any, shape: tuple, reshape: bool, swap: bool) -> str:
            if perm is not None:
                name = f"{name}.{'permute' if backend == 'torch' else 'transpose'}({tuple(perm)!r})"
            if reshape:
                name = f"{name}.reshape({tuple(shape)!r})"
            if swap:
                name = f"{name}.{'transpose' if backend == 'torch' else 'swapaxes'}(-1, -2)"
            return name

        for step in self.steps:
            a, b = names[step.i], names[step.j]
            for k in sorted((step.i, step.j), reverse=True):
                del names[k]
            if step.kind == "einsum":
                expr = f"einsum({step.einsum!r}, {a}, {b})"
            else:
                op = "@" if step.kind == "matmul" else "*"
                expr = (f"{view(a, step.a_perm, step.a_shape, step.a_reshape, step.a_swap)} {op} "
                        f"{view(b, step.b_perm, step.b_shape, step.b_reshape, step.b_swap)}")
                if step.out_reshape:
                    expr = f"({expr}).reshape({tuple(step.out_shape)!r})"
            out = f"x{count}"
            count += 1
            lines.append(f"    {out} = {expr}")
            names.append(out)
        result = names[0]
        if self.final_perm is not None:
            result = f"{result}.{'permute' if backend == 'torch' else 'transpose'}({tuple(self.final_perm)!r})"
        lines.append(f"    return {result}")
        return "\n".join(lines)


def _size(group: Sequence[str], sizes: dict[str, int]) -> int:
    """Number of elements spanned by the indices ``group``."""
    return math.prod(sizes[c] for c in group)


def _parse(equation: str, shapes: Sequence[Sequence[int]]) -> tuple[list[str], str, dict[str, int]]:
    """The input terms, the output term and the size of every index of ``equation`` over ``shapes``."""
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    return terms, output, {c: d for t, s in zip(terms, shapes) for c, d in zip(t, s)}


def _layout(
    terms: str, shape: tuple[int, ...], groups: Sequence[Sequence[str]], sizes: dict[str, int]
) -> tuple[tuple[int, ...] | None, tuple[int, ...], bool, int]:
    """How to view an operand with indices ``terms`` as ``[*lead, rows, cols]`` given by index groups.

    ``groups`` is ``(*lead, rows, cols)``: each leading group (the batch indices,
    or free indices used as broadcast batch axes) becomes one axis, an empty group
    an axis of size one.  The operand is a view when its indices already lie as
    ``lead + rows + cols`` or ``lead + cols + rows`` (then the last two axes are
    swapped, a transposed view).  Otherwise it is permuted (copied).  Returns
    ``(perm or None, view shape, swap, copied elements)``.
    """
    *lead, rows, cols = groups
    size = functools.partial(_size, sizes=sizes)
    lead_shape = tuple(size(g) for g in lead)
    # axes of size one may sit anywhere: a reshape moves them without copying
    wide = lambda g: "".join(c for c in g if sizes[c] != 1)  # noqa: E731
    first = "".join(wide(g) for g in lead)
    if wide(terms) == first + wide(rows) + wide(cols):
        return None, lead_shape + (size(rows), size(cols)), False, 0
    if wide(terms) == first + wide(cols) + wide(rows):
        return None, lead_shape + (size(cols), size(rows)), True, 0
    perm = tuple(terms.index(c) for c in (*(c for g in lead for c in g), *rows, *cols))
    return perm, lead_shape + (size(rows), size(cols)), False, math.prod(shape)


def _ordered(letters: set[str], *orders: str) -> list[str]:
    """``letters`` in the order of their first appearance in ``orders``."""
    seen: list[str] = []
    for order in orders:
        for c in order:
            if c in letters and c not in seen:
                seen.append(c)
    return seen


def _leading_free(terms: str, batch: Sequence[str], free: set[str]) -> list[str]:
    """The free indices that lead ``terms`` right after its batch indices (candidates for broadcast axes)."""
    rest = [c for c in terms if c not in batch] if list(terms[: len(batch)]) == list(batch) else []
    out = []
    for c in rest:
        if c not in free:
            break
        out.append(c)
    return out if len(out) < len(free) else out[:-1]


def _lower_step(
    ta: str, tb: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...], keep: set[str], sizes: dict[str, int]
) -> tuple[str, str, tuple, tuple, int, int, str]:
    """Lower the contraction of terms ``ta``, ``tb`` (keeping ``keep``) to a matmul or multiply.

    A free index that leads an operand (such as the first bond of a tensor-ring
    core ``G[p, i, q]`` contracted over ``i``) may become a broadcast batch axis
    of the matrix product instead of forcing a transposed copy of that operand;
    the other operand is then repeated along it, which PyTorch materialises, so
    that repetition is charged as copied elements.

    Returns ``(kind, out_terms, a_layout, b_layout, flops, copied, einsum)``.
    """
    sa, sb = set(ta), set(tb)
    out_letters = (sa | sb) & keep
    if len(sa) != len(ta) or len(sb) != len(tb) or (sa - sb - keep) or (sb - sa - keep):
        # repeated indices or an index summed within one operand: a plain einsum step
        out = "".join(_ordered(out_letters, ta, tb))
        flops = 2 * math.prod(sizes[c] for c in sa | sb)
        return "einsum", out, (), (), flops, 0, f"{ta},{tb}->{out}"
    shared = sa & sb
    contracted = shared - keep
    size = functools.partial(_size, sizes=sizes)
    best = None
    # the shared groups must have one order in both operands: try each operand's order
    for first in (ta, tb):
        batch = _ordered(shared & keep, first)
        cols = _ordered(contracted, first)
        left = _ordered(sa - sb, ta)
        right = _ordered(sb - sa, tb)
        options = [([], [])]
        if contracted:
            outer_a, outer_b = _leading_free(ta, batch, sa - sb), _leading_free(tb, batch, sb - sa)
            options += [(outer_a, []), ([], outer_b), (outer_a, outer_b)]
        for oa, ob in options:
            if (oa, ob) != ([], []) and not (oa or ob):
                continue
            la_rows = [c for c in left if c not in oa]
            lb_cols = [c for c in right if c not in ob]
            lead_a = [batch] if batch else []
            lead_b = [batch] if batch else []
            if oa or ob:
                lead_a, lead_b = [batch, oa, []], [batch, [], ob]
            if contracted:
                la = _layout(ta, shape_a, (*lead_a, la_rows, cols), sizes)
                lb = _layout(tb, shape_b, (*lead_b, cols, lb_cols), sizes)
                kind = "matmul"
            else:  # nothing summed: a broadcast multiply of [batch, left, 1] and [batch, 1, right]
                la = _layout(ta, shape_a, (*lead_a, la_rows, []), sizes)
                lb = _layout(tb, shape_b, (*lead_b, [], lb_cols), sizes)
                kind = "mul"
            copied = la[3] + lb[3]
            copied += (size(ob) * size(ta) if size(ob) > 1 else 0) + (size(oa) * size(tb) if size(oa) > 1 else 0)
            if best is None or copied < best[5]:
                out = "".join(batch + oa + ob + la_rows + lb_cols)
                k = size(cols) if contracted else 1
                flops = (2 if contracted else 1) * size(out) * k
                best = (kind, out, la, lb, flops, copied, "")
    return best


def lower(equation: str, shapes: Sequence[Sequence[int]], path: Sequence[Sequence[int]],
          free: str | None = None, _memo: dict | None = None) -> Program:
    """Lower ``path`` (opt_einsum's format) for ``equation`` over ``shapes`` to a :class:`Program`.

    Every path step must contract exactly two operands.  ``free`` names an index
    (the batch) whose size may differ between calls: the program is lowered for
    its size in ``shapes`` (its FLOPs are counted there) and reshapes the axes
    it spans with ``-1``, so the same program runs for any size of it (at least
    two in ``shapes``).

    Examples
    --------
    ``x @ U`` (2*4*3*2 FLOPs), then a row-wise dot product with ``v`` (2*4*2):

    >>> lower("bi,ir,br->b", [(4, 3), (3, 2), (4, 2)], [(0, 1), (0, 1)]).flops
    64
    >>> import numpy as np
    >>> p = lower("bi,io->bo", [(4, 3), (3, 2)], [(0, 1)], free="b")
    >>> p(np.ones((7, 3)), np.ones((3, 2)), backend="numpy").shape
    (7, 2)
    """
    if free is not None:
        return _with_free_index(equation, shapes, path, free)
    terms, output, sizes = _parse(equation, shapes)
    current = list(terms)
    current_shapes = [tuple(s) for s in shapes]
    steps = []
    flops = copied = written = transposed = 0
    for pair in path:
        if len(pair) != 2:
            raise ValueError(f"path step {tuple(pair)} contracts {len(pair)} operands; lower() takes pairs")
        i, j = pair
        rest = [t for k, t in enumerate(current) if k not in (i, j)]
        keep = set(output).union(*rest)
        memo_key = (current[i], current[j], current_shapes[i], current_shapes[j], frozenset(keep))
        found = None if _memo is None else _memo.get(memo_key)
        if found is None:
            found = _lower_step(current[i], current[j], current_shapes[i], current_shapes[j], keep, sizes)
            if _memo is not None:
                _memo[memo_key] = found
        kind, out, la, lb, f, c, eq = found
        out_shape = tuple(sizes[ch] for ch in out)
        if kind == "einsum":
            steps.append(_Step(i, j, kind, None, (), False, None, (), False, out_shape, eq))
        else:
            if kind == "mul" and current[i] == current[j] == out:  # one layout: an elementwise product as is
                la, lb = (None, current_shapes[i], False), (None, current_shapes[j], False)
            a_view, b_view = _viewed(current_shapes[i], la[0]), _viewed(current_shapes[j], lb[0])
            product = _product_shape(kind, la[1], la[2], lb[1], lb[2])
            steps.append(_Step(i, j, kind, la[0], la[1], la[2], lb[0], lb[1], lb[2], out_shape,
                               a_reshape=a_view != la[1], b_reshape=b_view != lb[1], out_reshape=product != out_shape))
            transposed += la[2] * math.prod(la[1]) + lb[2] * math.prod(lb[1])
        flops += f
        copied += c
        if len(current) > 2:  # the last step writes the result, which every program writes
            written += math.prod(out_shape)
        for k in sorted((i, j), reverse=True):
            del current[k]
            del current_shapes[k]
        current.append(out)
        current_shapes.append(out_shape)
    if len(current) != 1:
        raise ValueError(f"path {list(path)} leaves {len(current)} operands; expected one")
    final = current[0]
    if set(final) != set(output) or len(final) != len(output):
        raise ValueError(f"path {list(path)} does not produce the output {output!r} of {equation!r}")
    perm = None if final == output else tuple(final.index(c) for c in output)
    if perm is not None:
        transposed += math.prod(sizes[c] for c in output)
    return Program(path=tuple(tuple(p) for p in path), flops=flops, copied=copied, written=written,
                   transposed=transposed, steps=tuple(steps), final_perm=perm, operands=len(shapes))


def _with_free_index(equation: str, shapes: Sequence[Sequence[int]], path: Sequence[Sequence[int]],
                     free: str) -> Program:
    """:func:`lower` with the axes spanned by index ``free`` reshaped by ``-1`` (any size of ``free`` runs).

    The path is lowered at two sizes of ``free``; the reshape targets that differ
    are the ones ``free`` spans (one axis each: an index lies in one group of a
    view).  Where the two programs differ otherwise, or ``free`` is not an
    index, the program of ``shapes`` is returned as is (fixed sizes).
    """
    terms, _, sizes = _parse(equation, shapes)
    program = lower(equation, shapes, path)
    if sizes.get(free, 0) < 2:
        return program
    grown = [tuple(d + 1 if c == free else d for c, d in zip(t, s)) for t, s in zip(terms, shapes)]
    other = lower(equation, grown, path)

    def symbolic(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
        if len(a) != len(b):
            return None
        shape = tuple(-1 if x != y else x for x, y in zip(a, b))
        return shape if shape.count(-1) <= 1 else None

    steps = []
    for s, t in zip(program.steps, other.steps):
        same = (s.i, s.j, s.kind, s.a_perm, s.a_swap, s.b_perm, s.b_swap, s.einsum, s.a_reshape, s.b_reshape,
                s.out_reshape) == (t.i, t.j, t.kind, t.a_perm, t.a_swap, t.b_perm, t.b_swap, t.einsum, t.a_reshape,
                                   t.b_reshape, t.out_reshape)
        shapes3 = [symbolic(s.a_shape, t.a_shape), symbolic(s.b_shape, t.b_shape), symbolic(s.out_shape, t.out_shape)]
        if not same or any(x is None for x in shapes3):
            return program
        steps.append(dataclasses.replace(s, a_shape=shapes3[0], b_shape=shapes3[1], out_shape=shapes3[2]))
    if program.final_perm != other.final_perm:
        return program
    return dataclasses.replace(program, steps=tuple(steps), _compiled={})


def _all_orders(terms: Sequence[str], output: str, sizes: dict[str, int]) -> Any:
    """Every pairwise contraction order of ``terms`` (opt_einsum's path format) with its FLOPs (as
    :func:`_order_flops` counts them); orders sharing a prefix share its count."""

    def orders(current: list[str], prefix: tuple, total: int) -> Any:
        if len(current) <= 1:
            yield prefix, total
            return
        for i, j in itertools.combinations(range(len(current)), 2):
            rest = [t for k, t in enumerate(current) if k not in (i, j)]
            keep = set(output).union(*rest)
            union = set(current[i]) | set(current[j])
            cost = (2 if union - keep else 1) * _size(union, sizes)
            yield from orders([*rest, "".join(sorted(union & keep))], (*prefix, (i, j)), total + cost)

    yield from orders(list(terms), (), 0)


def _swapped(path: Sequence[Sequence[int]], flips: Sequence[bool]) -> tuple[tuple[int, ...], ...]:
    """``path`` with the operand roles of the steps marked in ``flips`` exchanged."""
    return tuple((j, i) if flip else (i, j) for (i, j), flip in zip(path, flips))


def _order_flops(terms: Sequence[str], output: str, sizes: dict[str, int], order: Sequence[Sequence[int]]) -> int:
    """FLOPs of the pairwise contraction ``order`` (a cheap count, before lowering)."""
    current = list(terms)
    total = 0
    for i, j in order:
        rest = [t for k, t in enumerate(current) if k not in (i, j)]
        keep = set(output).union(*rest)
        union = set(current[i]) | set(current[j])
        out = "".join(sorted(union & keep))
        total += (2 if union - keep else 1) * _size(union, sizes)
        for k in sorted((i, j), reverse=True):
            del current[k]
        current.append(out)
    return total


def candidates(
    equation: str, shapes: Sequence[Sequence[int]], paths: Sequence[Sequence[Sequence[int]]], *, slack: float = 1.25,
    limit: int = 4, exhaustive: bool = True,
) -> list[Program]:
    """The cheapest programs (by ``Program.cost``) for ``equation``, best first.

    ``paths`` are seed contraction orders (from opt_einsum's optimizers); with
    ``exhaustive`` and at most ``EXHAUSTIVE_OPERANDS`` operands every order is
    considered as well.  Orders whose FLOPs exceed ``slack`` times the least are
    dropped; each kept order is lowered with every assignment of operand roles
    (which side of each matrix product an operand takes decides the layout of
    what follows).

    Examples
    --------
    Two rows through two matrices: multiplying the rows first is the cheap order.

    >>> best = candidates("bi,io,on->bn", [(2, 30), (30, 40), (40, 5)], [[(1, 2), (0, 1)]])[0]
    >>> best.path, best.flops, best.copied
    (((0, 1), (1, 0)), 5600, 0)
    """
    terms, output, sizes = _parse(equation, shapes)
    orders = {tuple(tuple(p) for p in path) for path in paths if all(len(p) == 2 for p in path)}
    counted = {order: _order_flops(terms, output, sizes, order) for order in orders}
    if exhaustive and len(shapes) <= EXHAUSTIVE_OPERANDS:
        counted.update(_all_orders(terms, output, sizes))
    if not counted:
        return []
    least = min(counted.values())
    kept = sorted((o for o, f in counted.items() if f <= slack * least), key=lambda o: (counted[o], o))
    programs = {}
    memo: dict = {}  # the orders share most of their steps: each pair is lowered once
    for order in kept[: 8 * limit]:
        steps = len(order)
        flips = itertools.product((False, True), repeat=steps) if steps <= 6 else [(False,) * steps]
        for flip in flips:
            variant = lower(equation, shapes, _swapped(order, flip), _memo=memo)
            key = tuple((s.kind, s.a_perm, s.a_shape, s.a_swap, s.b_perm, s.b_shape, s.b_swap) for s in variant.steps)
            if key not in programs or variant.cost < programs[key].cost:
                programs[key] = variant
    ranked = sorted(programs.values(), key=lambda p: (p.cost, p.flops, p.path))
    return ranked[:limit]
