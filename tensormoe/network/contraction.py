"""Contraction planning: one path search per (equation, shapes, backend, dtype, optimizer).

Every factorized forward is a single einsum over the input, the expert
coefficients and the factors.  :func:`get_plan` searches its contraction path
once with :func:`opt_einsum.contract_path`, lowers it to matrix products over
views of the operands (:mod:`tensormoe.network.lowering`) and caches the result in a
bounded LRU cache keyed by everything the plan depends on, so no framework
re-plans an einsum per call (``np.einsum`` without a path, and
``torch.einsum``, both would).

Large contractions (at least :data:`SEARCH_FLOPS`) get a wider search: every
contraction order close to the fewest FLOPs (all orders up to six operands, the
orders of opt_einsum's ``"greedy"`` and ``"dp"`` otherwise) is lowered, ranked
by FLOPs plus memory traffic, and on the first NumPy or PyTorch call the best
few are timed in round-robin rounds (like cuDNN's benchmark mode): the model's
first choice is kept unless another is clearly faster.  On JAX, when the
forward is first traced, each of them is compiled and timed.  Every candidate
computes the same contraction; they differ only in rounding.

A plan may leave one index free (``batch=``, the rows of a layer's input): it
is then searched and timed once, at :data:`SEARCH_ROWS` rows, and its programs
run for any number of rows (they reshape the rows' axes with ``-1``).  The
layers plan this way, so a new batch size costs no search and no timing, and a
huge batch is never timed: the candidates run on stand-ins of
:data:`SEARCH_ROWS` rows (the first rows of the operands, or zeros).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.util
import threading
import time
from typing import Any

import numpy as np
import opt_einsum

from . import lowering
from .._array import backend_of, dtype_name
from ..backend import canonical_name
from ..validation import as_list, describe, is_int

__all__ = [
    "OPTIMIZERS",
    "Plan",
    "SEARCH_FLOPS",
    "SEARCH_ROWS",
    "cache_info",
    "cached_program",
    "check_optimizer",
    "clear_cache",
    "contract",
    "execute",
    "get_plan",
]

OPTIMIZERS = ("auto", "auto-hq", "greedy", "optimal", "dp", "branch-2", "random-greedy")
"""Path optimizers of opt_einsum that are always accepted.

cotengra's presets (``"hyper"``, ``"hyper-greedy"``, ...) are accepted too when
cotengra is installed; :func:`check_optimizer` says which names are known.

Examples
--------
>>> "greedy" in OPTIMIZERS
True
>>> all(check_optimizer(name) is None for name in OPTIMIZERS)
True
"""

_MAX_PLANS = 512

SEARCH_FLOPS = 1_000_000
"""Contractions of at least this many FLOPs get the wide search and the timing.

Examples
--------
>>> get_plan("bi,io->bo", (2, 3), (3, 4)).flops < SEARCH_FLOPS
True
"""

SEARCH_ROWS = 256
"""Size of the free index (``batch=``) at which a batch-free plan is searched and timed.

