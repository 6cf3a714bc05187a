"""Gates: on the simplex, equal to independent references, stable, and equal across backends."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BACKENDS, to_numpy
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import tensormoe
from tensormoe.routing import gates
from tensormoe.frameworks import _kernels
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


def methods_here():
    """The threshold methods that run on the current backend: the fused kernel too where it is built."""
    kernel = gates.KERNEL_AVAILABLE and get_ops().name in ("numpy", "pytorch")
    return METHODS + ["kernel"] * kernel

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
    for m in methods_here():
        p = run_gate(name, padded, m)
        assert np.all(p[: z.shape[0], z.shape[1] :] == 0.0)
        np.testing.assert_allclose(p[z.shape[0] :], 1 / 9, rtol=1e-6)
        by_method[m] = p[: z.shape[0], : z.shape[1]]
    for p in by_method.values():
        np.testing.assert_allclose(p, ref, atol=2e-5)
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    for m in by_method:
        np.testing.assert_allclose(by_method[m], by_method["sort"], atol=2e-6)
        # exact zeros agree wherever the reference is clearly outside the support
        outside = ref < 1e-3
        assert np.all(by_method[m][outside & (by_method["sort"] == 0)] == 0.0)


@pytest.mark.parametrize("name", sorted(SPARSE))
@pytest.mark.parametrize("method", METHODS + ["kernel"])
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
    if method not in methods_here():
        pytest.skip(f"method={method!r} does not run on the {backend} backend here")
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
    sort = run_gate(name, z, "sort")
    for method in methods_here():
        p = run_gate(name, z, method)
        np.testing.assert_allclose(p, sort, atol=1e-6)
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-4)


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
    by_method = {m: _grads(name, m, z, w) for m in methods_here()}
    for m, g in by_method.items():
        assert np.all(np.isfinite(g)), m
        np.testing.assert_allclose(g, by_method["sort"], atol=1e-5)
        np.testing.assert_allclose(g, _reference_grad(name, z, w), atol=1e-4)


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
def test_torch_compile_full_graph_runs_the_kernel_or_the_sort_method(method):
    """Under torch.compile "auto" runs the kernel (a custom operator) where built; the other methods run "sort"."""
    import torch

    ops = get_ops("pytorch")
    ran = []
    original = gates._SORT["entmax15"]
    compiled = torch.compile(lambda z: gates.entmax15(z, ops=ops, method=method), backend="eager", fullgraph=True)
    z = torch.randn(3, 9, generator=torch.Generator().manual_seed(0))
    try:
        gates._SORT["entmax15"] = lambda z, ops: ran.append("sort") or original(z, ops)
        out = compiled(z)
    finally:
        gates._SORT["entmax15"] = original
    torch.testing.assert_close(out, gates.entmax15(z, ops=ops, method="sort"), atol=1e-6, rtol=0)
    kernel = gates.KERNEL_AVAILABLE and method == "auto"
    assert ran == ([] if kernel else ["sort"])


@pytest.mark.parametrize("name", sorted(SPARSE))
@pytest.mark.parametrize("method", ["Sort", "bisect", None, 2])
def test_bad_method_names_the_argument(name, method):
    with pytest.raises(ValueError, match=r"method=.*expected one of \['auto', 'kernel', 'sort', 'newton'\]"):
        getattr(gates, name)(np.zeros((2, 3)), method=method)


def test_auto_picks_the_kernel_or_the_faster_array_method(monkeypatch):
    """"auto": the kernel on NumPy and PyTorch's CPU where built, Newton on JAX; without the kernel "sort" on
    NumPy, and on PyTorch's CPU Newton from 2**16 logits (entmax15) or 2**18 (sparsemax)."""
    for kernel in (True, False):
        if kernel and not gates.KERNEL_AVAILABLE:
            continue
        if not kernel:
            monkeypatch.setattr(_kernels, "KERNEL", None)
        for b in BACKENDS:
            ops = get_ops(b)
            small, large, larger = (ops.asarray(np.zeros(s, dtype="float32")) for s in [(64, 16), (64, 1024), (64, 4096)])
            if b == "jax":
                expected = ["newton"] * 4
            elif kernel:
                expected = ["kernel"] * 4
            elif b == "numpy":
                expected = ["sort"] * 4
            else:
                expected = ["sort", "newton", "sort", "newton"]
            got = [gates._resolved_method("auto", ops, small, "entmax15"),
                   gates._resolved_method("auto", ops, large, "entmax15"),
                   gates._resolved_method("auto", ops, large, "sparsemax"),
                   gates._resolved_method("auto", ops, larger, "sparsemax")]
            assert got == expected, (b, kernel)
            for method in ("sort", "newton"):
                assert gates._resolved_method(method, ops, large, "entmax15") == method


def test_kernel_method_says_why_it_cannot_run(monkeypatch):
    z = np.zeros((2, 3), dtype="float32")
    if "jax" in BACKENDS:
        ops = get_ops("jax")
        with pytest.raises(ValueError, match="method='kernel' cannot run here: .*not on the jax backend"):
            gates.entmax15(ops.asarray(z), ops=ops, method="kernel")
    monkeypatch.setattr(_kernels, "KERNEL", None)
    with pytest.raises(ValueError, match="method='kernel' cannot run here: the extension .* is not built"):
        gates.sparsemax(z, method="kernel")
    np.testing.assert_allclose(gates.sparsemax(z), 1 / 3)  # "auto" falls back to the array methods


