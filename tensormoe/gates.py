"""Gate activations: expert coefficients from logits, written once for every backend.

Each activation maps logits ``z[..., N]`` to coefficients on the probability
simplex (non-negative, summing to one over the last axis):

* :func:`softmax` — dense, ``exp(z) / sum(exp(z))``;
* :func:`entmax15` — 1.5-entmax (Peters, Niculae & Martins 2019), sparse, the
  reference MMoE's default, computed exactly by sorting;
* :func:`sparsemax` — Euclidean projection onto the simplex (Martins & Astudillo 2016).

All three subtract the row maximum first, so large logits neither overflow nor
lose the support.  :func:`layer_norm` is the optional normalisation of the
logits before the activation (LayerNorm without affine parameters).
"""

from __future__ import annotations

from typing import Any

from .ops import Ops, get_ops

__all__ = ["ACTIVATIONS", "NORMS", "entmax15", "layer_norm", "sparsemax", "softmax"]


def softmax(z: Any, ops: Ops | None = None) -> Any:
    """Softmax over the last axis.

    Examples
    --------
    >>> import numpy as np
    >>> softmax(np.array([0.0, 0.0])).tolist()
    [0.5, 0.5]
    """
    ops = ops or get_ops()
    e = ops.exp(z - ops.max(z))
    return e / ops.sum(e)


def _shifted(z: Any, ops: Ops, scale: float) -> Any:
    """``scale * (z - max z)`` clipped below at -2.

    For sparsemax and 1.5-entmax the threshold satisfies ``tau >= max - 1``, so
    entries below ``-1`` are never in the support; clipping them at ``-2`` leaves
    the result unchanged and keeps the squares and cumulative sums below finite
    for any logits (no ``inf - inf``).
    """
    return ops.clip_min((z - ops.max(z)) * scale, -2.0)


def _sorted_support(z: Any, ops: Ops) -> tuple[Any, Any]:
    """Logits sorted in descending order and the ranks ``1..N`` in their dtype."""
    return ops.sort_descending(z), ops.arange_like(z, 1, z.shape[-1] + 1)


def entmax15(z: Any, ops: Ops | None = None) -> Any:
    """1.5-entmax over the last axis: ``p = relu(z/2 - tau)**2`` with ``sum(p) = 1``.

    The threshold ``tau`` is found exactly from the sorted logits; coefficients of
    experts below it are exactly zero.

    Examples
    --------
    >>> import numpy as np
    >>> entmax15(np.array([0.0, 0.0])).round(6).tolist()
    [0.5, 0.5]
    >>> entmax15(np.array([10.0, 0.0])).round(6).tolist()
    [1.0, 0.0]
    """
    ops = ops or get_ops()
    z = _shifted(z, ops, 0.5)
    zs, k = _sorted_support(z, ops)
    mean = ops.cumsum(zs) / k
    mean_sq = ops.cumsum(zs * zs) / k
    ss = k * (mean_sq - mean * mean)
    delta = (1 - ss) / k
    # sqrt(relu(delta)), with a finite gradient where delta <= 0: those entries are never
    # the threshold, but a plain sqrt would send 0 * inf = NaN back through them on JAX
    positive = delta > 0
    tau = mean - ops.where(positive, ops.sqrt(ops.where(positive, delta, 1.0)), 0.0)
    support = ops.count_true(tau <= zs)
    tau_star = ops.take_last(tau, support - 1)
    p = ops.relu(z - tau_star)
    return p * p


def sparsemax(z: Any, ops: Ops | None = None) -> Any:
    """Sparsemax over the last axis: the Euclidean projection of ``z`` onto the simplex.

    Examples
    --------
    >>> import numpy as np
    >>> sparsemax(np.array([0.5, 0.0, -3.0])).tolist()
    [0.75, 0.25, 0.0]
    """
    ops = ops or get_ops()
    z = _shifted(z, ops, 1.0)
    zs, k = _sorted_support(z, ops)
    cs = ops.cumsum(zs)
    support = ops.count_true(1 + k * zs > cs)
    # divide by the support size in z's dtype: an integer count would promote float32 to float64 on NumPy
    tau = (ops.take_last(cs, support - 1) - 1) / ops.asarray(support, ops.dtype_name(z))
    return ops.relu(z - tau)


def layer_norm(z: Any, eps: float = 1e-5, ops: Ops | None = None) -> Any:
    """Normalise the last axis to zero mean and unit variance (LayerNorm without affine).

    Examples
    --------
    >>> import numpy as np
    >>> [round(v, 3) for v in layer_norm(np.array([1.0, 3.0])).tolist()]
    [-1.0, 1.0]
    """
    ops = ops or get_ops()
    centred = z - ops.mean(z)
    return centred / ops.sqrt(ops.mean(centred * centred) + eps)


ACTIVATIONS = {"softmax": softmax, "entmax15": entmax15, "sparsemax": sparsemax}
"""Gate activations by name: the values accepted by the layers' ``gate=`` argument.

Examples
--------
>>> sorted(ACTIVATIONS)
['entmax15', 'softmax', 'sparsemax']
>>> ACTIVATIONS["entmax15"] is entmax15
True
"""

NORMS = {None: None, "layernorm": layer_norm}
"""Logit normalisations by name (``None`` for none): the layers' ``gate_norm=`` values.

Examples
--------
>>> list(NORMS)
[None, 'layernorm']
"""
