"""The **limit** of each factorization's forward: gates plus a hand-ordered chain of matrix products.

The benchmark compares the layers' planned forward (one cached opt_einsum
contraction) against these functions, which compute the same output the way a
person would write it by hand for one fixed format, with ``@``, ``*`` and
reshapes only:

* CP: ``((a_1 @ U_1) * ... * (a_H @ U_H) * (x @ U_i)) @ U_o.T``;
* Tucker: project every mode (``a_h @ U_h``, ``x @ U_i``), take the outer product
  of the projections, one matmul with the unfolded core, one with ``U_o.T``;
* TT / TR: each level's coefficients and the input turned into ``[B, r, r']``
  matrices by one matmul each, a batched chain of products through them, and
  the output core closing the ring (the trace over the boundary bond; TT has
  boundary rank 1).

With a bias the input mode has ``I + 1`` rows and the last is the bias: the
chains use ``x @ U[:I] + U[I]`` instead of concatenating a column of ones.

Gates: :func:`coefficients` runs the same gate code as the layers' default
dense routers (``x @ G_h``, optional LayerNorm, the activation from
:mod:`tensormoe.gates`) on the same backend.  Every hierarchy ``H >= 1`` and
both bias settings are covered; routers other than the default dense one are
not (the benchmark builds only default-routed layers).
"""

from __future__ import annotations

import math
from typing import Any

from tensormoe import gates as _gates
from tensormoe.ops import Ops


def coefficients(layer: Any, params: dict, x: Any, ops: Ops) -> list[Any]:
    """Each level's coefficients ``[B, N_h]``: ``activation(norm(x @ gate_h))``."""
    norm = _gates.NORMS[layer.gate_norm]
    act = _gates.ACTIVATIONS[layer.gate]
    out = []
    for h in range(layer.hierarchy):
        z = x @ params[f"gate_{h}"]
        if norm is not None:
            z = norm(z, ops=ops)
        out.append(act(z, ops=ops))
    return out


def _input_projection(layer: Any, u: Any, x: Any) -> Any:
    """``[x, 1] @ u`` for a matrix ``u[I(+1), k]``, without building ``[x, 1]``."""
    if layer.bias:
        return x @ u[: layer.in_dim] + u[layer.in_dim]
    return x @ u


def cp_chain(layer: Any, params: dict, x: Any, coeffs: list[Any], ops: Ops) -> Any:
    """CP: ``((a_1 @ U_1) * ... * ([x, 1] @ U_i)) @ U_o.T``."""
    h_in = layer.hierarchy
    t = _input_projection(layer, params[f"factor_{h_in}"], x)
    for h, a in enumerate(coeffs):
        t = t * (a @ params[f"factor_{h}"])
    return t @ params[f"factor_{h_in + 1}"].T


def tucker_chain(layer: Any, params: dict, x: Any, coeffs: list[Any], ops: Ops) -> Any:
    """Tucker: outer product of the mode projections, then the unfolded core, then ``U_o.T``."""
    h_in = layer.hierarchy
    b = x.shape[0]
    z = None
    for v in [*(a @ params[f"factor_{h}"] for h, a in enumerate(coeffs)),
              _input_projection(layer, params[f"factor_{h_in}"], x)]:
        z = v if z is None else ops.reshape(z[:, :, None] * v[:, None, :], (b, -1))
    core = params["core"]
    r_out = core.shape[-1]
    t = z @ ops.reshape(core, (math.prod(core.shape[:-1]), r_out))
    return t @ params[f"factor_{h_in + 1}"].T


def chain_chain(layer: Any, params: dict, x: Any, coeffs: list[Any], ops: Ops) -> Any:
    """TT / TR: ``[B, r, r']`` matrices of every level and the input, multiplied in order, closed by the output core."""
    h_in = layer.hierarchy
    b = x.shape[0]

    def matrices(core: Any, rows: Any, project: Any) -> Any:
        r, n, s = core.shape
        unfolded = ops.reshape(ops.moveaxis(core, [1], [0]), (n, r * s))  # [n, r * s]
        return ops.reshape(project(rows, unfolded), (b, r, s))

    t = None
    for h, a in enumerate(coeffs):
        m = matrices(params[f"factor_{h}"], a, lambda rows, u: rows @ u)
        t = m if t is None else t @ m
    m = matrices(params[f"factor_{h_in}"], x, lambda rows, u: _input_projection(layer, u, rows))
    t = t @ m  # [B, r_0, r_last]
    out = params[f"factor_{h_in + 1}"]  # [r_last, O, r_0]
    r_last, o, r0 = out.shape
    closing = ops.reshape(ops.moveaxis(out, [2], [0]), (r0 * r_last, o))  # [r_0 * r_last, O]
    return ops.reshape(t, (b, r0 * r_last)) @ closing


#: Hand chain of each factorization, by its ``factorization.name``.
CHAINS = {"cp": cp_chain, "tucker": tucker_chain, "tt": chain_chain, "tr": chain_chain}


def limit_forward(layer: Any, params: dict, x: Any, ops: Ops) -> Any:
    """The whole limit forward ``y[B, O]`` of ``layer`` for ``x[B, I]``: gates, then the hand chain."""
    coeffs = coefficients(layer, params, x, ops)
    return CHAINS[layer.factorization.name](layer, params, x, coeffs, ops)