def test_auto_keeps_sort_on_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    z = torch.zeros((64, 1024), device="cuda")
    assert gates._resolved_method("auto", get_ops("pytorch"), z, "entmax15") == "sort"


# -- the fused kernel: long rows (its whole-row bound steps), dtypes, layouts, threads, autograd -----------

kernel_only = pytest.mark.skipif(not gates.KERNEL_AVAILABLE, reason="the sparse-gate kernel is not built")

# rows up to 700 experts (the kernel screens rows of 64 and more with bound steps), scales from 1e-3 to 1e4,
# a random share of -inf masks, and rows of few distinct values (ties at the threshold)
long_rows = st.tuples(
    st.integers(1, 3), st.integers(1, 700), st.sampled_from([1e-3, 0.3, 1.0, 3.0, 30.0, 1e4]),
    st.integers(0, 2**32 - 1), st.sampled_from(["normal", "ties", "masked"]),
)


def make_rows(rows, n, scale, seed, kind):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, n))
    if kind == "ties":
        z = np.round(z * 2) / 2  # values on a grid of 1/2: many equal logits
    z = z * scale
    if kind == "masked":
        z[rng.random(z.shape) < rng.random()] = -np.inf
        z[:, rng.integers(n)] = scale  # every row keeps a finite logit
    return z


@kernel_only
@pytest.mark.parametrize("name", sorted(SPARSE))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(case=long_rows)
def test_kernel_equals_the_float64_reference_on_long_rows(backend, name, dtype, case):
    if backend not in ("numpy", "pytorch"):
        pytest.skip("the kernel runs on NumPy and PyTorch arrays")
    z = make_rows(*case)
    rounded = z.astype(dtype).astype(np.float64)
    p = run_gate(name, z, "kernel", dtype)
    ref = bisection_reference(rounded, SPARSE[name])
    np.testing.assert_allclose(p, ref, atol=2e-6 if dtype == "float32" else 1e-10)
    assert np.all(p[np.isneginf(rounded)] == 0.0)
    assert np.all(p[ref == 0.0] == 0.0) or dtype == "float32"  # float64: the same support exactly


@kernel_only
@pytest.mark.parametrize("name", sorted(SPARSE))
def test_kernel_takes_any_layout_and_leading_axes(backend, name):
    if backend not in ("numpy", "pytorch"):
        pytest.skip("the kernel runs on NumPy and PyTorch arrays")
    ops = get_ops()
    z = np.random.default_rng(4).normal(size=(2, 300, 5)) * 2
    strided = ops.xp.matrix_transpose(ops.asarray(z, "float32"))  # [2, 5, 300], not contiguous
    p = to_numpy(getattr(gates, name)(strided, ops=ops, method="kernel"))
    want = bisection_reference(np.swapaxes(z, -1, -2).astype(np.float32).astype(np.float64), SPARSE[name])
    np.testing.assert_allclose(p, want, atol=2e-6)
    empty = getattr(gates, name)(ops.asarray(np.zeros((0, 7)), "float32"), ops=ops, method="kernel")
    assert tuple(empty.shape) == (0, 7)


@kernel_only
@pytest.mark.parametrize("name", sorted(SPARSE))
def test_kernel_threads_split_rows_without_changing_a_bit(monkeypatch, name):
    """Rows are independent: two threads give the very same bits as one."""
    z = np.random.default_rng(5).normal(size=(2 * 2**16 // 512, 512)).astype(np.float32)
    outs = []
    for cpus in (1, 2):
        monkeypatch.setattr(_kernels, "_cpu_count", lambda cpus=cpus: cpus)
        outs.append(getattr(gates, name)(z, method="kernel"))
    np.testing.assert_array_equal(outs[0], outs[1])
    if "pytorch" in BACKENDS:
        import torch

        before = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                out = getattr(gates, name)(torch.from_numpy(z), ops=get_ops("pytorch"), method="kernel")
                np.testing.assert_array_equal(out.numpy(), outs[0])
        finally:
            torch.set_num_threads(before)


@kernel_only
@pytest.mark.skipif("pytorch" not in BACKENDS, reason="PyTorch not installed")
@pytest.mark.parametrize("name", sorted(SPARSE))
def test_kernel_operator_passes_torch_opcheck_and_gradcheck(name):
    """The custom operator's schema, fake tensor and autograd registrations (opcheck), its closed-form
    backward against finite differences in float64 (gradcheck), and second derivatives through create_graph."""
    import torch

    ops = get_ops("pytorch")
    gen = torch.Generator().manual_seed(6)
    z = (torch.randn(4, 80, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    f = lambda t: getattr(gates, name)(t, ops=ops, method="kernel")  # noqa: E731
    f(z)  # an eager call (it runs the same kernel without the operator)
    torch.library.opcheck(torch.ops.tensormoe.sparse_gate.default, (z, _kernels.GATES[name]))
    assert torch.autograd.gradcheck(f, (z,))
    w = torch.randn(4, 80, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad((f(z) * w).sum(), z, create_graph=True)
    (g_sort,) = torch.autograd.grad((getattr(gates, name)(z, ops=ops, method="sort") * w).sum(), z,
                                    create_graph=True)
    torch.testing.assert_close(g, g_sort)
    assert g.requires_grad == (name == "entmax15")  # sparsemax is piecewise linear: its Hessian is zero
