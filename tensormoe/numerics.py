"""Rounding-error bounds of the factorized forward pass, for every floating-point dtype.

The factorized forward (:meth:`~tensormoe.MMoE.apply`) and the dense reference
(:meth:`~tensormoe.MMoE.dense_forward`) compute the same multilinear polynomial of
the coefficients, the input and the factors; they only sum its terms in another
order.  With the standard model of floating-point arithmetic
(``fl(a op b) = (a op b)(1 + d)``, ``|d| <= u``, the unit roundoff of the dtype),
every term of an output entry passes through at most ``n`` roundings, so
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2002, Lemma 3.1)::

    |y_computed - y_exact| <= gamma_n * S,   gamma_n = n u / (1 - n u),

where ``S`` is the same contraction over the absolute values of the operands
and ``y_exact`` the exact result for the same (rounded) operands.  Two
evaluations (factorized and dense) therefore differ by at most ``2 gamma_n S``.
``n`` is counted generously: the sizes of all modes, plus all axis lengths of
all parameters, plus the number of operands.  The bound assumes no overflow and
no underflow into subnormals; it holds whatever the summation order, blocking
or accumulation precision of the framework (a wider accumulator only removes
roundings).

Examples
--------
>>> unit_roundoff("bfloat16") == 2.0 ** -8
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import opt_einsum

from .validation import check_dtype, check_params, describe

__all__ = ["UNIT_ROUNDOFF", "forward_error_bound", "rounding_count", "unit_roundoff"]

#: Unit roundoff ``u`` (half the machine epsilon) of each floating-point dtype.
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


def unit_roundoff(dtype: Any) -> float:
    """The unit roundoff ``u`` of ``dtype``: every rounding has relative error at most ``u``.

    Examples
    --------
    >>> unit_roundoff("float32")
    5.960464477539063e-08
    """
    return UNIT_ROUNDOFF[check_dtype(dtype)]


def rounding_count(layer: Any) -> int:
    """``n``: a bound on the roundings any term of an output entry goes through, in either forward path.

    Examples
    --------
    >>> import tensormoe
    >>> rounding_count(tensormoe.CPMMoE(4, 3, [5], rank=2))  # (5+5+3) + (7+7+5) + 5
    37
    """
    f = layer.factorization
    shapes = f.param_shapes().values()
    operands = layer.hierarchy + 1 + len(shapes)
    return sum(f.dims) + sum(sum(shape) for shape in shapes) + operands


def _as_float64(x: Any) -> np.ndarray:
    from .ops import get_ops, ops_for_array

    name = ops_for_array(x)
    if name is None:
        raise TypeError(f"expected an array of any backend; got {describe(x)}")
    return get_ops(name).to_numpy(x).astype(np.float64)


def forward_error_bound(
    layer: Any,
    params: Mapping[str, Any] | None,
    x: Any,
    coefficients: Sequence[Any],
    dtype: Any = None,
) -> np.ndarray:
    """Elementwise bound ``gamma_n * S`` on the rounding error of the layer's output.

    Parameters
    ----------
    layer : MMoE
        The layer.
    params : mapping or None
        Its parameters (``None``: the layer's own), of any backend.
    x : array ``[..., in_dim]``
        The input, of any backend.
    coefficients : list of arrays ``[..., N_h]``
        The expert coefficients the forward used (e.g. from
        :meth:`~tensormoe.MMoE.coefficients`), of any backend.
    dtype : str, optional
        The dtype the forward ran in (default: the layer's).

    Returns
    -------
    numpy.ndarray ``[..., out_dim]``, float64
        ``|y_computed - y_exact| <= bound`` entrywise, for ``apply`` and for
        ``dense_forward`` alike; they differ from each other by at most twice
        the bound.  ``inf`` where ``n u >= 1`` (no bound from this analysis).

    Examples
    --------
    >>> import numpy as np, tensormoe
    >>> layer = tensormoe.TTMMoE(4, 3, [5], ranks=2)
    >>> x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    >>> a = layer.coefficients(None, x)
    >>> y, y_dense = layer(x, a), layer.dense_forward(None, x, a)
    >>> bool(np.all(np.abs(y - y_dense) <= 2 * forward_error_bound(layer, None, x, a)))
    True
    """
    f = layer.factorization
    params = layer.params if params is None else params
    check_params(params, f.param_shapes(), exact=False)
    u = unit_roundoff(layer.dtype if dtype is None else dtype)
    x64 = _as_float64(x)
    lead = x64.shape[:-1]
    rows = int(np.prod(lead, dtype=np.int64))
    x_abs = np.abs(x64).reshape(rows, -1)
    if layer.bias:
        x_abs = np.concatenate([x_abs, np.ones((rows, 1))], axis=-1)
    coeffs = [np.abs(_as_float64(a)).reshape(rows, n) for a, n in zip(coefficients, layer.expert_dims)]
    operands = [*coeffs, x_abs, *(np.abs(_as_float64(params[name])) for name in f.network())]
    s = opt_einsum.contract(f.forward_equation(), *operands).reshape(*lead, layer.out_dim)
    nu = rounding_count(layer) * u
    gamma = nu / (1 - nu) if nu < 1 else np.inf
    return gamma * s
