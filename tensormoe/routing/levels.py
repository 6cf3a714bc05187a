"""Routing across expert levels: one router per level, Soft MoE slots, training noise, checks.

A layer with ``H`` expert levels routes its input through one router per level
(:func:`route`).  Its forward then needs the rows the experts process (the
tokens, or the slots of a Soft MoE level), each level's weights and, for top-k
levels, the selected experts (:func:`dispatch`), and turns the experts' outputs
back into one output per token (:func:`combine`).  Routings given by the caller
are checked by :func:`check_routing`.

Level ``h``'s router parameters are stored in the layer under ``{name}_{h}``
(``gate_0``, ``gate_noise_1``, ...); :func:`level_params` picks them out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .._array import backend_of, dtype_name, to_numpy
from ..frameworks import Ops
from ..validation import check_array
from .routing import Routing, group_shape, regroup, ungroup, with_statistics
from .slots import slot_experts, soft_combine, soft_slots

__all__ = [
    "Dispatch",
    "check_routing",
    "combine",
    "dispatch",
    "level_params",
    "route",
    "training_noise",
]


def level_params(
    routers: Sequence[Any], params: Mapping[str, Any], in_dim: int, expert_dims: Sequence[int]
) -> list[dict[str, Any]]:
    """The parameters of every level's router, under the router's own names (``gate_0`` -> ``gate``).

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.routing import DenseRouter, TopKRouter
    >>> params = {"gate_0": np.zeros((4, 2)), "gate_1": np.ones((4, 3)), "gate_noise_1": np.zeros((4, 3))}
    >>> [sorted(p) for p in level_params([DenseRouter(), TopKRouter()], params, 4, [2, 3])]
    [['gate'], ['gate', 'gate_noise']]
    """
    return [
        {name: params[f"{name}_{h}"] for name in router.param_shapes(in_dim, n)}
        for h, (router, n) in enumerate(zip(routers, expert_dims))
    ]


def draw_noise(
    ops: Ops, routers: Sequence[Any], n_experts: Sequence[int], g: int, t: int, rng: Any, like: Any
) -> tuple[list[Any], Any]:
    """Standard normal noise ``[G, T', N_h]`` for every noisy router (``None`` for the others).

    ``T'`` is ``t`` or, for levels that route the slots of a Soft MoE level, the
    number of slots.  Returns the draws and the generator to use next.
    """
    noisy = [h for h, r in enumerate(routers) if r.noisy]
    if noisy and rng is None:
        names = ", ".join(f"{routers[h].name!r} at level {h}" for h in noisy)
        raise ValueError(
            f"training=True draws router noise ({names}) and needs rng=: an integer seed or a "
            "numpy.random.Generator (the same noise on every backend), a torch.Generator or a JAX key; got None"
        )
    rows = t
    for r, n in zip(routers, n_experts):
        if r.soft:
            rows = r.slots(n)
    out = []
    for h, (r, n) in enumerate(zip(routers, n_experts)):
        if h in noisy:
            draw, rng = ops.normal(rng, (g, t if r.soft else rows, n), like)
            out.append(draw)
        else:
            out.append(None)
    return out, rng


def route_levels(
    ops: Ops,
    routers: Sequence[Any],
    params: Sequence[Mapping[str, Any]],
    n_experts: Sequence[int],
    x: Any,
    mask: Any = None,
    noise: Sequence[Any] | None = None,
    statistics: bool = False,
) -> tuple[list[Routing], Any]:
    """Route a grouped input ``x[G, T, I]`` through one router per level (hierarchical routing).

    Every level routes the same rows: the tokens, or, when one level is a
    :class:`SoftRouter`, that level's slot inputs ``[G, S, I]`` (Soft MoE mixes
    tokens first; the other levels then route the slots, which are never padding).

    Returns the routings (grouped) and the rows the experts process.
    """
    noise = list(noise) if noise is not None else [None] * len(routers)
    routings: list[Routing | None] = [None] * len(routers)
    rows, row_mask = x, mask
    for h, router in enumerate(routers):
        if router.soft:
            routing = router.route(ops, params[h], x, mask)
            routings[h] = with_statistics(ops, routing, mask, n_experts[h]) if statistics else routing
            rows, row_mask = soft_slots(ops, routing, x), None
    for h, router in enumerate(routers):
        if routings[h] is None:
            routing = router.route(ops, params[h], rows, row_mask, noise[h])
            routings[h] = with_statistics(ops, routing, row_mask, n_experts[h]) if statistics else routing
    return routings, rows


def route(
    ops: Ops,
    routers: Sequence[Any],
    params: Mapping[str, Any],
    expert_dims: Sequence[int],
    x: Any,
    *,
    mask: Any = None,
    noise: Sequence[Any] | None = None,
    statistics: bool = True,
) -> tuple[Routing, ...]:
    """Route ``x[..., I]`` through every level: one :class:`~tensormoe.routing.Routing` per level.

    Parameters
    ----------
    ops : Ops
        The framework code of the backend of ``x``.
    routers : sequence of Router
        One router per level.
    params : mapping of str to array
        The layer's parameters (level ``h``'s under ``{name}_{h}``).
    expert_dims : sequence of int
        Experts per level.
    x : array ``[..., I]``
    mask : array ``[...]`` of zeros and ones, optional
        Ones for tokens, zeros for padding (already checked).
    noise : sequence of arrays or None, optional
        Training noise per level (:func:`training_noise`).
    statistics : bool
        Fill in the load statistics and auxiliary losses.

    Returns
    -------
    tuple of Routing
        Per-token fields with the leading axes of ``x``; with a Soft MoE level,
        the other levels route its slots, with leading axes ``[..., S]``.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> from tensormoe.routing import TopKRouter
    >>> (r,) = route(get_ops("numpy"), [TopKRouter(noise=None)], {"gate_0": np.eye(3)}, [3], np.eye(3)[[2, 0]])
    >>> r.indices.tolist(), r.load.tolist()
    ([[2], [0]], [0.5, 0.0, 0.5])
    """
    lead = tuple(x.shape[:-1])
    in_dim = x.shape[-1]
    g, t = group_shape(lead)
    grouped_mask = None if mask is None else ops.xp.reshape(mask, (g, t))
    by_level = level_params(routers, params, in_dim, expert_dims)
    routings, rows = route_levels(
        ops, routers, by_level, expert_dims, ops.xp.reshape(x, (g, t, in_dim)), grouped_mask, noise, statistics
    )
    soft = any(r.is_soft for r in routings)
    slot_lead = (*lead[:-1], rows.shape[1])
    return tuple(ungroup(ops, r, slot_lead if soft and not r.is_soft else lead) for r in routings)


class Dispatch(NamedTuple):
    """What the experts process: rows, each level's weights, and the routing they came from.

    Attributes
    ----------
    rows : array ``[R, I]``
        The rows the experts process: the tokens, or the slots of a Soft MoE level.
    levels : tuple of (weights, indices or None)
        Per level, the weights ``[R, N_h]`` (dense) or ``[R, k]`` with the
        selected experts ``indices [R, k]`` (top-k and Soft MoE slots).
    routing : tuple of Routing
        The grouped routings ``[G, T, ...]`` (``[G, S, ...]`` for levels routing slots).
    soft : int or None
        The Soft MoE level, if any.
    groups : int
        ``G``, the number of groups.
    per_group : int
        Rows per group: ``T`` tokens, or ``S`` slots.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> from tensormoe.routing import DenseRouter
    >>> d = dispatch(get_ops("numpy"), [DenseRouter()], {"gate_0": np.zeros((3, 2))}, [2], np.ones((5, 3)))
    >>> d.rows.shape, d.levels[0][0].shape, d.levels[0][1] is None, (d.groups, d.per_group)
    ((5, 3), (5, 2), True, (1, 5))
    """

    rows: Any
    levels: tuple
    routing: tuple
    soft: int | None
    groups: int
    per_group: int


def dispatch(
    ops: Ops,
    routers: Sequence[Any],
    params: Mapping[str, Any],
    expert_dims: Sequence[int],
    x: Any,
    *,
    routing: Sequence[Routing] | None = None,
    mask: Any = None,
    noise: Sequence[Any] | None = None,
    statistics: bool = False,
) -> Dispatch:
    """Route ``x[..., I]`` (or take the given ``routing``) and lay out the rows and weights the experts process.

    ``routing`` given (checked by :func:`check_routing`) is used instead of the
    routers; ``mask``, ``noise`` and ``statistics`` are as in :func:`route`.

    Examples
    --------
    A Soft MoE level: its slots are the rows, each slot weighs its own expert.

    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> from tensormoe.routing import SoftRouter
    >>> d = dispatch(get_ops("numpy"), [SoftRouter()], {"gate_0": np.zeros((3, 2))}, [2], np.ones((4, 5, 3)))
    >>> d.rows.shape, d.levels[0][1][:, 0].tolist(), d.soft
    ((8, 3), [0, 1, 0, 1, 0, 1, 0, 1], 0)
    """
    lead = tuple(x.shape[:-1])
    in_dim = x.shape[-1]
    g, t = group_shape(lead)
    grouped = ops.xp.reshape(x, (g, t, in_dim))
    if routing is None:
        soft = next((h for h, r in enumerate(routers) if r.soft), None)
        grouped_mask = None if mask is None else ops.xp.reshape(mask, (g, t))
        by_level = level_params(routers, params, in_dim, expert_dims)
        grouped_routing, rows = route_levels(ops, routers, by_level, expert_dims, grouped, grouped_mask, noise,
                                             statistics)
    else:
        soft = next((h for h, r in enumerate(routing) if r.is_soft), None)
        slots = t if soft is None else routing[soft].weights.shape[-1]
        grouped_routing = [regroup(ops, r, g, t if h == soft else slots) for h, r in enumerate(routing)]
        rows = grouped if soft is None else soft_slots(ops, grouped_routing[soft], grouped)
    per_group = rows.shape[1]
    n_rows = g * per_group
    levels = []
    for h, (r, n) in enumerate(zip(grouped_routing, expert_dims)):
        if h == soft:
            index = slot_experts(ops, g, per_group, per_group // n, like=x)
            levels.append((ops.xp.ones((n_rows, 1), dtype=x.dtype, device=ops.device(x)), index))
        elif r.is_sparse:
            k = r.weights.shape[-1]
            levels.append((ops.xp.reshape(r.weights, (n_rows, k)), ops.xp.reshape(r.indices, (n_rows, k))))
        else:
            levels.append((ops.xp.reshape(r.weights, (n_rows, n)), None))
    return Dispatch(
        rows=ops.xp.reshape(rows, (n_rows, in_dim)),
        levels=tuple(levels),
        routing=tuple(grouped_routing),
        soft=soft,
        groups=g,
        per_group=per_group,
    )


def combine(ops: Ops, dispatched: Dispatch, y: Any, lead: Sequence[int]) -> tuple[Any, tuple[Routing, ...]]:
    """The output ``[*lead, O]`` from the experts' outputs ``y[R, O]``, and the routing with the leading axes back.

    A Soft MoE level mixes the slot outputs back into tokens; otherwise the rows
    are the tokens.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> from tensormoe.routing import SoftRouter
    >>> ops = get_ops("numpy")
    >>> d = dispatch(ops, [SoftRouter()], {"gate_0": np.zeros((3, 2))}, [2], np.ones((4, 5, 3)))
    >>> y, (r,) = combine(ops, d, np.ones((8, 6)), (4, 5))
    >>> y.shape, r.weights.shape, bool(np.allclose(y, 1.0))
    ((4, 5, 6), (4, 5, 2), True)
    """
    lead = tuple(lead)
    y = ops.xp.reshape(y, (dispatched.groups, dispatched.per_group, y.shape[-1]))
    soft = dispatched.soft
    if soft is not None:
        y = soft_combine(ops, dispatched.routing[soft], y)
    y = ops.xp.reshape(y, (*lead, y.shape[-1]))
    slot_lead = (*lead[:-1], dispatched.per_group)
    routing = tuple(
        ungroup(ops, r, lead if soft is None or h == soft else slot_lead) for h, r in enumerate(dispatched.routing)
    )
    return y, routing


def training_noise(
    ops: Ops, routers: Sequence[Any], expert_dims: Sequence[int], lead: Sequence[int], rng: Any, like: Any
) -> list[Any] | None:
    """The router noise of a training call for inputs with leading axes ``lead``; ``None`` when no router is noisy.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> from tensormoe.routing import DenseRouter, TopKRouter
    >>> noise = training_noise(get_ops("numpy"), [DenseRouter(), TopKRouter()], [2, 3], (4, 5), 0, np.ones(1))
    >>> noise[0] is None, noise[1].shape
    (True, (4, 5, 3))
    >>> training_noise(get_ops("numpy"), [DenseRouter()], [2], (4,), None, np.ones(1)) is None
    True
    """
    g, t = group_shape(tuple(lead))
    draws, _ = draw_noise(ops, routers, expert_dims, g, t, rng, like=like)
    return draws if any(d is not None for d in draws) else None


def check_routing(
    routing: Any, expert_dims: Sequence[int], lead: Sequence[int], ops: Ops, *, dtype: str | None = None
) -> list[Routing]:
    """Return ``routing`` as a list after checking it fits a layer with ``expert_dims`` and inputs ``[*lead, I]``.

    One :class:`~tensormoe.routing.Routing` per level; weights of the backend of
    ``ops`` and dtype ``dtype``, shaped as the level's router would give them;
    top-k indices integer and within the level's experts; at most one Soft MoE level.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> from tensormoe.routing import Routing
    >>> check_routing([Routing(np.ones((2, 1)), np.array([[0], [7]]))], [4], (2,), get_ops("numpy"))
    Traceback (most recent call last):
    ...
    ValueError: routing[0].indices must lie in [0, 4); got values in [0, 7]
    """
    hierarchy = len(expert_dims)
    lead = tuple(lead)
    if isinstance(routing, Routing) or not isinstance(routing, Sequence) or len(routing) != hierarchy:
        raise ValueError(
            f"routing must be a sequence of {hierarchy} Routing results (one per level, e.g. from "
            f"layer.route); got {type(routing).__name__}"
            + (f" of length {len(routing)}" if isinstance(routing, Sequence) else "")
        )
    soft = [h for h, r in enumerate(routing) if isinstance(r, Routing) and r.is_soft]
    if len(soft) > 1:
        raise ValueError(f"at most one level can use Soft MoE routing; routing levels {soft} do")
    slots = None
    if soft:
        w = routing[soft[0]].weights
        slots = w.shape[-1] if getattr(w, "ndim", 0) else None
    out = []
    for h, (r, n) in enumerate(zip(routing, expert_dims)):
        where = f"routing[{h}]"
        if not isinstance(r, Routing):
            raise TypeError(f"{where} must be a tensormoe.routing.Routing; got {type(r).__name__}")
        rows = lead if not soft or h == soft[0] else (*lead[:-1], slots)
        if r.is_soft:
            if slots is None or slots % n:
                raise ValueError(f"{where}: Soft MoE weights must have S = slots_per_expert * {n} slots; "
                                 f"got shape {list(getattr(r.weights, 'shape', []))}")
            for name in ("weights", "dispatch"):
                a = check_array(getattr(r, name), ops, f"{where}.{name}", last=slots, dtype=dtype)
                if tuple(a.shape[:-1]) != rows:
                    raise ValueError(f"{where}.{name} must have shape {[*rows, slots]}; got {list(a.shape)}")
        elif r.is_sparse:
            k = getattr(r.weights, "shape", (0,))[-1]
            w = check_array(r.weights, ops, f"{where}.weights", last=k, dtype=dtype)
            if tuple(w.shape[:-1]) != rows or tuple(r.indices.shape) != tuple(w.shape):
                raise ValueError(
                    f"{where}: weights and indices must both have shape [{', '.join(map(str, rows))}, k]; "
                    f"got {list(w.shape)} and {list(r.indices.shape)}"
                )
            if backend_of(r.indices) != ops.name or "int" not in dtype_name(r.indices):
                raise TypeError(f"{where}.indices must be an integer array of the {ops.name} backend; "
                                f"got {type(r.indices).__name__} of dtype {getattr(r.indices, 'dtype', None)}")
            if not ops.is_tracer(r.indices):
                values = to_numpy(r.indices)
                if values.size and (values.min() < 0 or values.max() >= n):
                    raise ValueError(f"{where}.indices must lie in [0, {n}); got values in "
                                     f"[{values.min()}, {values.max()}]")
        else:
            w = check_array(r.weights, ops, f"{where}.weights", last=n, dtype=dtype)
            if tuple(w.shape[:-1]) != rows:
                raise ValueError(f"{where}.weights must have shape {[*rows, n]}; got {list(w.shape)}")
        out.append(r)
    return out
