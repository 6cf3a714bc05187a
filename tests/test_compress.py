"""Layers started from a linear layer reproduce it exactly; dense tensors round-trip through TensorLy."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import rounding_tolerance, to_numpy
from hypothesis import given
from hypothesis import strategies as st

import tensormoe
from tensormoe.compress import from_dense, from_linear
from tensormoe.layer import make_layer
from tensormoe.ops import get_ops


def capacity_ranks(kind, experts, rank, draw):
    """Ranks of ``kind`` that can hold a matrix of rank ``rank`` (per compress's construction)."""
    h = len(experts)
    if kind == "cp":
        return rank + draw(st.integers(0, 2))
    if kind == "tucker":
        return [*(draw(st.integers(1, n)) for n in experts), None, None]  # I/O ranks filled in by the caller
    edge = 1 if kind == "tt" else draw(st.integers(1, 3))
    inner = [draw(st.integers(1, 3)) for _ in range(h)]
    m = min([edge, *inner])
    r = -(-rank // m) + draw(st.integers(0, 1))  # m * r >= rank
    return [edge, *inner, r, edge]


@st.composite
def linear_cases(draw):
    kind = draw(st.sampled_from(["cp", "tucker", "tt", "tr"]))
    in_dim, out_dim = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    has_bias = draw(st.booleans())
    levels = draw(st.integers(1, 2))
    experts = draw(st.lists(st.integers(1, 4), min_size=levels, max_size=levels))
    rows = in_dim + int(has_bias)
    ranks = capacity_ranks(kind, experts, min(rows, out_dim), draw)
    if kind == "tucker":
        low = min(rows, out_dim)
        ranks[-2], ranks[-1] = draw(st.integers(low, rows)), draw(st.integers(low, out_dim))
    return dict(kind=kind, in_dim=in_dim, out_dim=out_dim, has_bias=has_bias, experts=experts, ranks=ranks,
                layout=draw(st.sampled_from(["out_in", "in_out"])), seed=draw(st.integers(0, 2**16)))


def dirichlet(rng, batch, experts):
    return [rng.dirichlet(np.ones(n), size=batch) for n in experts]


@given(case=linear_cases())
def test_from_linear_is_exact_for_any_coefficients(case):
    """float64 on NumPy: the MMoE's output is the linear layer's, whatever the coefficients."""
    rng = np.random.default_rng(case["seed"])
    w = rng.normal(size=(case["in_dim"], case["out_dim"]))
    b = rng.normal(size=case["out_dim"]) if case["has_bias"] else None
    weight = w.T if case["layout"] == "out_in" else w
    with tensormoe.backend_context("numpy"):
        c = from_linear(weight, b, layout=case["layout"], kind=case["kind"], expert_dims=case["experts"],
                        ranks=case["ranks"], dtype="float64", seed=case["seed"])
        x = rng.normal(size=(5, case["in_dim"]))
        expected = x @ w + (0 if b is None else b)
        coeffs = dirichlet(rng, 5, case["experts"])
        scale = np.abs(x) @ np.abs(w) + (0 if b is None else np.abs(b)) + 1
        np.testing.assert_array_less(np.abs(c.layer.apply(None, x, coeffs) - expected), 1e-10 * scale)
        np.testing.assert_array_less(np.abs(c.layer(x) - expected), 1e-10 * scale)  # its own (random) gates
        assert c.method.startswith("exact") and c.relative_error < 1e-12
        if np.prod(case["experts"]) <= 8:  # and so is every expert of the dense tensor
            matrix = w if b is None else np.vstack([w, b])
            dense = c.layer.dense_weight()
            assert np.allclose(dense, np.broadcast_to(matrix, dense.shape), atol=1e-12)
        assert c.layer.bias == case["has_bias"]


@pytest.mark.parametrize(
    ("kind", "ranks", "kept"),
    [("cp", 2, 2), ("tucker", [2, 3, 2], 2), ("tt", [1, 2, 3, 1], 3), ("tr", [2, 3, 2, 2], 4), ("tr", [3, 1, 3, 3], 3)],
)
def test_too_small_ranks_keep_the_leading_singular_components(kind, ranks, kept):
    """Below rank(M) the error is the SVD tail's: Eckart–Young's optimum for those ranks."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(7, 6)), rng.normal(size=7)  # out_in
    s = np.linalg.svd(np.vstack([w.T, b]), compute_uv=False)
    with tensormoe.backend_context("numpy"):
        c = from_linear(w, b, layout="out_in", kind=kind, expert_dims=[2], ranks=ranks, dtype="float64")
    assert c.method.startswith("truncated")
    assert c.relative_error == pytest.approx(np.sqrt(np.sum(s[kept:] ** 2) / np.sum(s**2)), rel=1e-9)


def test_from_linear_on_every_backend(backend):
    """float32 on the current backend, weights given as that backend's arrays."""
    rng = np.random.default_rng(1)
    w, b = rng.normal(size=(6, 10)), rng.normal(size=6)
    ops = get_ops()
    c = from_linear(ops.asarray(w, "float32"), ops.asarray(b, "float32"), layout="out_in", kind="tt",
                    expert_dims=[5, 2], ranks=[1, 3, 2, 7, 1])
    x = rng.normal(size=(4, 10))
    y = to_numpy(c.layer(ops.asarray(x, "float32")))
    params = {k: to_numpy(v) for k, v in c.layer.params.items()}
    coeffs = [to_numpy(a) for a in c.layer.coefficients(None, ops.asarray(x, "float32"))]
    tol = rounding_tolerance(c.layer, params, to_numpy(ops.asarray(x, "float32")), coeffs)
    np.testing.assert_array_less(np.abs(y - (x @ w.T + b)), tol + 1e-5 * (np.abs(x) @ np.abs(w.T) + np.abs(b)))
    assert c.relative_error < 1e-6


@pytest.mark.parametrize(
    ("kind", "ranks", "make"),
    [
        ("cp", 3, lambda: make_layer("cp", 6, 5, [4], 3, dtype="float64", seed=3)),
        ("tucker", [3, 4, 2], lambda: make_layer("tucker", 6, 5, [4], [3, 4, 2], dtype="float64", seed=3)),
        ("tt", [1, 3, 4, 1], lambda: make_layer("tt", 6, 5, [4], [1, 3, 4, 1], dtype="float64", seed=3)),
        ("tr", [1, 3, 4, 1], lambda: make_layer("tt", 6, 5, [4], [1, 3, 4, 1], dtype="float64", seed=3)),
        ("tt", [1, 2, 3, 4, 1], lambda: make_layer("tt", 6, 5, [3, 2], [1, 2, 3, 4, 1], dtype="float64", seed=3)),
    ],
)
def test_from_dense_recovers_a_tensor_of_those_ranks(kind, ranks, make):
    with tensormoe.backend_context("numpy"):
        w = make().dense_weight()
        c = from_dense(w, kind=kind, ranks=ranks, dtype="float64", seed=1, tol=1e-12, n_iter_max=500)
        rebuilt = c.layer.dense_weight()
    independent = np.linalg.norm(w - rebuilt) / np.linalg.norm(w)
    assert c.relative_error == pytest.approx(independent, rel=1e-9, abs=1e-15)
    assert c.relative_error < 1e-6, c.method


def test_from_dense_pads_bonds_the_svd_could_not_fill():
    """TT-SVD caps the first bond at N = 3; the layer still gets the asked bonds, the tensor unchanged."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 5, 4))
    with tensormoe.backend_context("numpy"):
        c = from_dense(w, kind="tt", ranks=[1, 6, 4, 1], bias=False, dtype="float64")
        assert c.layer.factorization.bonds == (1, 6, 4, 1)
        assert c.relative_error == pytest.approx(np.linalg.norm(w - c.layer.dense_weight()) / np.linalg.norm(w))
        assert c.relative_error < 1e-12  # bonds (3, 4) are the full TT ranks of a 3 x 5 x 4 tensor
        assert np.all(np.any(c.layer.params["factor_1"] != 0, axis=(1, 2)))  # padding is not dead


def test_from_dense_cp_above_the_size_of_an_unfolding():
    """Rank 2 on a 3 x 2 x 1 tensor: the last unfolding has one singular vector (TensorLy's SVD init fails)."""
    w = np.random.default_rng(4).normal(size=(3, 2, 1))
    with tensormoe.backend_context("numpy"):
        c = from_dense(w, kind="cp", ranks=2, bias=False, dtype="float64")
        assert c.relative_error < 1e-6
        with pytest.raises(ValueError, match="rank=3 exceeds 2"):
            from_dense(w, kind="cp", ranks=3, bias=False, dtype="float64")


def test_from_dense_with_a_budget_and_tr_als_fallback():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(2, 5, 4))
    with tensormoe.backend_context("numpy"):
        c = from_dense(w, kind="cp", budget=0.5, dtype="float64", n_iter_max=5)
        assert c.layer.n_params <= 20  # half of the 40 entries, gates (4 x 2) included
        # bonds 3 * 3 exceed every unfolding's smaller side (2, 5, 4): TR-SVD cannot start, ALS runs
        c = from_dense(w, kind="tr", ranks=3, dtype="float64", n_iter_max=3)
        assert "tensor_ring_als" in c.method and np.isfinite(c.relative_error)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda w: from_linear(w, layout="oi", kind="cp", expert_dims=[2], ranks=2), ValueError, "layout='oi'"),
        (lambda w: from_linear(w[0], layout="out_in", kind="cp", expert_dims=[2], ranks=2), ValueError, "matrix"),
        (lambda w: from_linear(w, np.ones(4), layout="out_in", kind="cp", expert_dims=[2], ranks=2), ValueError,
         r"bias must have shape \(3,\)"),
        (lambda w: from_linear(w, layout="out_in", kind="cp", expert_dims=[2]), ValueError, "exactly one of ranks"),
        (lambda w: from_linear(w, layout="out_in", kind="cp", expert_dims=[2], ranks=2, budget=9), ValueError,
         "exactly one"),
        (lambda w: from_linear(w * np.nan, layout="out_in", kind="cp", expert_dims=[2], ranks=2), ValueError, "NaN"),
        (lambda w: from_linear("w", layout="out_in", kind="cp", expert_dims=[2], ranks=2), TypeError, "weight"),
        (lambda w: from_linear(w, layout="out_in", kind="cp", expert_dims=[2], ranks=2, gate_std=-1.0), ValueError,
         "gate_std"),
        (lambda w: from_linear(w, layout="out_in", kind="pca", expert_dims=[2], ranks=2), ValueError, "kind='pca'"),
        (lambda w: from_dense(w, kind="cp", ranks=2), ValueError, "3 or more axes"),
        (lambda w: from_dense(w[None, :1, :], kind="cp", ranks=2), ValueError, "no input features"),
    ],
)
def test_bad_inputs_are_explained(call, error, match):
    w = np.ones((3, 5))
    with tensormoe.backend_context("numpy"), pytest.raises(error, match=match):
        call(w)


def test_layout_is_required():
    with pytest.raises(TypeError, match="layout"):
        from_linear(np.ones((3, 5)), kind="cp", expert_dims=[2], ranks=2)