Examples
--------
>>> get_plan("bi,io->bo", (5, 3), (3, 4), batch="b").shapes
((256, 3), (3, 4))
"""

_TUNE_CANDIDATES = 4
_TUNE_REPEATS = 5
_TUNE_MARGIN = 0.05
#: Seconds of timing after which the rounds stop (once two have been timed)
_TUNE_BUDGET_S = 0.05


@dataclasses.dataclass(frozen=True)
class Plan:
    """A planned contraction: the path opt_einsum chose and what it costs.

    Attributes
    ----------
    equation : str
        The einsum equation.
    shapes : tuple of tuple of int
        Operand shapes the plan was made for.
    path : list of tuple of int
        The pairwise contraction order (opt_einsum's format).
    flops : int
        Floating-point operations of the whole contraction, as opt_einsum counts
        them (a multiply-add counts two).
    largest_intermediate : int
        Elements of the largest intermediate array.
    optimize : str
        The path optimizer that produced the path.
    candidates : tuple of tensormoe.lowering.Program
        The lowered programs, best first by the cost model; ``program`` is
        the one that runs.
    expression : opt_einsum.contract.ContractExpression
        opt_einsum's compiled expression of the path (used only where no
        lowered program exists).
    batch : str or None
        The free index (see :func:`get_plan`): ``shapes``, ``flops`` and
        ``largest_intermediate`` are then those at :data:`SEARCH_ROWS` of it,
        and the plan runs for any size of it.

    Examples
    --------
    >>> plan = get_plan("bi,io->bo", (4, 3), (3, 2))
    >>> plan.flops, plan.largest_intermediate
    (48, 8)
    """

    equation: str
    shapes: tuple[tuple[int, ...], ...]
    path: list[tuple[int, ...]]
    flops: int
    largest_intermediate: int
    optimize: str
    candidates: tuple = dataclasses.field(repr=False, compare=False)
    expression: Any = dataclasses.field(repr=False, compare=False)
    batch: str | None = None
    _chosen: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def program(self) -> lowering.Program | None:
        """The lowered program that runs: the fastest timed candidate once tuned, else the model's best.

        Examples
        --------
        >>> get_plan("bi,io->bo", (2, 3), (3, 4)).program.copied
        0
        """
        return self._chosen.get("program", self.candidates[0] if self.candidates else None)

    @property
    def tuned(self) -> bool:
        """Whether the candidates have been timed (or there was nothing to choose).

        Examples
        --------
        >>> get_plan("bi,io->bo", (2, 3), (3, 4)).tuned
        True
        """
        return "program" in self._chosen or len(self.candidates) <= 1

    def stand_ins(self, operands: Any, zeros: Any) -> list[Any]:
        """``operands`` brought to the plan's ``shapes``: a batch-free plan times its candidates at
        :data:`SEARCH_ROWS` rows, on the first rows of the operands, or on ``zeros(shape, like)`` of
        that shape where they have fewer rows.

        Examples
        --------
        >>> import numpy as np
        >>> plan = get_plan("bi,io->bo", (1000, 3), (3, 4), batch="b")
        >>> [a.shape for a in plan.stand_ins([np.ones((1000, 3)), np.ones((3, 4))], None)]
        [(256, 3), (3, 4)]
        """
        out = []
        for operand, shape in zip(operands, self.shapes):
            got = tuple(operand.shape)
            if got != shape:
                axis = next(k for k, (g, w) in enumerate(zip(got, shape)) if g != w)
                if got[axis] >= shape[axis]:
                    operand = operand[(slice(None),) * axis + (slice(0, shape[axis]),)]
                else:
                    operand = zeros(shape, operand)
            out.append(operand)
        return out

    def tune(self, *operands: Any, backend: str, sync: Any = None, wrap: Any = None) -> lowering.Program | None:
        """Time each candidate program once on ``operands`` and keep the fastest (first call only).

        ``operands`` have the plan's ``shapes`` (see :meth:`stand_ins`).
        ``wrap(program)`` turns a program into the function to time (``jax.jit``
        of it on JAX; default: the program itself), and ``sync(result)`` waits for
        the result (a device synchronisation on CUDA, ``block_until_ready`` on JAX).
        Thread-safe enough: two threads tuning at once each keep a valid program.

        Examples
        --------
        >>> import numpy as np
        >>> plan = get_plan("bi,io->bo", (2, 3), (3, 4))
        >>> plan.tune(np.ones((2, 3)), np.ones((3, 4)), backend="numpy") is plan.program
        True
        """
        if self.tuned:
            return self.program
        name = _einsum_backend(backend)
        programs = self.candidates[:_TUNE_CANDIDATES]
        runs = [functools.partial(p, backend=name) if wrap is None else wrap(p) for p in programs]
        best = [float("inf")] * len(programs)
        # round-robin, one call of each candidate per round (the first round warms up):
        # a machine that slows down for a while slows every candidate alike
        began = time.perf_counter()
        for round_ in range(_TUNE_REPEATS + 1):
            if round_ > 2 and time.perf_counter() - began > _TUNE_BUDGET_S:
                break
            for k, run in enumerate(runs):
                start = time.perf_counter()
                out = run(*operands)
                if sync is not None:
                    sync(out)
                if round_:
                    best[k] = min(best[k], time.perf_counter() - start)
        # the cost model's first choice stays unless another is clearly faster
        fastest = min(range(len(programs)), key=best.__getitem__)
        chosen = programs[fastest] if best[fastest] < (1 - _TUNE_MARGIN) * best[0] else programs[0]
        self._chosen["program"] = chosen
        return chosen

    def __call__(self, *operands: Any, backend: str) -> Any:
        """Contract ``operands`` (of the planned shapes) on ``backend``.

        Examples
        --------
        >>> import numpy as np
        >>> get_plan("ij,jk->ik", (2, 2), (2, 3))(np.eye(2), np.ones((2, 3)), backend="numpy").shape
        (2, 3)
        """
        if len(operands) != len(self.shapes):
            raise ValueError(
                f"operands: expected {len(self.shapes)} operands for the plan of {self.equation!r}; "
                f"got {len(operands)}"
            )
        for k, (operand, shape) in enumerate(zip(operands, self.shapes)):
            got = tuple(getattr(operand, "shape", ()))
            if got != shape and not self._batch_differs(k, got):
                raise ValueError(
                    f"operands[{k}] has shape {got}; expected {shape}, the shape the plan was made for "
                    "(get a plan for these shapes with get_plan)"
                )
        program = self.program
        if program is None:
            return self.expression(*operands, backend=_einsum_backend(backend))
        return program(*operands, backend=_einsum_backend(backend))

    def _batch_differs(self, k: int, got: tuple[int, ...]) -> bool:
        """Whether operand ``k`` of shape ``got`` differs from the planned shape only in the free index."""
        if self.batch is None or self.program is None:
            return False
        term = self.equation.split("->")[0].split(",")[k]
        want = self.shapes[k]
        return len(got) == len(want) and all(g == w or c == self.batch for c, g, w in zip(term, got, want))


class _Cache:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.data: collections.OrderedDict[tuple, Plan] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()


_cache = _Cache(_MAX_PLANS)


def _lookup(*key: Any) -> Plan | None:
    """The cached plan of ``key`` (counted as a hit), or ``None``; never raises."""
    try:
        key = (key[0], tuple(tuple(s) for s in key[1]), *key[2:])
        with _cache.lock:
            plan = _cache.data.get(key)
            if plan is not None:
                _cache.data.move_to_end(key)
                _cache.hits += 1
            return plan
    except TypeError:  # unhashable or not iterable: not a valid key, validation will say why
        return None


def check_optimizer(optimize: Any) -> None:
    """Raise unless ``optimize`` names a path optimizer opt_einsum (or cotengra) knows.

    Examples
    --------
    >>> check_optimizer("greedy")
    """
    if not isinstance(optimize, str):
        raise TypeError(
            f"optimize must be the name of a path optimizer, e.g. one of {list(OPTIMIZERS)}; "
            f"got {optimize!r} of type {type(optimize).__name__}"
        )
    options = opt_einsum.paths._PATH_OPTIONS
    if optimize in options:
        return
    if importlib.util.find_spec("cotengra") is not None:
        import cotengra  # noqa: F401  (registers its presets with opt_einsum)

        if optimize in options:
            return
    raise ValueError(
        f"optimize={optimize!r} is not a known path optimizer; expected one of {list(OPTIMIZERS)} or another "
        "name opt_einsum knows (cotengra's presets such as 'hyper' once cotengra is installed)"
    )


def get_plan(
    equation: str,
    *shapes: tuple[int, ...],
    backend: str = "numpy",
    dtype: str = "float32",
    optimize: str = "auto",
    batch: str | None = None,
) -> Plan:
    """Return the cached :class:`Plan` of ``equation`` for operands of ``shapes``.

    Parameters
    ----------
    equation : str
        An explicit einsum equation (with ``->``).
    *shapes : tuple of int
        The shape of each operand.
    backend : str
        Backend name the plan will run on (part of the cache key).
    dtype : str
        Dtype name of the operands (part of the cache key).
    optimize : str
        opt_einsum path optimizer: ``"auto"``, ``"auto-hq"``, ``"greedy"``,
        ``"optimal"``, ..., or a cotengra preset when cotengra is installed.
    batch : str, optional
        An index of ``equation`` whose size may change between calls (the
        rows): the plan is searched (and timed) once at :data:`SEARCH_ROWS` of
        it and runs for any size; every size of it gets the same plan.

    Returns
    -------
    Plan

    Examples
    --------
    >>> p = get_plan("bn,nr,bi,ir,or->bo", (8, 16), (16, 4), (8, 5), (5, 4), (6, 4))
    >>> get_plan("bn,nr,bi,ir,or->bo", (8, 16), (16, 4), (8, 5), (5, 4), (6, 4)) is p
    True
    """
    # Only valid keys are ever stored, so a hit on the key as given needs no checks
    # (this is the per-call path of every forward); a miss validates everything.
    plan = _lookup(equation, shapes, backend, dtype, optimize, batch)
    if plan is not None:
        return plan
    shapes = _check_shapes(equation, shapes)
    backend = canonical_name(backend, "backend")
    dtype = _check_dtype_name(dtype)
    check_optimizer(optimize)
    key = (equation, shapes, backend, dtype, optimize, batch)
    plan = _lookup(*key)
    if plan is not None:
        return plan
    if batch is None:
        plan = _search(equation, shapes, backend, dtype, optimize, None)
        _store(key, plan)
        return plan
    free = _free_shapes(equation, shapes, batch)
    plan = _lookup(equation, free, backend, dtype, optimize, batch)
    if plan is None:
        plan = _search(equation, free, backend, dtype, optimize, batch)
        _store((equation, free, backend, dtype, optimize, batch), plan)
    if free != shapes:
        _store(key, plan)  # the same plan under these shapes: the next call finds it at once
    return plan


def _free_shapes(equation: str, shapes: tuple, batch: Any) -> tuple:
    """``shapes`` with the size of index ``batch`` set to :data:`SEARCH_ROWS` (checked: one letter)."""
    if not isinstance(batch, str) or len(batch) != 1 or not batch.isalpha():
        raise ValueError(f"batch={batch!r} is not an index; expected one letter of equation={equation!r} or None")
    terms = equation.replace(" ", "").split("->")[0].split(",")
    return tuple(tuple(SEARCH_ROWS if c == batch else d for c, d in zip(t, s)) for t, s in zip(terms, shapes))


def _store(key: tuple, plan: Plan) -> None:
    with _cache.lock:
        _cache.data[key] = plan
        while len(_cache.data) > _cache.maxsize:
            _cache.data.popitem(last=False)


def _search(equation: str, shapes: tuple, backend: str, dtype: str, optimize: str, batch: str | None) -> Plan:
    """Search the path of ``equation`` over ``shapes`` and lower its candidates (a cache miss)."""
    with _cache.lock:
        _cache.misses += 1
    try:
        path, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimize)
        expression = opt_einsum.contract_expression(equation, *shapes, optimize=path)
    except (ValueError, TypeError, KeyError, IndexError) as err:
        raise ValueError(
            f"equation={equation!r} with shapes {list(shapes)} is not a valid contraction (opt_einsum: {err}); "
            "expected an einsum equation over these operands"
        ) from err
    seeds = [path]
    if optimize == "auto" and len(shapes) > 2:
        # opt_einsum's "auto" is greedy beyond four operands and misses cheaper orders of
        # hierarchical layers; the dynamic programme finds them (once per plan)
        for other in ("greedy", "dp"):
            try:
                other_path, other_info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=other)
            except RuntimeError:  # dp finds no path where an axis has size zero; "auto" has one
                continue
            seeds.append(other_path)
            if other_info.opt_cost < info.opt_cost:
                path, info = other_path, other_info
                expression = opt_einsum.contract_expression(equation, *shapes, optimize=path)
    plan = Plan(
        equation=equation,
        shapes=shapes,
        path=[tuple(step) for step in path],
        flops=int(info.opt_cost),
        largest_intermediate=int(info.largest_intermediate),
        optimize=optimize,
        candidates=tuple(_candidates(equation, shapes, path, seeds, optimize, int(info.opt_cost), batch)),
        expression=expression,
        batch=batch,
    )
    return plan


def _candidates(equation: str, shapes: tuple, path: list, seeds: list, optimize: str,
                flops: int, batch: str | None) -> list[lowering.Program]:
    """The lowered programs of a plan: the chosen order, widened to all ``seeds`` for large contractions."""
    if any("." in term for term in equation.split("->")[0].split(",")) or "->" not in equation:
        return []
    if flops < SEARCH_FLOPS:
        found = lowering.candidates(equation, shapes, [path], exhaustive=False, limit=1)
    else:
        found = lowering.candidates(equation, shapes, seeds, exhaustive=optimize == "auto", limit=_TUNE_CANDIDATES)
    return found if batch is None else [lowering.lower(equation, shapes, p.path, free=batch) for p in found]


def contract(equation: str, *operands: Any, backend: str, dtype: str, optimize: str = "auto") -> Any:
    """Contract ``operands`` along ``equation`` with a cached plan.

    Every operand must be an array of ``backend``.

    Examples
    --------
    >>> import numpy as np
    >>> contract("ij,jk->ik", np.eye(2), np.ones((2, 3)), backend="numpy", dtype="float64").shape
    (2, 3)
    """
    backend = canonical_name(backend, "backend")
    for k, operand in enumerate(operands):
        source = backend_of(operand)
        if source != backend:
            raise TypeError(
                f"operands[{k}] must be a {backend} array (backend={backend!r}); got {describe(operand)}"
            )
    plan = get_plan(equation, *(tuple(o.shape) for o in operands), backend=backend, dtype=dtype, optimize=optimize)
    return plan(*operands, backend=backend)


_EINSUM_BACKENDS = {"pytorch": "torch", "numpy": "numpy", "jax": "jax"}


def _einsum_backend(backend: Any) -> str:
    """opt_einsum's name of a backend given by tensormoe's or opt_einsum's name."""
    if backend in _EINSUM_BACKENDS.values():
        return backend
    return _EINSUM_BACKENDS[canonical_name(backend, "backend")]


