"""Numerics: the documented rounding bound per dtype, dtypes kept, NaN/Inf behaviour, a million experts.

References are independent of the code under test: the dense weight tensor is
reconstructed by TensorLy in float64 NumPy from the (rounded) parameters and
contracted with NumPy's einsum.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import tensorly as tl
from helpers import BACKENDS, exact_forward, random_gates, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import tensormoe
from tensormoe.numerics import forward_error_bound, rounding_count, unit_roundoff
from tensormoe.ops import get_ops

# (backend, dtype) pairs the library supports here; float64 on JAX needs x64 mode, which the tests leave off.
DTYPES = {
    "numpy": ["float16", "float32", "float64"],
    "pytorch": ["float16", "bfloat16", "float32", "float64"],
    "jax": ["float16", "bfloat16", "float32"],
}
COMBOS = [(b, d) for b in BACKENDS for d in DTYPES[b]]
LAYERS = {
    "cp": lambda **kw: tensormoe.CPMMoE(6, 5, [4, 3], rank=3, **kw),
    "tucker": lambda **kw: tensormoe.TuckerMMoE(6, 5, [4, 3], ranks=[3, 3, 4, 3], **kw),
    "tt": lambda **kw: tensormoe.TTMMoE(6, 5, [4, 3], ranks=3, **kw),
    "tr": lambda **kw: tensormoe.TRMMoE(6, 5, [4, 3], ranks=2, bias=False, **kw),
}


# JAX compiles every new layer (about a second each on a loaded 2-core machine): there the bound is
# checked in bfloat16, for one CP-like and one chain-like network; its float32 path is the one
# tests/test_layers.py already checks against the dense forward.
BOUND_COMBOS = [c for c in COMBOS if c[0] != "jax" or c[1] == "bfloat16"]
BOUND_KINDS = {"numpy": sorted(LAYERS), "pytorch": sorted(LAYERS), "jax": ["cp", "tr"]}


@functools.cache
def cached_layer(backend, dtype, kind):
    """One layer per configuration, so that JAX compiles each forward once for all examples."""
    with tensormoe.backend_context(backend):
        return LAYERS[kind](dtype=dtype)


def reference_error(layer, params, x, coefficients):
    """Bound on the float64 reference's own rounding: TensorLy's reconstruction, then an unplanned
    ``np.einsum`` that sums all prod(N) * I products of an output entry in one loop."""
    n = rounding_count(layer, path="dense") + math.prod(layer.expert_dims) * layer.factorization.dims[-2] + 4
    return forward_error_bound(layer, params, x, coefficients, dtype="float64", n=n)


@pytest.mark.parametrize("name, dtype", BOUND_COMBOS)
@given(data=st.data(), seed=st.integers(0, 2**16), simplex=st.booleans())
def test_rounding_error_is_within_the_documented_bound(name, dtype, data, seed, simplex):
    """|apply - exact| <= gamma_n S for the factorized and the dense path, in every dtype."""
    kind = data.draw(st.sampled_from(BOUND_KINDS[name]), label="kind")
    layer = cached_layer(name, dtype, kind)
    with tensormoe.backend_context(name):
        ops = get_ops()
        rng = np.random.default_rng(seed)
        params = layer.init(seed)
        x = ops.asarray(rng.normal(size=(2, 3, layer.in_dim)), dtype)
        raw = [rng.dirichlet(np.ones(n), size=(2, 3)) if simplex else rng.normal(size=(2, 3, n))
               for n in layer.expert_dims]
        a = [ops.asarray(c, dtype) for c in raw]
        y, y_dense = to_numpy(layer.apply(params, x, a)), to_numpy(layer.dense_forward(params, x, a))
        bound = forward_error_bound(layer, params, x, a)
        bound_dense = forward_error_bound(layer, params, x, a, path="dense")
    assert np.all(np.isfinite(bound)) and np.all(np.isfinite(bound_dense))
    exact = exact_forward(layer, params, x, a)
    slack = reference_error(layer, params, x, a)
    assert np.all(np.abs(y - exact) <= bound + slack), np.max(np.abs(y - exact) / bound)
    assert np.all(np.abs(y_dense - exact) <= bound_dense + slack), np.max(np.abs(y_dense - exact) / bound_dense)
    assert np.all(np.abs(y - y_dense) <= bound + bound_dense)


def test_bound_shrinks_with_precision():
    layer = LAYERS["cp"]()
    x = np.ones((2, 6), dtype="float32")
    a = layer.coefficients(None, x)
    ratios = [forward_error_bound(layer, None, x, a, dtype=d).max() for d in ["bfloat16", "float16", "float32"]]
    assert ratios[0] > ratios[1] > ratios[2] > 0
    assert unit_roundoff("float64") == np.finfo(np.float64).eps / 2


@pytest.mark.parametrize("gate", ["entmax15", "softmax", "sparsemax"])
def test_every_output_keeps_the_layer_dtype(gate):
    """No silent promotion: outputs, coefficients, dense forward and expert slices have the layer's dtype.

    (NumPy promoted sparsemax to float64 before.  JAX is left out to keep compilations few: its type
    promotion keeps float32, and test_gates.py checks its half-precision gates keep their dtype.)
    """
    for name, dtype in COMBOS:
        if name == "jax":
            continue
        with tensormoe.backend_context(name):
            layer = tensormoe.TTMMoE(4, 3, [5, 2], ranks=2, gate=gate, dtype=dtype)
            ops = get_ops()
            x = ops.asarray(np.random.default_rng(0).normal(size=(3, 4)), dtype)
            outs = [layer(x), *layer.coefficients(None, x), layer.dense_forward(None, x),
                    layer.expert_weight(None, (1, 1))]
            assert [ops.dtype_name(o) for o in outs] == [dtype] * len(outs), (name, dtype)


# -- NaN and Inf ------------------------------------------------------------------------------




@pytest.mark.parametrize(
    "kind, gate, norm",
    [("cp", "entmax15", "layernorm"), ("tucker", "softmax", None), ("tt", "sparsemax", "layernorm"),
     ("tr", "entmax15", None)],
)
def test_non_finite_inputs_propagate_to_their_row_only(backend, kind, gate, norm):
    """Documented default: a NaN/Inf in row b of x makes every entry of output row b non-finite; other rows exact."""
    if backend == "jax" and kind in ("tucker", "tt"):
        pytest.skip("JAX: two of the four networks suffice (each new layer compiles)")
    layer = LAYERS[kind](gate=gate, gate_norm=norm, dtype="float32")
    params = random_gates(layer, 0)
    ops = get_ops()
    x = np.random.default_rng(1).normal(size=(5, 6))
    bad = x.copy()
    bad[1, 2], bad[2, 0], bad[3, 5] = np.nan, np.inf, -np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        y_bad = to_numpy(layer.apply(params, ops.asarray(bad, "float32")))
        a_bad = [to_numpy(a) for a in layer.coefficients(params, ops.asarray(bad, "float32"))]
    y = to_numpy(layer.apply(params, ops.asarray(x, "float32")))
    assert not np.any(np.isfinite(y_bad[1:4])), y_bad
    for a in a_bad:
        assert np.all(np.isnan(a[1:4])) and np.all(np.isfinite(a[[0, 4]]))
    np.testing.assert_allclose(y_bad[[0, 4]], y[[0, 4]], rtol=1e-6, atol=1e-6)


def test_nan_parameter_reaches_every_row(backend):
    layer = LAYERS["cp"](dtype="float32")
    ops = get_ops()
    params = dict(layer.params)
    params["factor_3"] = ops.asarray(np.full((5, 3), np.nan), "float32")
    y = to_numpy(layer.apply(params, ops.asarray(np.ones((4, 6)), "float32")))
    assert np.all(np.isnan(y))


def test_check_finite_accepts_finite_and_matches_unchecked(backend):
    if backend == "jax":
        pytest.skip("the checks are backend-neutral wrappers; JAX tracers are covered by the invalid-call table")
    ops = get_ops()
    x = ops.asarray(np.random.default_rng(0).normal(size=(3, 6)), "float32")
    plain, checked = LAYERS["tt"](), LAYERS["tt"](check_finite=True)
    np.testing.assert_array_equal(to_numpy(checked(x)), to_numpy(plain(x)))
    np.testing.assert_array_equal(to_numpy(checked.dense_forward(None, x)), to_numpy(plain.dense_forward(None, x)))
    for a, b in zip(checked.coefficients(None, x), plain.coefficients(None, x)):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@pytest.mark.parametrize("where", ["x", "coefficients", "params"])
def test_check_finite_names_what_is_not_finite(backend, where):
    layer = LAYERS["tucker"](check_finite=True)
    ops = get_ops()
    x = np.ones((2, 6))
    a = [np.full((2, n), 1.0 / n) for n in layer.expert_dims]
    params = dict(layer.params)
    if where == "x":
        x[1, 1] = np.inf
    elif where == "coefficients":
        a[1][0, 0] = np.nan
    else:
        params["core"] = ops.asarray(np.full(tuple(params["core"].shape), -np.inf), "float32")
    argument = {"x": "x", "coefficients": "coefficients[1]", "params": "params['core']"}[where]
    with pytest.raises(ValueError, match=rf"^{argument.replace('[', '.').replace(']', '.')} holds \d+ non-finite"):
        layer.apply(params, ops.asarray(x, "float32"), [ops.asarray(c, "float32") for c in a])


# -- a million experts ---------------------------------------------------------------------------


def million_reference(params64, x64, a64, chunk=128):
    """The CP layer through its dense weight tensor, reconstructed by TensorLy 128 first-level experts at a time."""
    xin = np.concatenate([x64, np.ones((len(x64), 1))], axis=-1)
    factors = [params64[f"factor_{k}"] for k in range(4)]
    y = 0.0
    with tensormoe.backend_context("numpy"):
        for s in range(0, 1024, chunk):
            weight = tl.cp_to_tensor((None, [factors[0][s : s + chunk], *factors[1:]]))
            y = y + np.einsum("bn,bm,bi,nmio->bo", a64[0][:, s : s + chunk], a64[1], xin, weight, optimize=True)
    return y


# JAX is left out (compiling the 1024-wide sort takes seconds); test_gates.py runs 2**20 experts on it.
MILLION = [(b, "float32") for b in BACKENDS if b != "jax"] + [
    (b, d) for b, d in [("numpy", "float16"), ("pytorch", "float16"), ("pytorch", "bfloat16")] if b in BACKENDS
]


@pytest.mark.parametrize("name, dtype", MILLION)
def test_a_million_experts_neither_overflow_nor_underflow(name, dtype):
    """expert_dims=[1024, 1024]: each level's coefficients stay on the simplex and the output is exact to the bound.

    The factorized forward mixes each level separately, so the per-expert weight
    a_1[n_1] a_2[n_2] (about 1e-6, subnormal in float16) is never formed.
    """
    n = 1024
    with tensormoe.backend_context(name):
        ops = get_ops()
        layer = tensormoe.CPMMoE(8, 4, [n, n], rank=4, dtype=dtype)
        params = random_gates(layer, 0)
        x = ops.asarray(np.random.default_rng(1).normal(size=(3, 8)), dtype)
        a = layer.coefficients(params, x)
        y = to_numpy(layer.apply(params, x))
        bound = forward_error_bound(layer, params, x, a)
    a64 = [to_numpy(c) for c in a]
    # each coefficient is rounded once to `dtype` after a float32 computation over n entries
    tolerance = unit_roundoff(dtype) + (n + 10) * unit_roundoff("float32")
    for c in a64:
        assert np.all(np.isfinite(c)) and np.all(c >= 0) and np.all(c.max(-1) > 0)
        np.testing.assert_array_less(np.abs(c.sum(-1) - 1), tolerance)
    assert np.all(np.isfinite(y))
    if dtype == "float32":  # n u < 1: the rounding bound applies (low precisions have no bound at this size)
        reference = million_reference({k: to_numpy(v) for k, v in params.items()}, to_numpy(x), a64)
        # the chunked reference sums 128 x 1024 x 9 products per chunk, then 8 chunks
        slack = forward_error_bound(layer, params, x, a, dtype="float64", n=128 * n * 9 + 8 + 4 + 6)
        assert np.all(np.abs(y - reference) <= bound + slack)
