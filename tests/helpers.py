"""Helpers shared by the tests: installed backends, conversion, rounding tolerances."""

from __future__ import annotations

import contextlib

import numpy as np

import tensormoe
from tensormoe.ops import get_ops, ops_for_array

#: Backends whose framework is installed here.
BACKENDS = tensormoe.available_backends()


def to_numpy(x):
    """Any backend's array as a float64 NumPy array."""
    name = ops_for_array(x)
    return get_ops(name).to_numpy(x).astype(np.float64) if name else np.asarray(x, dtype=np.float64)


EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def rounding_tolerance(layer, params_np, x_np, coeffs_np, dtype="float32"):
    """Elementwise bound on the rounding difference of two evaluations of the layer.

    Both the factorized and the dense forward compute the same multilinear
    polynomial in the operands, only summing its terms in another order.  For a
    sum of products evaluated in floating point, the error is at most
    ``n * eps * sum(|terms|)`` (first order), where ``n`` bounds the number of
    roundings on any term's way to the result.  ``sum(|terms|)`` is the same
    contraction over absolute values, computed here in float64; ``n`` is bounded by
    the total length of all contracted axes plus the number of operands, and the
    factor 2 covers the two evaluations being compared.
    """
    f = layer.factorization
    import opt_einsum

    ops_abs = [np.abs(a) for a in coeffs_np]
    x_abs = np.abs(x_np)
    if layer.bias:
        x_abs = np.concatenate([x_abs, np.ones((*x_abs.shape[:-1], 1))], axis=-1)
    operands = [*ops_abs, x_abs] + [np.abs(params_np[n]) for n in f.network()]
    bound = opt_einsum.contract(f.forward_equation(), *operands)
    n_round = sum(f.dims) + sum(s for shape in f.param_shapes().values() for s in shape) + len(operands)
    return 2 * n_round * EPS[dtype] * bound + np.finfo(np.float64).tiny


def exact_forward(layer, params, x, coefficients):
    """The layer's output in float64 from the given (rounded) operands: TensorLy reconstruction + einsum."""
    params64 = {k: to_numpy(v) for k, v in params.items()}
    with tensormoe.backend_context("numpy"):
        weight = layer.factorization.to_dense(params64)
    x64 = to_numpy(x).reshape(-1, layer.in_dim)
    if layer.bias:
        x64 = np.concatenate([x64, np.ones((len(x64), 1))], axis=-1)
    a64 = [to_numpy(a).reshape(len(x64), -1) for a in coefficients]
    y = np.einsum(layer.factorization.dense_equation(), *a64, x64, weight)
    return y.reshape(*x.shape[:-1], layer.out_dim)


def random_gates(layer, seed):
    """The layer's parameters with random gate weights, so that the coefficients differ between rows.

    The factors keep their initial values, which are structured (TT/TR expert cores ``eye * c``,
    later levels all ones): see :func:`random_params` for parameters that expose every bond.
    """
    rng = np.random.default_rng(seed)
    ops = get_ops()
    params = dict(layer.params)
    for h, n in enumerate(layer.expert_dims):
        params[f"gate_{h}"] = ops.asarray(rng.normal(size=(layer.in_dim, n)), layer.dtype)
    return params


def random_params(layer, seed):
    """Every parameter of the layer drawn at random (factors, Tucker core, gates), on the current backend.

    The initial factors are symmetric in their bonds (``eye(r) * c`` expert cores, ones on later
    levels), so a transposed core or a ring closed on the wrong bond computes the same thing at
    init; independent normal values make every index of every parameter matter.
    """
    rng = np.random.default_rng(seed)
    ops = get_ops()
    return {name: ops.asarray(rng.normal(size=shape), layer.dtype) for name, shape in layer.param_shapes().items()}


def parameter_sets(layer, seed):
    """Both kinds of parameters a forward property is checked with: ``{"init": ..., "random": ...}``."""
    return {"init": random_gates(layer, seed), "random": random_params(layer, seed)}


@contextlib.contextmanager
def float64_on(backend):
    """Inside: float64 arrays work on ``backend`` (JAX's 64-bit mode on for the block only; the JAX tests keep it off)."""
    if backend != "jax":
        yield
        return
    import jax

    with jax.enable_x64(True):
        yield
