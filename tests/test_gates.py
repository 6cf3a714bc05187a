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


# -- threshold methods of the sparse gates: sort and the sort-free Newton search ------------------

SPARSE = {"entmax15": 1.5, "sparsemax": 2.0}
METHODS = ["sort", "newton"]

# logits with ties: a few distinct values (so equal logits, often at the threshold), times a scale
tied_logits = st.tuples(
    st.integers(1, 4), st.integers(1, 9), st.sampled_from([1e-6, 0.3, 1.0, 7.0, 1e4])
).flatmap(
    lambda a: arrays(np.float64, a[:2], elements=st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, 2.0, -3.0])).map(
        lambda z: z * a[2]
    )
)


def run_gate(name, z, method, dtype="float32"):
    ops = get_ops()
    return to_numpy(getattr(gates, name)(ops.asarray(z, dtype), ops=ops, method=method))


@pytest.mark.parametrize("name", sorted(SPARSE))
@given(z=st.one_of(logits, tied_logits))
def test_both_methods_equal_the_reference_and_each_other(backend, name, z):
    """Shapes from 1 expert, scales from 1e-6 to 1e4, ties, -inf masks; the reference is bisection in float64."""
    z32 = z.astype(np.float32).astype(np.float64)
    ref = bisection_reference(z32, SPARSE[name])
    # one fixed shape (JAX compiles once): z in the corner, its rows padded with -inf (masked
    # experts), the other rows all zero
    padded = np.zeros((4, 9))
    padded[: z.shape[0]] = -np.inf
    padded[: z.shape[0], : z.shape[1]] = z
    by_method = {}
    for m in METHODS:
        p = run_gate(name, padded, m)
        assert np.all(p[: z.shape[0], z.shape[1] :] == 0.0)
        np.testing.assert_allclose(p[z.shape[0] :], 1 / 9, rtol=1e-6)
        by_method[m] = p[: z.shape[0], : z.shape[1]]
    for p in by_method.values():
        np.testing.assert_allclose(p, ref, atol=2e-5)
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(by_method["newton"], by_method["sort"], atol=2e-6)
    # exact zeros agree wherever the reference is clearly outside the support
    outside = ref < 1e-3
    assert np.all(by_method["newton"][outside & (by_method["sort"] == 0)] == 0.0)


