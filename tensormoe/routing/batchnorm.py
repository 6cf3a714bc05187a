"""Batch normalisation of gate logits, the reference MMoE implementation's default (``gate_norm="batchnorm"``).

Each expert ``n`` of a level is one channel: its logits ``z[..., n]`` are
normalised with statistics over every leading axis (all ``M`` rows, tokens
included), as ``torch.nn.BatchNorm1d(N, affine=False)`` does on the reference's
``[B, N, T]`` logits, with PyTorch's defaults (``momentum=0.1``, ``eps=1e-5``):

* training: ``z' = (z - mu) / sqrt(s2 + eps)`` with the batch mean ``mu[n]`` and
  the biased batch variance ``s2[n]``; the running statistics move towards the
  batch's, ``mean <- (1 - momentum) mean + momentum mu`` and
  ``var <- (1 - momentum) var + momentum s2 M / (M - 1)`` (the unbiased
  variance), and the batch count grows by one.  Gradients flow through ``mu`` and
  ``s2``, never into the running statistics.  One row (``M = 1``) has no
  variance: it is refused, as PyTorch refuses it.
* evaluation: ``z' = (z - mean) / sqrt(var + eps)`` with the running statistics,
  unchanged.  Each row's coefficients then no longer depend on the rest of its
  batch.

The function is pure: the state (:class:`BatchNormState`) goes in and the
updated state comes out, so the same code serves NumPy, PyTorch (whose modules
keep it in buffers) and JAX (where it is passed explicitly, also under
``jax.jit``).  Half-precision logits are normalised in float32 and cast back;
the state keeps its own dtype.

Examples
--------
>>> import numpy as np
>>> z = np.array([[1.0, 0.0], [3.0, 0.0]])
>>> out, state = batch_norm(z, batch_norm_state(2, "float64"), training=True)
>>> out.round(3).tolist()
[[-1.0, 0.0], [1.0, 0.0]]
>>> state.mean.tolist(), state.var.tolist(), int(state.count)
([0.2, 0.0], [1.1, 0.9], 1)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from collections.abc import Mapping, Sequence

from .._array import dtype_name
from ..frameworks import Ops, get_ops
from ..validation import check_array, check_bool, check_positive_real, describe
from .gates import activate
from .levels import level_params
from .routers import DenseRouter

__all__ = ["EPS", "MOMENTUM", "BatchNormState", "batch_norm", "batch_norm_state", "gate_coefficients"]

MOMENTUM = 0.1
"""The weight of each batch in the running statistics (PyTorch's and the reference's default).

Examples
--------
>>> MOMENTUM
0.1
"""

EPS = 1e-5
"""Added to the variance before its square root (PyTorch's and the reference's default).

