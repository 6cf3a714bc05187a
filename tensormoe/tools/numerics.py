"""Rounding-error bounds of the factorized forward pass, for every floating-point dtype.

The factorized forward (:meth:`~tensormoe.layers.MMoE.apply`) and the dense reference
(:meth:`~tensormoe.layers.MMoE.dense_forward`) compute the same multilinear polynomial of
the coefficients, the input and the factors; they only sum its terms in another
order.  With the standard model of floating-point arithmetic
(``fl(a op b) = (a op b)(1 + d)``, ``|d| <= u``, the unit roundoff of the dtype),
if every term of an output entry passes through at most ``n`` roundings then
(Higham, *Accuracy and Stability of Numerical Algorithms*, 2002, Lemma 3.1)::

    |y_computed - y_exact| <= gamma_n * S,   gamma_n = n u / (1 - n u),

where ``S`` is the same contraction over the absolute values of the operands
and ``y_exact`` the exact result for the same (rounded) operands.

``n`` is counted from the contraction path the layer actually runs: a pairwise
step that sums ``m`` products (``m`` = the product of the sizes of the indices it
eliminates) costs each term at most ``m - 1`` additions and one multiplication,
whatever the summation order, blocking or accumulator width of the framework
(a wider accumulator only removes roundings).  The dense path adds the
reconstruction of ``W`` (each rank index summed once, one multiplication per
factor).  The bound assumes no overflow and no underflow into subnormals.

Examples
--------
>>> unit_roundoff("bfloat16") == 2.0 ** -8
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import opt_einsum

from .._array import backend_of, to_numpy
from ..backend import get_backend
from ..network.contraction import get_plan
from ..validation import check_dtype, check_params, describe

__all__ = ["UNIT_ROUNDOFF", "forward_error_bound", "rounding_count", "unit_roundoff"]

#: Unit roundoff ``u`` (half the machine epsilon) of each floating-point dtype.
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}
"""Unit roundoff ``u = 2**-p`` of each float dtype (``p`` significand bits).

Examples
--------
>>> UNIT_ROUNDOFF["float32"] == 2.0**-24
True
"""


def unit_roundoff(dtype: Any) -> float:
    """The unit roundoff ``u`` of ``dtype``: every rounding has relative error at most ``u``.

    Examples
    --------
    >>> unit_roundoff("float32")
    5.960464477539063e-08
    """
    return UNIT_ROUNDOFF[check_dtype(dtype)]


def rounding_count(layer: Any, rows: int = 1, path: str = "factorized") -> int:
    """``n``: the most roundings any term of an output entry goes through on ``path``.

    Parameters
    ----------
    layer : MMoE
        The layer.
    rows : int
        Rows of the input batch (the contraction path may depend on it).
    path : {"factorized", "dense"}
        :meth:`~tensormoe.layers.MMoE.apply`, or :meth:`~tensormoe.layers.MMoE.dense_forward`
        (which also reconstructs ``W``).

    Examples
    --------
    >>> import tensormoe
    >>> layer = tensormoe.CPMMoE(4, 3, [5], rank=2)
    >>> rounding_count(layer), rounding_count(layer, path="dense")
    (13, 31)
    """
    f = layer.factorization
    rows = max(int(rows), 1)
    inputs = [(rows, n) for n in layer.expert_dims] + [(rows, f.dims[-2])]
    if path == "factorized":
        return _contraction_count(layer, f.forward_equation(), inputs + list(f.param_shapes().values()))
    if path != "dense":
        raise ValueError(f"path={path!r} is not a forward path; expected 'factorized' or 'dense'")
    modes = {f.mode_symbol(k) for k in range(f.order)}
    sizes = {}
    for letters, shape in zip(f.network().values(), f.param_shapes().values()):
        sizes.update(zip(letters, shape))
    reconstruction = sum(size for letter, size in sizes.items() if letter not in modes) + f.order
    return reconstruction + _contraction_count(layer, f.dense_equation(), [*inputs, tuple(f.dims)])


def _contraction_count(layer: Any, equation: str, shapes: list[tuple[int, ...]]) -> int:
    """Sum over the planned pairwise steps of the number of products each step sums."""
    plan = get_plan(equation, *shapes, backend=get_backend(), dtype=layer.dtype, optimize=layer.optimize)
    _, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=plan.path)
    size = {}
    for term, shape in zip(equation.split("->")[0].split(","), shapes):
        size.update(zip(term, shape))
    return sum(math.prod(size[i] for i in step[1]) for step in info.contraction_list)


def _as_float64(x: Any) -> np.ndarray:
    if backend_of(x) is None:
        raise TypeError(f"expected an array of any backend; got {describe(x)}")
    return to_numpy(x).astype(np.float64)


def forward_error_bound(
    layer: Any,
    params: Mapping[str, Any] | None,
    x: Any,
    coefficients: Sequence[Any],
    dtype: Any = None,
    path: str = "factorized",
    n: int | None = None,
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
        :meth:`~tensormoe.layers.MMoE.coefficients`), of any backend.
    dtype : str, optional
        The dtype the forward ran in (default: the layer's).
    path : {"factorized", "dense"}
        Bound the error of :meth:`~tensormoe.layers.MMoE.apply` or of
        :meth:`~tensormoe.layers.MMoE.dense_forward`.
    n : int, optional
        The rounding count to use instead of :func:`rounding_count` (e.g. for
        a reference computed another way).

    Returns
    -------
    numpy.ndarray ``[..., out_dim]``, float64
        ``|y_computed - y_exact| <= bound`` entrywise.  ``apply`` and
        ``dense_forward`` differ by at most the sum of their two bounds.
        ``inf`` where ``n u >= 1`` (no bound from this analysis).

    Examples
    --------
    >>> import numpy as np, tensormoe
    >>> layer = tensormoe.TTMMoE(4, 3, [5], ranks=2)
    >>> x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
    >>> a = layer.coefficients(None, x)
    >>> y, y_dense = layer(x, a), layer.dense_forward(None, x, a)
    >>> bound = forward_error_bound(layer, None, x, a) + forward_error_bound(layer, None, x, a, path="dense")
    >>> bool(np.all(np.abs(y - y_dense) <= bound))
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
    nu = (rounding_count(layer, rows, path) if n is None else n) * u
    gamma = nu / (1 - nu) if nu < 1 else np.inf
    return gamma * s
