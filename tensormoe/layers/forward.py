"""The forward of a layer as pure functions: ``(ops, spec, params, x, ...) -> y``.

``spec`` is the layer's :class:`~tensormoe.layers.config.LayerSpec`; the
arguments have been checked by the layer.  Every flag is keyword-only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .. import routing as _routing
from ..frameworks import Ops
from ..network.contraction import execute
from .config import LayerSpec

__all__ = ["coefficients", "dense_forward", "forward", "forward_with_routing", "route"]


def _contract(ops: Ops, spec: LayerSpec, equation: str, operands: Sequence[Any], *, rows: bool = True) -> Any:
    # rows: the operands carry the batch index, whose size changes from call to call (one plan for all)
    return execute(ops, equation, list(operands), spec.optimize, spec.factorization.batch_symbol if rows else None)


def expert_weight(ops: Ops, spec: LayerSpec, params: Mapping[str, Any], index: tuple[int, ...]) -> Any:
    """The ``[I(+1), O]`` matrix of the expert ``index``, without building ``W``."""
    operands = spec.factorization.slice_params(params, index)
    return _contract(ops, spec, spec.factorization.slice_equation(), operands, rows=False)


def _with_bias(ops: Ops, spec: LayerSpec, rows: Any) -> Any:
    return ops.concat_ones(rows) if spec.bias else rows


def _contract_levels(
    ops: Ops, spec: LayerSpec, params: Mapping[str, Any], inputs: Any, levels: Sequence[tuple[Any, Any]], *,
    dense: bool,
) -> Any:
    """``y[B, O]`` from the rows ``inputs[B, I(+1)]`` and each level's ``(weights, indices or None)``.

    Sparse levels (indices given) contract only the gathered factor rows
    (:meth:`Factorization.gather_params`); ``dense=True`` is the reference
    through the reconstructed ``W`` with the sparse weights scattered to zeros.
    """
    factorization = spec.factorization
    if dense:
        coeffs = [
            w if idx is None else ops.scatter_add_last(idx, w, n) for (w, idx), n in zip(levels, spec.expert_dims)
        ]
        weight = factorization.to_dense(params, backend=ops.name)
        return _contract(ops, spec, factorization.dense_equation(), [*coeffs, inputs, weight])
    indices = {h: idx for h, (_, idx) in enumerate(levels) if idx is not None}
    operands = [*(w for w, _ in levels), inputs, *factorization.gather_params(params, indices, ops)]
    return _contract(ops, spec, factorization.routed_equation([h in indices for h in range(len(levels))]), operands)


def _given_coefficients(
    ops: Ops, spec: LayerSpec, params: Mapping[str, Any], x: Any, coefficients: Sequence[Any], *, dense: bool
) -> Any:
    """The forward with dense coefficients given by the caller."""
    lead = tuple(x.shape[:-1])
    n_rows = math.prod(lead)
    rows = ops.xp.reshape(x, (n_rows, spec.in_dim))
    levels = [(ops.xp.reshape(a, (n_rows, n)), None) for a, n in zip(coefficients, spec.expert_dims)]
    y = _contract_levels(ops, spec, params, _with_bias(ops, spec, rows), levels, dense=dense)
    return ops.xp.reshape(y, (*lead, spec.out_dim))


def _routed(
    ops: Ops, spec: LayerSpec, params: Mapping[str, Any], x: Any, *, routing: Any = None, mask: Any = None,
    noise: Any = None, statistics: bool = False, dense: bool = False,
) -> tuple[Any, tuple]:
    """The forward through the routers (or the given routing): ``(y, routing)``."""
    dispatched = _routing.dispatch(ops, spec.routers, params, spec.expert_dims, x, routing=routing, mask=mask,
                                   noise=noise, statistics=statistics)
    inputs = _with_bias(ops, spec, dispatched.rows)
    y = _contract_levels(ops, spec, params, inputs, dispatched.levels, dense=dense)
    return _routing.combine(ops, dispatched, y, tuple(x.shape[:-1]))


def _dense_gated(ops: Ops, spec: LayerSpec, params: Mapping[str, Any], x: Any) -> Any:
    """The forward with dense routers on every level: gates on the rows of ``x``, then the planned contraction.

    The same computation as :func:`_routed` (which groups tokens for the routers
    that need groups), without its bookkeeping: the per-call path of the default layers.
    """
    lead = tuple(x.shape[:-1])
    rows = x if len(lead) == 1 else ops.xp.reshape(x, (math.prod(lead), spec.in_dim))
    level_params = _routing.level_params(spec.routers, params, spec.in_dim, spec.expert_dims)
    coeffs = [router.route(ops, p, rows).weights for router, p in zip(spec.routers, level_params)]
    operands = [*coeffs, _with_bias(ops, spec, rows), *spec.factorization.gather_params(params, {}, ops)]
    y = _contract(ops, spec, spec.factorization.forward_equation(), operands)
    return y if len(lead) == 1 else ops.xp.reshape(y, (*lead, spec.out_dim))


def forward(
    ops: Ops, spec: LayerSpec, params: Mapping[str, Any], x: Any, coefficients: Any = None, routing: Any = None,
    mask: Any = None, noise: Any = None,
) -> Any:
    """The factorized forward ``y[..., O]``: through the given coefficients or routing, or the routers.

    Examples
    --------
    >>> import numpy as np, tensormoe
    >>> from tensormoe.frameworks import get_ops
    >>> layer = tensormoe.CPMMoE(4, 3, [5], rank=2)
    >>> x = np.ones((2, 4), dtype="float32")
    >>> bool(np.array_equal(forward(get_ops("numpy"), layer.spec, layer.params, x), layer(x)))
    True
    """
    if coefficients is not None:
        return _given_coefficients(ops, spec, params, x, coefficients, dense=False)
    if routing is None and mask is None and spec.dense_routing:
        return _dense_gated(ops, spec, params, x)
    return _routed(ops, spec, params, x, routing=routing, mask=mask, noise=noise)[0]


def forward_with_routing(
    ops: Ops, spec: LayerSpec, params: Mapping[str, Any], x: Any, coefficients: Any = None, routing: Any = None,
    mask: Any = None, noise: Any = None,
) -> tuple[Any, tuple]:
    """``(y, routing)``: the forward and the routing it used (with its statistics when routed here).

    Examples
    --------
    >>> import numpy as np, tensormoe
    >>> from tensormoe.frameworks import get_ops
    >>> layer = tensormoe.CPMMoE(4, 3, [5], rank=2, router="top1")
    >>> y, (r,) = forward_with_routing(get_ops("numpy"), layer.spec, layer.params, np.ones((6, 4), "float32"))
    >>> y.shape, r.indices.shape, r.load is not None
    ((6, 3), (6, 1), True)
    """
    return _routed(ops, spec, params, x, routing=routing, mask=mask, noise=noise, statistics=routing is None)


def dense_forward(
    ops: Ops, spec: LayerSpec, params: Mapping[str, Any], x: Any, coefficients: Any = None, routing: Any = None,
    mask: Any = None, noise: Any = None,
) -> Any:
    """The reference forward through the reconstructed weight tensor ``W`` (sparse weights scattered to zeros).

    Examples
    --------
    >>> import numpy as np, tensormoe
    >>> from tensormoe.frameworks import get_ops
    >>> layer = tensormoe.TuckerMMoE(4, 3, [5], ranks=2)
    >>> x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    >>> bool(np.allclose(dense_forward(get_ops("numpy"), layer.spec, layer.params, x), layer(x), atol=1e-5))
    True
    """
    if coefficients is not None:
        return _given_coefficients(ops, spec, params, x, coefficients, dense=True)
    return _routed(ops, spec, params, x, routing=routing, mask=mask, noise=noise, dense=True)[0]


def route(
    ops: Ops, spec: LayerSpec, params: Mapping[str, Any], x: Any, mask: Any = None, noise: Any = None
) -> tuple:
    """The routing of every level, with statistics and auxiliary losses (:func:`tensormoe.routing.route`).

    Examples
    --------
    >>> import numpy as np, tensormoe
    >>> from tensormoe.frameworks import get_ops
    >>> layer = tensormoe.CPMMoE(4, 3, [5], rank=2, router="top2")
    >>> (r,) = route(get_ops("numpy"), layer.spec, layer.params, np.ones((3, 4), "float32"))
    >>> r.indices.shape
    (3, 2)
    """
    return _routing.route(ops, spec.routers, params, spec.expert_dims, x, mask=mask, noise=noise)


def coefficients(ops: Ops, spec: LayerSpec, params: Mapping[str, Any], x: Any) -> list[Any]:
    """Dense coefficients ``[..., N_h]`` of every level (zeros for unselected experts).

    Examples
    --------
    >>> import numpy as np, tensormoe
    >>> from tensormoe.frameworks import get_ops
    >>> layer = tensormoe.CPMMoE(4, 3, [5], rank=2)
    >>> (a,) = coefficients(get_ops("numpy"), layer.spec, layer.params, np.ones((3, 4), "float32"))
    >>> a.shape, bool(np.allclose(a.sum(-1), 1))
    ((3, 5), True)
    """
    routing = _routing.route(ops, spec.routers, params, spec.expert_dims, x, statistics=False)
    return [r.to_dense(n) for r, n in zip(routing, spec.expert_dims)]
