"""The **limit** of each factorization's forward: exact gates plus a hand-ordered chain of matrix products.

The benchmark compares the layers' planned forward against these functions,
which compute the same output the way a person would write it by hand for one
fixed format, with ``@``, ``*`` and reshapes of the framework's own arrays, and
**no tensormoe code**:

* gates: each level's logits ``x @ G_h``, the framework's own LayerNorm where it
  has one (``torch.nn.functional.layer_norm``; NumPy and JAX: mean and variance,
  which XLA fuses), then the activation given by the caller, for the limit the
  fastest exact candidate of ``limit_gates.py`` on that backend;
* CP: ``((a_1 @ U_1) * ... * (a_H @ U_H) * (x @ U_i)) @ U_o.T``;
* Tucker: project every mode (``a_h @ U_h``, ``x @ U_i``), take the outer product
  of the projections, one matmul with the unfolded core, one with ``U_o.T``;
* TT / TR: each level's coefficients and the input turned into ``[B, r, r']``
  matrices by one matmul each, a batched chain of products through them, and
  the output core closing the ring (the trace over the boundary bond; TT has
  boundary rank 1).

With a bias the input mode has ``I + 1`` rows and the last is the bias: the
chains use ``x @ U[:I] + U[I]`` instead of concatenating a column of ones.
Every hierarchy ``H >= 1`` and both bias settings are covered; routers other
than the default dense one are not (the benchmark builds only default-routed
layers).  ``layer`` is only read for its configuration (dims, bias, gate, format).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np


def namespace(x: Any) -> Any:
    """The array module of ``x``: ``numpy``, ``torch`` or ``jax.numpy``."""
    module = type(x).__module__
    if module.startswith("torch"):
        import torch

        return torch
    if module.startswith(("jax", "jaxlib")):
        import jax.numpy as jnp

        return jnp
    return np


def layer_norm(z: Any, eps: float = 1e-5) -> Any:
    """LayerNorm without affine over the last axis, by the framework's fused op where it has one."""
    xp = namespace(z)
    if xp is not np and xp.__name__ == "torch":
        return xp.nn.functional.layer_norm(z, z.shape[-1:], eps=eps)
    centred = z - z.mean(-1, keepdims=True)
    return centred / xp.sqrt((centred * centred).mean(-1, keepdims=True) + eps)


def softmax(z: Any) -> Any:
    """The framework's softmax over the last axis."""
    xp = namespace(z)
    if xp.__name__ == "torch":
        return xp.softmax(z, -1)
    if xp is not np:
        import jax

        return jax.nn.softmax(z, -1)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def coefficients(layer: Any, params: dict, x: Any, activation: Callable, norm: Callable | None = layer_norm
                 ) -> list[Any]:
    """Each level's coefficients ``[B, N_h]``: ``activation(norm(x @ gate_h))`` (no norm when the layer has none)."""
    out = []
    for h in range(len(layer.expert_dims)):
        z = x @ params[f"gate_{h}"]
        if layer.gate_norm is not None and norm is not None:
            z = norm(z)
        out.append(activation(z))
    return out


def _input_projection(layer: Any, u: Any, x: Any) -> Any:
    """``[x, 1] @ u`` for a matrix ``u[I(+1), k]``, without building ``[x, 1]``."""
    if layer.bias:
        return x @ u[: layer.in_dim] + u[layer.in_dim]
    return x @ u


def cp_chain(layer: Any, params: dict, x: Any, coeffs: list[Any]) -> Any:
    """CP: ``((a_1 @ U_1) * ... * ([x, 1] @ U_i)) @ U_o.T``."""
    h_in = len(coeffs)
    t = _input_projection(layer, params[f"factor_{h_in}"], x)
    for h, a in enumerate(coeffs):
        t = t * (a @ params[f"factor_{h}"])
    return t @ params[f"factor_{h_in + 1}"].T


def tucker_chain(layer: Any, params: dict, x: Any, coeffs: list[Any]) -> Any:
    """Tucker: outer product of the mode projections, then the unfolded core, then ``U_o.T``."""
    xp = namespace(x)
    h_in = len(coeffs)
    b = x.shape[0]
    z = None
    for v in [*(a @ params[f"factor_{h}"] for h, a in enumerate(coeffs)),
              _input_projection(layer, params[f"factor_{h_in}"], x)]:
        z = v if z is None else xp.reshape(z[:, :, None] * v[:, None, :], (b, -1))
    core = params["core"]
    t = z @ xp.reshape(core, (math.prod(core.shape[:-1]), core.shape[-1]))
    return t @ params[f"factor_{h_in + 1}"].T


def chain_chain(layer: Any, params: dict, x: Any, coeffs: list[Any]) -> Any:
    """TT / TR: ``[B, r, r']`` matrices of every level and the input, multiplied in order, closed by the output core."""
    xp = namespace(x)
    h_in = len(coeffs)
    b = x.shape[0]

    def matrices(core: Any, rows: Any, project: Callable) -> Any:
        r, n, s = core.shape
        unfolded = xp.reshape(xp.moveaxis(core, 1, 0), (n, r * s))  # [n, r * s]
        return xp.reshape(project(rows, unfolded), (b, r, s))

    t = None
    for h, a in enumerate(coeffs):
        m = matrices(params[f"factor_{h}"], a, lambda rows, u: rows @ u)
        t = m if t is None else t @ m
    m = matrices(params[f"factor_{h_in}"], x, lambda rows, u: _input_projection(layer, u, rows))
    t = t @ m  # [B, r_0, r_last]
    out = params[f"factor_{h_in + 1}"]  # [r_last, O, r_0]
    r_last, o, r0 = out.shape
    closing = xp.reshape(xp.moveaxis(out, 2, 0), (r0 * r_last, o))  # [r_0 * r_last, O]
    return xp.reshape(t, (b, r0 * r_last)) @ closing


#: Hand chain of each factorization, by its ``factorization.name``.
CHAINS = {"cp": cp_chain, "tucker": tucker_chain, "tt": chain_chain, "tr": chain_chain}


def limit_forward(layer: Any, params: dict, x: Any, activation: Callable, norm: Callable | None = layer_norm) -> Any:
    """The whole forward ``y[B, O]`` of ``layer`` for ``x[B, I]`` by hand: gates (``activation``), then the chain."""
    coeffs = coefficients(layer, params, x, activation, norm)
    return CHAINS[layer.factorization.name](layer, params, x, coeffs)