@pytest.mark.parametrize("name", sorted(SPARSE))
@pytest.mark.parametrize("method", METHODS)
def test_edge_rows(backend, name, method):
    """All-equal rows, one expert, huge and tiny logits, -inf masks, NaN/+inf/all -inf rows."""
    z = np.array(
        [
            [0.0, 0.0, 0.0, 0.0],
            [3.0, 3.0, 3.0, -1e30],
            [1e30, -1e30, 1e30, 0.0],
            [1e-30, -1e-30, 0.0, 1e-38],
            [2.0, 0.0, 0.0, -np.inf],  # sparsemax: 0.0 sits exactly at the threshold
            [1.0, -np.inf, -np.inf, -np.inf],
            [np.nan, 0.0, 1.0, 2.0],
            [np.inf, 0.0, 1.0, 2.0],
            [-np.inf] * 4,
        ]
    )
    with np.errstate(invalid="ignore"):
        p = run_gate(name, z, method)
    finite = z[:6].copy()
    finite[np.isneginf(finite)] = -1e38  # masked: far below any threshold, as -inf is
    ref = bisection_reference(finite.astype(np.float32).astype(np.float64), SPARSE[name])
    np.testing.assert_allclose(p[:6], ref, atol=1e-6)
    assert np.all(p[[4, 5], 3] == 0.0) and np.all(p[5] == [1.0, 0.0, 0.0, 0.0])
    assert np.all(np.isnan(p[6:]))
    single = run_gate(name, np.array([[5.0], [-1e20]]), method)
    assert np.all(single == 1.0)


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_methods_agree_on_many_experts(backend, name):
    """[3, 4096]: long supports (small scale) and short ones (large scale), ties included."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(3, 4096)) * np.array([[0.01], [1.0], [30.0]])
    z[:, :8] = z[:, :1]  # eight tied maxima
    sort, newton = run_gate(name, z, "sort"), run_gate(name, z, "newton")
    np.testing.assert_allclose(newton, sort, atol=1e-6)
    np.testing.assert_allclose(newton.sum(-1), 1.0, rtol=1e-4)


def _grads(name, method, z, w):
    """Gradient of sum(w * gate(z)) with respect to z, on the current backend, as NumPy."""
    ops = get_ops()
    f = getattr(gates, name)
    if ops.name == "pytorch":
        import torch

        zt = torch.tensor(z, dtype=torch.float32, requires_grad=True)
        (f(zt, ops=ops, method=method) * torch.tensor(w, dtype=torch.float32)).sum().backward()
        return zt.grad.numpy().astype(np.float64)
    if ops.name == "jax":
        import jax
        import jax.numpy as jnp

        g = jax.jit(jax.grad(lambda zz: (f(zz, ops=ops, method=method) * jnp.asarray(w, jnp.float32)).sum()))
        return np.asarray(g(jnp.asarray(z, jnp.float32)), dtype=np.float64)
    pytest.skip("NumPy has no autograd")


def _reference_grad(name, z, w):
    """Closed-form Jacobian-vector product at the reference solution (Peters et al. 2019; Martins 2016)."""
    p = bisection_reference(z.astype(np.float32).astype(np.float64), SPARSE[name])
    # J = diag(s) - s s^T / sum(s); sparsemax: s = 1 on the support; 1.5-entmax: s = sqrt(p)
    s = (p > 0).astype(float) if name == "sparsemax" else np.sqrt(p)
    return s * w - s * (s * w).sum(-1, keepdims=True) / s.sum(-1, keepdims=True)


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_gradients_equal_between_methods_and_the_closed_form(backend, name):
    rng = np.random.default_rng(3)
    z = rng.normal(size=(6, 40)) * 2
    z[1] = 0.0  # all equal
    z[2, :5] = z[2].max() + 1  # tied maxima
    w = rng.normal(size=z.shape)
    by_method = {m: _grads(name, m, z, w) for m in METHODS}
    assert np.all(np.isfinite(by_method["newton"]))
    np.testing.assert_allclose(by_method["newton"], by_method["sort"], atol=1e-5)
    np.testing.assert_allclose(by_method["newton"], _reference_grad(name, z, w), atol=1e-4)


@pytest.mark.skipif("jax" not in BACKENDS, reason="JAX not installed")
@pytest.mark.parametrize("name", sorted(SPARSE))
def test_newton_under_jax_jit_and_grad_is_finite_with_masks(name):
    import jax
    import jax.numpy as jnp

    ops = get_ops("jax")
    f = getattr(gates, name)
    z = jnp.asarray([[1.0, -jnp.inf, 0.5, 0.2], [0.0, 0.0, 0.0, 0.0], [9.0, -9.0, 0.0, 8.5]], jnp.float32)
    jitted = jax.jit(lambda zz: f(zz, ops=ops, method="newton"))
    np.testing.assert_allclose(np.asarray(jitted(z)), np.asarray(f(z, ops=ops, method="sort")), atol=1e-6)
    g = jax.jit(jax.grad(lambda zz: (f(zz, ops=ops, method="newton") * jnp.arange(4.0)).sum()))(z)
    assert np.all(np.isfinite(np.asarray(g)))
    assert float(g[0, 1]) == 0.0  # a masked expert gets no gradient


@pytest.mark.skipif("pytorch" not in BACKENDS, reason="PyTorch not installed")
@pytest.mark.parametrize("method", ["auto", "newton"])
def test_torch_compile_full_graph_runs_the_sort_method(method):
    """Under torch.compile every method runs as "sort" (the Newton loop would break the graph)."""
    import torch

    ops = get_ops("pytorch")
    compiled = torch.compile(lambda z: gates.entmax15(z, ops=ops, method=method), backend="eager", fullgraph=True)
    z = torch.randn(3, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(compiled(z), gates.entmax15(z, ops=ops, method="sort"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(SPARSE))
@pytest.mark.parametrize("method", ["Sort", "bisect", None, 2])
def test_bad_method_names_the_argument(name, method):
    with pytest.raises(ValueError, match=r"method=.*expected one of \['auto', 'sort', 'newton'\]"):
        getattr(gates, name)(np.zeros((2, 3)), method=method)


def test_auto_picks_newton_on_jax_and_for_large_logits():
    """"auto": Newton on JAX; on NumPy and PyTorch's CPU from 2**16 logits (entmax15) or 2**18 (sparsemax)."""
    for b in BACKENDS:
        ops = get_ops(b)
        small, large, larger = (ops.asarray(np.zeros(s, dtype="float32")) for s in [(64, 16), (64, 1024), (64, 4096)])
        on_jax = b == "jax"
        assert gates._resolved_method("auto", ops, small, "entmax15") == ("newton" if on_jax else "sort")
        assert gates._resolved_method("auto", ops, large, "entmax15") == "newton"
        assert gates._resolved_method("auto", ops, large, "sparsemax") == ("newton" if on_jax else "sort")
        assert gates._resolved_method("auto", ops, larger, "sparsemax") == "newton"
        for method in ("sort", "newton"):
            assert gates._resolved_method(method, ops, large, "entmax15") == method


def test_auto_keeps_sort_on_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    z = torch.zeros((64, 1024), device="cuda")
    assert gates._resolved_method("auto", get_ops("pytorch"), z, "entmax15") == "sort"