Examples
--------
>>> EPS
1e-05
"""


class BatchNormState(NamedTuple):
    """The running statistics of one expert level: a pytree of three arrays.

    Attributes
    ----------
    mean : array ``[N]``
        Running mean of each expert's logit (PyTorch's ``running_mean``).
    var : array ``[N]``
        Running unbiased variance (``running_var``).
    count : integer array ``[]``
        Training batches seen (``num_batches_tracked``); with a fixed momentum it
        does not enter the computation, but it is kept and saved.

    Examples
    --------
    >>> s = batch_norm_state(3, "float32")
    >>> s.mean.tolist(), s.var.tolist(), int(s.count)
    ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 0)
    """

    mean: Any
    var: Any
    count: Any


def batch_norm_state(n: int, dtype: str = "float32", ops: Ops | None = None, like: Any = None) -> BatchNormState:
    """Fresh running statistics for ``n`` experts: mean 0, variance 1, count 0 (as a new ``BatchNorm1d``).

    Parameters
    ----------
    n : int
        Experts of the level.
    dtype : str
        Floating-point dtype of ``mean`` and ``var``.
    ops : Ops, optional
        The backend's operations (default: the current backend's).
    like : array, optional
        An array whose device the state shares.

    Examples
    --------
    >>> batch_norm_state(2, "float64").var
    array([1., 1.])
    """
    ops = get_ops() if ops is None else ops
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer (the experts of the level); got {describe(n)}")
    zeros = ops.asarray([0.0] * n, dtype, like=like)
    return BatchNormState(zeros, zeros + 1, ops.asarray(0, like=like))


def batch_norm(
    z: Any,
    state: BatchNormState,
    *,
    training: bool,
    momentum: float = MOMENTUM,
    eps: float = EPS,
    ops: Ops | None = None,
) -> tuple[Any, BatchNormState]:
    """Normalise each expert's logits over the rows; return them and the state after this call.

    Parameters
    ----------
    z : array ``[..., N]``
        Logits of one level; every leading axis is a row (``M`` rows in all).
    state : BatchNormState
        Running statistics of the ``N`` experts (:func:`batch_norm_state` for fresh ones).
    training : bool
        Normalise with the batch statistics and update the state (``True``), or
        with the running statistics, leaving the state as it is (``False``).
    momentum : float
        Weight of the batch in the updated running statistics, in ``[0, 1]``.
    eps : float
        Added to the variance before its square root.
    ops : Ops, optional
        The backend's operations (default: the current backend's).

    Returns
    -------
    out : array ``[..., N]``
        The normalised logits, of ``z``'s dtype.
    state : BatchNormState
        The updated statistics in training, ``state`` itself in evaluation.

    Raises
    ------
    ValueError
        In training with a single row (``M = 1``), whose variance is undefined; or if
        ``state`` does not hold ``N`` statistics.

    Examples
    --------
    In evaluation the running statistics normalise each row on its own:

    >>> import numpy as np
    >>> state = BatchNormState(np.array([1.0, -1.0]), np.array([4.0, 1.0]), np.array(7))
    >>> out, same = batch_norm(np.array([[3.0, -1.0]]), state, training=False, eps=0.0)
    >>> out.tolist(), same is state
    ([[1.0, 0.0]], True)
    """
    ops = get_ops() if ops is None else ops
    if not isinstance(ops, Ops):
        raise TypeError(f"ops must be a tensormoe Ops (from get_ops()) or None; got {describe(ops)}")
    check_array(z, ops, "z")
    training = check_bool(training, "training")
    momentum = check_positive_real(momentum, "momentum", allow_zero=True)
    if momentum > 1:
        raise ValueError(f"momentum must be in [0, 1]; got {momentum}")
    eps = check_positive_real(eps, "eps", allow_zero=True)
    if not isinstance(state, BatchNormState):
        raise TypeError(f"state must be a BatchNormState (from batch_norm_state()); got {describe(state)}")
    n = z.shape[-1]
    for field in ("mean", "var"):
        shape = tuple(getattr(getattr(state, field), "shape", ()))
        if shape != (n,):
            raise ValueError(f"state.{field} must have shape ({n},), one entry per expert of z; got {shape}")
    rows = math.prod(z.shape[:-1])
    if training and rows <= 1:
        raise ValueError(
            f"batch_norm in training needs more than one row per expert to estimate a variance; got z of shape "
            f"{tuple(z.shape)} ({rows} row); expected at least 2 rows, or training=False"
        )
    xp = ops.xp
    half = dtype_name(z) in ("float16", "bfloat16")
    work = xp.astype(z, xp.float32) if half else z
    stats_dtype = state.mean.dtype
    if training:
        axes = tuple(range(len(z.shape) - 1))
        mean = xp.mean(work, axis=axes)
        centred = work - mean
        var = xp.mean(centred * centred, axis=axes)
        out = centred / xp.sqrt(var + eps)
        batch_mean = xp.astype(ops.stop_gradient(mean), stats_dtype)
        batch_var = xp.astype(ops.stop_gradient(var), stats_dtype) * (rows / (rows - 1))
        state = BatchNormState(
            (1 - momentum) * state.mean + momentum * batch_mean,
            (1 - momentum) * state.var + momentum * batch_var,
            state.count + 1,
        )
    else:
        mean, var = xp.astype(state.mean, work.dtype), xp.astype(state.var, work.dtype)
        out = (work - mean) / xp.sqrt(var + eps)
    return (xp.astype(out, z.dtype) if half else out), state


def gate_coefficients(
    ops: Ops,
    routers: Sequence[Any],
    params: Mapping[str, Any],
    in_dim: int,
    expert_dims: Sequence[int],
    x: Any,
    states: Sequence[BatchNormState],
    *,
    training: bool,
) -> tuple[list[Any], tuple[BatchNormState, ...]]:
    """Each level's coefficients ``activation(batch_norm(x @ gate_h))`` and the levels' states after the call.

    The BatchNorm-gated MMoE's gating: ``routers`` are the layer's dense routers
    (without a normalisation of their own), ``params`` the layer's parameters
    (``gate_h``, or ``gate_down_h`` and ``gate_up_h``), ``x[..., in_dim]`` the
    input whose rows (every leading axis) form the batch.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.frameworks import get_ops
    >>> ops, router = get_ops("numpy"), DenseRouter("softmax", norm=None)
    >>> params = {"gate_0": np.array([[1.0, 0.0], [0.0, 0.0]])}
    >>> (a,), (state,) = gate_coefficients(ops, [router], params, 2, [2], np.array([[2.0, 0.0], [4.0, 0.0]]),
    ...                                    [batch_norm_state(2, "float64", ops)], training=False)
    >>> a.round(3).tolist(), state.count.tolist()
    ([[0.881, 0.119], [0.982, 0.018]], 0)
    """
    if len(states) != len(expert_dims):
        raise ValueError(f"states must hold one BatchNormState per level ({len(expert_dims)}); got {len(states)}")
    coefficients, updated = [], []
    for h, (router, p, state) in enumerate(zip(routers, level_params(routers, params, in_dim, expert_dims), states)):
        if type(router) is not DenseRouter or router.norm is not None:
            raise ValueError(
                f"routers[{h}]={router!r} cannot take a BatchNorm of its logits; expected a DenseRouter with norm=None"
            )
        logits, state = batch_norm(router.project(p, "gate", x), state, training=training, ops=ops)
        coefficients.append(activate(router.activation, logits, ops))
        updated.append(state)
    return coefficients, tuple(updated)
