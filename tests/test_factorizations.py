"""Factorizations: rank conventions, validation messages, accounting and reconstruction via TensorLy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorly as tl
from hypothesis import given
from hypothesis import strategies as st

import tensormoe
from tensormoe.factorizations import CP, TR, TT, Tucker


def test_param_count_equals_elements():
    for f in [CP([3, 4, 5, 6], 7, 2), Tucker([3, 4, 5, 6], [2, 3, 4, 5], 2), TT([3, 4, 5, 6], 3, 2), TR([3, 4, 5, 6], 3, 2)]:
        params = f.init(np.random.default_rng(0), 1.0)
        assert f.n_params() == sum(p.size for p in params.values())
        assert {k: v.shape for k, v in params.items()} == f.param_shapes()


@pytest.mark.parametrize(
    "ranks, bonds",
    [(3, (1, 3, 3, 3, 1)), ([1, 2, 3, 4, 1], (1, 2, 3, 4, 1)), ([2, 3, 4], (1, 2, 3, 4, 1)),
     ([[1, 5, 2], [2, 6, 3], [3, 7, 4], [4, 8, 1]], (1, 2, 3, 4, 1))],
)
def test_tt_rank_conventions(ranks, bonds):
    assert TT([5, 6, 7, 8], ranks, 2).bonds == bonds


@pytest.mark.parametrize(
    "ranks, bonds",
    [(3, (3, 3, 3, 3, 3)), ([2, 3, 4, 5, 2], (2, 3, 4, 5, 2)), ([2, 3, 4, 5], (2, 3, 4, 5, 2))],
)
def test_tr_rank_conventions(ranks, bonds):
    assert TR([5, 6, 7, 8], ranks, 2).bonds == bonds


def test_reference_style_core_shapes_accept_in_dim_without_bias_row():
    layer = tensormoe.TTMMoE(6, 4, [3], ranks=[[1, 3, 2], [2, 6, 5], [5, 4, 1]])
    assert layer.factorization.bonds == (1, 2, 5, 1)


BAD = [
    (lambda: tensormoe.CPMMoE(0, 3, [4], rank=2), ValueError, "in_dim must be a positive integer; got 0"),
    (lambda: tensormoe.CPMMoE(4.5, 3, [4], rank=2), TypeError, "in_dim must be a positive integer; got 4.5"),
    (lambda: tensormoe.CPMMoE(4, -1, [4], rank=2), ValueError, "out_dim must be a positive integer; got -1"),
    (lambda: tensormoe.CPMMoE(4, 3, [4], rank=0), ValueError, "rank must be a positive integer; got 0"),
    (lambda: tensormoe.CPMMoE(4, 3, [4], rank=True), TypeError, "rank must be a positive integer"),
    (lambda: tensormoe.CPMMoE(4, 3, [], rank=2), ValueError, "expert_dims must list at least one"),
    (lambda: tensormoe.CPMMoE(4, 3, [4, 0], rank=2), ValueError, r"expert_dims\[1\] must be a positive integer; got 0"),
    (lambda: tensormoe.CPMMoE(4, 3, "4", rank=2), TypeError, "expert_dims must be a positive integer or a list"),
    (lambda: tensormoe.CPMMoE(4, 3, [4, 4], rank=2, hierarchy=3), ValueError, "hierarchy=3 does not match"),
    (lambda: tensormoe.CPMMoE(4, 3, [4], rank=2, gate="relu"), ValueError, "gate='relu' is not a gate activation"),
    (lambda: tensormoe.CPMMoE(4, 3, [4], rank=2, gate_norm="batch"), ValueError, "gate_norm='batch'"),
    (lambda: tensormoe.CPMMoE(4, 3, [4], rank=2, dtype="int32"), ValueError, "dtype='int32' is not supported"),
    (lambda: tensormoe.CPMMoE(4, 3, [4], rank=2, init_std=-1), ValueError, "init_std must be a positive"),
    (lambda: tensormoe.CPMMoE(4, 3, [4], rank=2, bias=1), TypeError, "bias must be True or False"),
    (lambda: tensormoe.CPMMoE(4, 3, [4], rank=2, optimize="fastest"), ValueError, "optimize='fastest' is not a known"),
    (lambda: tensormoe.TuckerMMoE(4, 3, [4], ranks=[2, 2]), ValueError, "ranks must have one entry per mode"),
    (lambda: tensormoe.TTMMoE(4, 3, [4], ranks=[2, 2, 2, 1]), ValueError, "TT boundary ranks must be 1; got r_0=2"),
    (lambda: tensormoe.TTMMoE(4, 3, [4], ranks=[2, 2, 2, 2, 2, 2]), ValueError, "ranks must be an integer or a list"),
    (lambda: tensormoe.TRMMoE(4, 3, [4], ranks=[2, 3, 4, 5]), ValueError, "TR boundary ranks must be equal"),
    (lambda: tensormoe.TRMMoE(4, 3, [4], ranks=[[2, 4, 3], [4, 5, 2], [2, 3, 2]]), ValueError,
     r"ranks\[1\]\[0\]=4 must equal ranks\[0\]\[2\]=3"),
    (lambda: tensormoe.TRMMoE(4, 3, [4], ranks=[[2, 0, 3], [3, 5, 2], [2, 3, 2]]), ValueError,
     r"ranks\[0\]\[1\] must be a positive integer; got 0"),
    (lambda: tensormoe.TTMMoE(4, 3, [4], ranks="3"), TypeError, "ranks must be an integer or a sequence"),
]


@pytest.mark.parametrize("make, error, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_constructor_arguments_name_the_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


@given(
    dims=st.lists(st.integers(1, 4), min_size=3, max_size=5),
    rank=st.integers(1, 3),
    kind=st.sampled_from(["cp", "tucker", "tt", "tr"]),
)
def test_to_dense_is_tensorly_reconstruction_and_matches_network(dims, rank, kind):
    """TensorLy's reconstruction equals contracting the network's dense equation (two independent paths)."""
    import opt_einsum

    cls = {"cp": CP, "tucker": Tucker, "tt": TT, "tr": TR}[kind]
    f = cls(dims, rank, len(dims) - 2)
    params = f.init(np.random.default_rng(rank), 1.0)
    with tensormoe.backend_context("numpy"):
        dense = f.to_dense(params)
    letters = "".join(f.mode_symbol(k) for k in range(f.order))
    network = ",".join(f.network().values()) + "->" + letters
    np.testing.assert_allclose(dense, opt_einsum.contract(network, *params.values()), rtol=1e-10, atol=1e-12)
    assert dense.shape == tuple(dims)
    assert tl.get_backend() in {"numpy", "pytorch", "jax"}


def test_dense_count_is_product_of_dims():
    layer = tensormoe.CPMMoE(7, 5, [3, 4], rank=2)
    assert math.prod(layer.dense_weight().shape) == 3 * 4 * 8 * 5
