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

Non-finite logits: a logit of ``-inf`` gives its expert a coefficient of exactly
zero (a mask), as long as the row has a finite logit; a row holding ``NaN`` or
``+inf``, or only ``-inf``, gives a row of ``NaN`` coefficients.  Rows never
affect each other.

Precision: half-precision logits (``float16``, ``bfloat16``) are normalised and
activated in ``float32`` and the result is cast back, as MoE routers commonly do
(the Switch Transformer's "selective precision"): sums over many experts and the
squares in :func:`layer_norm` neither lose the simplex nor overflow ``float16``.
The result always has the dtype of the logits.
"""

from __future__ import annotations

from typing import Any

from .ops import Ops, get_ops
from .validation import array_dtype, check_array, check_positive_real, describe

__all__ = ["ACTIVATIONS", "NORMS", "entmax15", "layer_norm", "sparsemax", "softmax"]


def _checked_ops(z: Any, ops: Any) -> Ops:
    """The ops to use for logits ``z``, after checking ``z`` (an array of at least one expert)."""
    if ops is None:
        ops = get_ops()
    elif not isinstance(ops, Ops):
        raise TypeError(f"ops must be a tensormoe.ops.Ops (from get_ops()) or None; got {describe(ops)}")
    check_array(z, ops, "z")
    if z.shape[-1] < 1:
        raise ValueError(f"z must have at least one entry (expert) on its last axis; got shape {tuple(z.shape)}")
    return ops


def _run(body: Any, z: Any, ops: Any, *args: Any) -> Any:
    """``body(z, ops, *args)`` after checking ``z``; half precision runs in float32 and is cast back."""
    ops = _checked_ops(z, ops)
    if array_dtype(z) in ("float16", "bfloat16"):
        return ops.cast_like(body(ops.cast(z, "float32"), ops, *args), z)
    return body(z, ops, *args)


def softmax(z: Any, ops: Ops | None = None) -> Any:
    """Softmax over the last axis.

    Parameters
    ----------
    z : array ``[..., N]``
        Floating-point logits of the current backend (or of ``ops``), ``N >= 1``.
    ops : Ops, optional
        The backend's operations (default: the current backend's).

    Examples
    --------
    >>> import numpy as np
    >>> softmax(np.array([0.0, 0.0])).tolist()
    [0.5, 0.5]
    """
    return _run(_softmax, z, ops)


def _softmax(z: Any, ops: Ops) -> Any:
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


def _support_size(condition: Any, ops: Ops) -> Any:
    """How many sorted entries are in the support, at least one (a NaN row has none; its result stays NaN)."""
    return ops.clip_min(ops.count_true(condition), 1)


def _nan_if_any_nan(tau: Any, z: Any, ops: Ops) -> Any:
    """``tau``, made NaN on rows where the shifted logits ``z`` hold a NaN (else exactly unchanged).

    After the shift a row holds NaN exactly when its logits held NaN or ``+inf``;
    sorting moves those NaNs aside, which would leave the other entries finite
    but meaningless.  ``0 * sum(z)`` is 0 on finite rows (``z`` is clipped below)
    and NaN otherwise, so such rows come out entirely NaN, as documented.
    """
    return tau + 0 * ops.sum(z)


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
    return _run(_entmax15, z, ops)


def _entmax15(z: Any, ops: Ops) -> Any:
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
    support = _support_size(tau <= zs, ops)
    tau_star = _nan_if_any_nan(ops.take_last(tau, support - 1), z, ops)
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
    return _run(_sparsemax, z, ops)


def _sparsemax(z: Any, ops: Ops) -> Any:
    z = _shifted(z, ops, 1.0)
    zs, k = _sorted_support(z, ops)
    cs = ops.cumsum(zs)
    support = _support_size(1 + k * zs > cs, ops)
    # divide by the support size in z's dtype (an integer count would promote
    # float32 to float64 on NumPy)
    tau = (ops.take_last(cs, support - 1) - 1) / ops.cast_like(support, z)
    return ops.relu(z - _nan_if_any_nan(tau, z, ops))


def layer_norm(z: Any, eps: float = 1e-5, ops: Ops | None = None) -> Any:
    """Normalise the last axis to zero mean and unit variance (LayerNorm without affine).

    Examples
    --------
    >>> import numpy as np
    >>> [round(v, 3) for v in layer_norm(np.array([1.0, 3.0])).tolist()]
    [-1.0, 1.0]
    """
    return _run(_layer_norm, z, ops, check_positive_real(eps, "eps", allow_zero=True))


def _layer_norm(z: Any, ops: Ops, eps: float) -> Any:
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