def _check_shapes(equation: Any, shapes: tuple[Any, ...]) -> tuple[tuple[int, ...], ...]:
    """Shapes as tuples of ints, checked against the terms of ``equation``."""
    if not isinstance(equation, str):
        raise TypeError(f"equation must be an einsum string such as 'bi,io->bo'; got {describe(equation)}")
    out = []
    for k, shape in enumerate(shapes):
        values = as_list(shape)
        if values is None or not all(is_int(d) for d in values):
            raise TypeError(f"shapes[{k}] must be a sequence of non-negative integers; got {describe(shape)}")
        if any(d < 0 for d in values):
            raise ValueError(f"shapes[{k}] must be a sequence of non-negative integers; got {tuple(values)}")
        out.append(tuple(int(d) for d in values))
    terms = equation.replace(" ", "").split("->")[0].split(",")
    if len(terms) != len(out):
        raise ValueError(
            f"equation={equation!r} has {len(terms)} operand terms but {len(out)} shapes were given; "
            "expected one shape per term"
        )
    sizes: dict[str, tuple[int, int]] = {}
    for k, (term, shape) in enumerate(zip(terms, out)):
        if "." in term:
            continue  # ellipsis: opt_einsum checks these
        if len(term) != len(shape):
            raise ValueError(
                f"shapes[{k}]={shape} has {len(shape)} axes; expected {len(term)} for the term {term!r} "
                f"of equation={equation!r}"
            )
        for axis, (letter, size) in enumerate(zip(term, shape)):
            seen = sizes.setdefault(letter, (size, k))
            if seen[0] != size:
                raise ValueError(
                    f"shapes[{k}][{axis}]={size} for index {letter!r}; expected {seen[0]}, its size in "
                    f"shapes[{seen[1]}]"
                )
    return tuple(out)


