"""Contraction planning: one path search per (equation, shapes, backend, dtype, optimizer).

Every factorized forward is a single einsum over the input, the expert
coefficients and the factors.  :func:`get_plan` searches its contraction path
once with :func:`opt_einsum.contract_path`, compiles it into an
:func:`opt_einsum.contract_expression` and caches both in a bounded LRU cache keyed
by everything the plan depends on.  Calls then run the cached expression with
``backend=`` given explicitly, so no framework re-plans an einsum per call
(``np.einsum`` without a path, and ``torch.einsum``, both would).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import threading
from typing import Any

import opt_einsum

__all__ = [
    "OPTIMIZERS",
    "Plan",
    "cache_info",
    "check_optimizer",
    "clear_cache",
    "contract",
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
    expression : opt_einsum.contract.ContractExpression
        The compiled expression; call it with the operands.

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
    expression: Any = dataclasses.field(repr=False, compare=False)

    def __call__(self, *operands: Any, backend: str) -> Any:
        return self.expression(*operands, backend=backend)


class _Cache:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.data: collections.OrderedDict[tuple, Plan] = collections.OrderedDict()
        self.hits = 0
        self.misses = 0
        self.lock = threading.Lock()


_cache = _Cache(_MAX_PLANS)


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
        hint = ""
    else:
        hint = "; cotengra's presets need: pip install cotengra"
    raise ValueError(f"optimize={optimize!r} is not a known path optimizer{hint}; expected one of {sorted(options)}")


def get_plan(
    equation: str,
    *shapes: tuple[int, ...],
    backend: str = "numpy",
    dtype: str = "float32",
    optimize: str = "auto",
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

    Returns
    -------
    Plan

    Examples
    --------
    >>> p = get_plan("bn,nr,bi,ir,or->bo", (8, 16), (16, 4), (8, 5), (5, 4), (6, 4))
    >>> get_plan("bn,nr,bi,ir,or->bo", (8, 16), (16, 4), (8, 5), (5, 4), (6, 4)) is p
    True
    """
    shapes = tuple(tuple(int(d) for d in s) for s in shapes)
    key = (equation, shapes, backend, dtype, optimize)
    with _cache.lock:
        plan = _cache.data.get(key)
        if plan is not None:
            _cache.data.move_to_end(key)
            _cache.hits += 1
            return plan
    check_optimizer(optimize)
    path, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimize)
    expression = opt_einsum.contract_expression(equation, *shapes, optimize=path)
    plan = Plan(
        equation=equation,
        shapes=shapes,
        path=[tuple(step) for step in path],
        flops=int(info.opt_cost),
        largest_intermediate=int(info.largest_intermediate),
        optimize=optimize,
        expression=expression,
    )
    with _cache.lock:
        _cache.misses += 1
        _cache.data[key] = plan
        while len(_cache.data) > _cache.maxsize:
            _cache.data.popitem(last=False)
    return plan


def contract(equation: str, *operands: Any, backend: str, dtype: str, optimize: str = "auto") -> Any:
    """Contract ``operands`` along ``equation`` with a cached plan.

    Examples
    --------
    >>> import numpy as np
    >>> contract("ij,jk->ik", np.eye(2), np.ones((2, 3)), backend="numpy", dtype="float64").shape
    (2, 3)
    """
    plan = get_plan(equation, *(tuple(o.shape) for o in operands), backend=backend, dtype=dtype, optimize=optimize)
    return plan(*operands, backend=_EINSUM_BACKENDS.get(backend, backend))


_EINSUM_BACKENDS = {"pytorch": "torch", "numpy": "numpy", "jax": "jax"}


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
