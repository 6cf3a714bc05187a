"""Gates: on the simplex, equal to independent references, stable, and equal across backends."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKENDS, to_numpy
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import tensormoe
from tensormoe import gates
from tensormoe.ops import get_ops

logits = st.tuples(st.integers(1, 4), st.integers(1, 9)).flatmap(
    lambda shape: arrays(np.float64, shape, elements=st.floats(-30, 30, allow_nan=False, width=64))
)


def bisection_reference(z, alpha):
    """alpha-entmax by bisection on the threshold (Blondel et al. 2019), an independent algorithm.

    alpha=2 is sparsemax; alpha=1.5 is 1.5-entmax: p = relu((alpha-1) z - tau) ** (1/(alpha-1)).
    """
    z = np.asarray(z, dtype=np.float64)
    z = (alpha - 1) * (z - z.max(-1, keepdims=True))
    lo, hi = np.full(z.shape[:-1] + (1,), -1.0), np.zeros(z.shape[:-1] + (1,))
    for _ in range(200):
        tau = (lo + hi) / 2
        mass = (np.maximum(z - tau, 0) ** (1 / (alpha - 1))).sum(-1, keepdims=True)
        lo = np.where(mass >= 1, tau, lo)
        hi = np.where(mass >= 1, hi, tau)
    p = np.maximum(z - (lo + hi) / 2, 0) ** (1 / (alpha - 1))
    return p / p.sum(-1, keepdims=True)


def scipy_free_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


REFERENCES = {
    "softmax": scipy_free_softmax,
    "entmax15": lambda z: bisection_reference(z, 1.5),
    "sparsemax": lambda z: bisection_reference(z, 2.0),
}


@pytest.mark.parametrize("name", sorted(gates.ACTIVATIONS))
@given(z=logits)
def test_gate_matches_reference_and_lies_on_simplex(backend, name, z):
    ops = get_ops()
    p = to_numpy(gates.ACTIVATIONS[name](ops.asarray(z, "float32"), ops=ops))
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p, REFERENCES[name](z.astype(np.float32).astype(np.float64)), atol=2e-5)


@pytest.mark.parametrize("name", sorted(gates.ACTIVATIONS))
@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_large_logits_are_stable(backend, name, scale):
    ops = get_ops()
    z = np.array([[1.0, 0.5, -1.0, 0.999]]) * scale
    z = z.astype(np.float32).astype(np.float64)
    p = to_numpy(gates.ACTIVATIONS[name](ops.asarray(z, "float32"), ops=ops))
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p, REFERENCES[name](z), atol=1e-6)


@pytest.mark.parametrize("name", sorted(gates.ACTIVATIONS))
def test_a_million_experts_keep_the_simplex(backend, name):
    """N = 2**20 coefficients: no underflow to all-zero, no overflow, still summing to one."""
    ops = get_ops()
    z = np.random.default_rng(0).normal(size=(2, 2**20)) * 3
    p = to_numpy(gates.ACTIVATIONS[name](ops.asarray(z, "float32"), ops=ops))
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-3)


def test_entmax_and_sparsemax_are_sparse():
    z = np.array([[5.0, 0.0, -5.0]])
    assert gates.entmax15(z)[0, 2] == 0.0
    assert gates.sparsemax(z)[0, 1] == 0.0


@given(z=logits)
def test_layer_norm_zero_mean_unit_variance(z):
    y = gates.layer_norm(z)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-9)
    var = z.var(-1)
    np.testing.assert_allclose(y.var(-1), var / (var + 1e-5), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(gates.ACTIVATIONS))
def test_gates_agree_across_backends(name):
    z = np.random.default_rng(1).normal(size=(4, 7)) * 4
    outs = []
    for b in BACKENDS:
        with tensormoe.backend_context(b):
            ops = get_ops()
            outs.append(to_numpy(gates.ACTIVATIONS[name](ops.asarray(z, "float32"), ops=ops)))
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], atol=1e-6)


# -- robustness: half precision and non-finite logits -------------------------------------------

HALF = [(b, d) for b, d in [("numpy", "float16"), ("pytorch", "float16"), ("pytorch", "bfloat16"),
                            ("jax", "float16"), ("jax", "bfloat16")] if b in BACKENDS]
UNIT = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


@pytest.mark.parametrize("name", sorted(gates.ACTIVATIONS))
@pytest.mark.parametrize("backend_name, dtype", HALF)
def test_half_precision_gates_are_stable_and_keep_their_dtype(backend_name, dtype, name):
    """Logits near the largest finite value of the dtype: finite, on the simplex, rounded once from float32."""
    largest = {"float16": 6.0e4, "bfloat16": 3.0e38}[dtype]
    z = np.array([[1.0, 0.5, -1.0, 0.999], [0.3, 0.1, -0.2, 0.0]]) * np.array([[largest], [1.0]])
    with tensormoe.backend_context(backend_name):
        ops = get_ops()
        zz = ops.asarray(z, dtype)
        p = gates.ACTIVATIONS[name](zz, ops=ops)
        assert ops.dtype_name(p) == dtype
        p, z_rounded = to_numpy(p), to_numpy(zz)
    u = UNIT[dtype]
    assert np.all(np.isfinite(p)) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=4 * u)  # each of 4 entries rounded once
    np.testing.assert_allclose(p, REFERENCES[name](z_rounded), atol=u + 1e-6)


@pytest.mark.parametrize("backend_name, dtype", HALF)
def test_half_precision_layer_norm_does_not_overflow(backend_name, dtype):
    """Squares of centred logits of 300 overflow float16 (65504); the norm runs in float32 instead."""
    z = np.array([[300.0, -300.0, 0.0, 100.0]])
    with tensormoe.backend_context(backend_name):
        ops = get_ops()
        zz = ops.asarray(z, dtype)
        y = gates.layer_norm(zz, ops=ops)
        assert ops.dtype_name(y) == dtype
        y, z_rounded = to_numpy(y), to_numpy(zz)
    c = z_rounded - z_rounded.mean(-1, keepdims=True)
    np.testing.assert_allclose(y, c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5), rtol=2 * UNIT[dtype])


@pytest.mark.parametrize("name", sorted(gates.ACTIVATIONS))
def test_non_finite_logits_follow_the_documented_rules(backend, name):
    """-inf masks an expert (exact zero); NaN, +inf or no finite logit make the row NaN; rows stay independent."""
    z = np.array(
        [
            [1.0, -np.inf, 0.5, -np.inf],  # two experts masked
            [np.nan, 0.0, 1.0, 2.0],
            [np.inf, 0.0, 1.0, 2.0],
            [-np.inf, 0.0, np.inf, 2.0],
            [-np.inf] * 4,
            [0.3, 0.1, -0.2, 0.0],  # untouched
        ]
    )
    ops = get_ops()
    with np.errstate(invalid="ignore"):
        p = to_numpy(gates.ACTIVATIONS[name](ops.asarray(z, "float32"), ops=ops))
    assert np.all(p[0, [1, 3]] == 0.0)
    np.testing.assert_allclose(p[0, [0, 2]], REFERENCES[name](np.array([[1.0, 0.5]]))[0], atol=2e-6)
    assert np.all(np.isnan(p[1:5])), p
    np.testing.assert_allclose(p[5], REFERENCES[name](z[5:])[0], atol=2e-6)