def _check_dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        if dtype == "bfloat16":
            return dtype
        try:
            return np.dtype(dtype).name if np.dtype(dtype).name == dtype else _bad_dtype(dtype)
        except TypeError:
            pass
    return _bad_dtype(dtype)


def _bad_dtype(dtype: Any) -> str:
    if isinstance(dtype, str):
        raise ValueError(f"dtype={dtype!r} is not a dtype name; expected e.g. 'float32', 'bfloat16' or 'float64'")
    raise TypeError(f"dtype must be a dtype name such as 'float32'; got {describe(dtype)}")


def cache_info() -> dict[str, int]:
    """Hits, misses and size of the plan cache.

    Examples
    --------
    >>> sorted(cache_info())
    ['hits', 'maxsize', 'misses', 'size']
    """
    with _cache.lock:
        return {"hits": _cache.hits, "misses": _cache.misses, "size": len(_cache.data), "maxsize": _cache.maxsize}


def clear_cache() -> None:
    """Empty the plan cache and reset its counters.

    Examples
    --------
    >>> clear_cache(); cache_info()["size"]
    0
    """
    with _cache.lock:
        _cache.data.clear()
        _cache.hits = _cache.misses = 0


def cached_program(equation: str, operands: Any, backend: str, dtype: str, optimize: str, batch: str | None,
                   einsum_backend: str) -> lowering.Program | None:
    """The tuned program of a plan already made for these operands and compiled for ``einsum_backend``, or
    ``None``: a plain look-up (no search, no lock), which ``torch.compile`` can trace.

    Shapes are read from the operands; for a batch-free plan the rows count as
    :data:`SEARCH_ROWS`, so symbolic row counts find it too.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> x, w = np.ones((3, 2)), np.ones((2, 4))
    >>> cached_program("ib,bo->io", [x, w], "numpy", "float64", "auto", "i", "numpy") is None
    True
    >>> y = execute(get_ops("numpy"), "ib,bo->io", [x, w], batch="i")  # plans, times, runs
    >>> cached_program("ib,bo->io", [np.ones((7, 2)), w], "numpy", "float64", "auto", "i", "numpy") is not None
    True
    """
    terms = equation.split("->")[0].split(",")
    shapes = []
    for term, operand in zip(terms, operands):
        shape = []
        for c, d in zip(term, operand.shape):
            if c == batch:
                d = SEARCH_ROWS
            elif type(d) is not int:
                return None  # a symbolic size of another index: no plan can be known
            shape.append(d)
        shapes.append(tuple(shape))
    plan = _cache.data.get((equation, tuple(shapes), backend, dtype, optimize, batch))
    program = None if plan is None or not plan.tuned else plan.program
    # a program that has run is compiled to plain code (compiling it is not traceable)
    return program if program is not None and einsum_backend in program._compiled else None


def execute(ops: Any, equation: str, operands: list[Any], optimize: str = "auto", batch: str | None = None) -> Any:
    """Contract ``operands``, arrays of the framework of ``ops``, along ``equation`` with the plan of their shapes.

    The layers' per-call path: the plan is looked up (searched on the first call),
    its candidate programs are timed once (:meth:`Plan.tune`, through
    ``ops.tune``), and the chosen program runs.  ``batch`` names the index of the
    rows, whose number may change from call to call: one plan then serves every
    number of rows.  Under ``torch.compile`` the program of a plan found before
    is traced like hand-written code; a contraction never planned goes to
    ``einsum``, which plans its path once, when tracing.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> execute(get_ops("numpy"), "ab,bc->ac", [np.ones((5, 3)), np.ones((3, 4))], batch="a").shape
    (5, 4)
    """
    if ops.is_compiling():
        program = cached_program(equation, operands, ops.name, dtype_name(operands[-1]), optimize, batch,
                                 ops.einsum_backend)
        if program is not None:
            return program(*operands, backend=ops.einsum_backend)
        return ops.xp.einsum(equation, *operands)
    plan = get_plan(equation, *(tuple(o.shape) for o in operands), backend=ops.name, dtype=dtype_name(operands[-1]),
                    optimize=optimize, batch=batch)
    if not plan.tuned:
        ops.tune(plan, operands)
    program = plan.program  # the operands have the plan's shapes: no need for Plan.__call__'s checks
    if program is None:
        return plan.expression(*operands, backend=ops.einsum_backend)
    return program(*operands, backend=ops.einsum_backend)
