"""The reference implementation's rank spellings (issue 14): over-complete Tucker ranks, TT/TR core shapes.

Over-complete Tucker ranks and core shapes whose middle entry is not the mode's size are read
the way the reference reads them, with a ``RankWarning``; truly invalid ranks keep their errors.
The expected counts and shapes are computed here from the definitions, not by the code under test.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import tensorly as tl
from hypothesis import given
from hypothesis import strategies as st

import tensormoe
from helpers import exact_forward, float64_on, random_params, to_numpy
from tensormoe.network.factorizations import TR, TT, RankWarning, Tucker


def _tucker_count(dims, ranks):
    return sum(d * r for d, r in zip(dims, ranks)) + math.prod(ranks)


def _rank_warnings(record):
    return [w for w in record if issubclass(w.category, RankWarning)]


@pytest.mark.parametrize(
    "experts, ranks, redundant, total",
    # the reference README's two Tucker calls (in_dim 4 + bias row, out_dim 8): counts from the issue-14 spec
    [([32], [8, 8, 8], 207, 872), ([32, 2], [8, 8, 8, 8], 3483, 4472)],
)
def test_readme_tucker_ranks_warn_with_the_redundant_count(experts, ranks, redundant, total):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        layer = tensormoe.TuckerMMoE(4, 8, experts, ranks=ranks)
    (warned,) = _rank_warnings(record)
    assert f"so {redundant:,} of the {total:,} factorized parameters are redundant" in str(warned.message)
    # more parameters than the 32 (x 2) x 5 x 8 dense entries: also over-parameterized
    over = [w for w in record if w.category is tensormoe.network.factorizations.OverparameterizedWarning]
    assert len(over) == (total > math.prod(experts) * 5 * 8)
    assert layer.factorization.ranks == tuple(ranks)
    assert layer.param_shapes()["core"] == tuple(ranks)
    assert layer.param_shapes()[f"factor_{len(experts)}"] == (5, 8)  # a wide factor, kept as given


@given(
    dims=st.lists(st.integers(1, 4), min_size=3, max_size=4),
    extra=st.lists(st.integers(0, 3), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_over_complete_tucker_equals_its_essential_ranks(dims, extra, seed):
    """The tensor of over-complete ranks is exactly representable with the essential ranks the warning names."""
    ranks = [d + e for d, e in zip(dims, extra)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        f = Tucker(dims, ranks, len(dims) - 2)
    essential = f.essential_ranks()
    # independently: a factor [d, R] has rank <= d; an unfolding of the core has rank <= the other ranks' product
    for k, (r, d) in enumerate(zip(essential, dims)):
        assert r <= min(ranks[k], d, math.prod(essential[:k] + essential[k + 1 :]))
    warned = _rank_warnings(record)
    assert bool(warned) == any(e > 0 for e in extra)
    if warned:
        count = _tucker_count(dims, ranks) - _tucker_count(dims, essential)
        assert f"so {count:,} of the {_tucker_count(dims, ranks):,}" in str(warned[0].message)
    params = {k: np.random.default_rng(seed).normal(size=s) for k, s in f.param_shapes().items()}
    with tensormoe.backend_context("numpy"):
        dense = f.to_dense(params)
        # a Tucker decomposition at the essential ranks reproduces it (HOSVD of an exactly low-rank tensor)
        core, factors = tl.decomposition.tucker(tl.tensor(dense), rank=essential, init="svd", n_iter_max=1)
        np.testing.assert_allclose(tl.tucker_to_tensor((core, factors)), dense, atol=1e-9 * max(1, np.abs(dense).max()))


def test_over_complete_tucker_forward_equals_the_dense_forward(backend):
    with float64_on(backend):
        _check_over_complete_forward()


def _check_over_complete_forward():
    with pytest.warns(RankWarning):
        layer = tensormoe.TuckerMMoE(4, 3, [2, 3], ranks=[5, 2, 7, 6], dtype="float64")
    params = random_params(layer, 0)
    x = np.random.default_rng(1).normal(size=(5, 4))
    xb = tensormoe.frameworks.get_ops().asarray(x, "float64")
    a = layer.coefficients(params, xb)
    np.testing.assert_allclose(to_numpy(layer.apply(params, xb)), exact_forward(layer, params, xb, a), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("cls, ring", [(TT, False), (TR, True)])
def test_core_shapes_read_only_the_bonds(cls, ring):
    r0 = 3 if ring else 1
    given_ = [[r0, None, 2], (2, 5, 4), [4, 6, r0]]  # None, the mode size, and a tuple: all silent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = cls([7, 5, 6], given_, 1, in_dim=4)
        assert cls([7, 5, 6], [[r0, 7, 2], [2, 4, 4], [4, 6, r0]], 1, in_dim=4).bonds == f.bonds  # in_dim: silent
    assert f.bonds == (r0, 2, 4, r0)
    assert f.param_shapes() == {"factor_0": (r0, 7, 2), "factor_1": (2, 5, 4), "factor_2": (4, 6, r0)}


def test_core_shape_middle_that_disagrees_warns_and_is_not_read():
    # the reference README's two-level call: ranks[1][1] = n_experts = 32 for a mode of size 2
    ranks = [[1, 32, 4], [4, 32, 4], [4, 4, 4], [4, 8, 1]]
    with pytest.warns(RankWarning, match=r"ranks\[1\]\[1\]=32 is not the size 2 of mode 1") as record:
        layer = tensormoe.TTMMoE(4, 8, expert_dims=[32, 2], ranks=ranks, hierarchy=2)
    assert len(_rank_warnings(record)) == 1  # ranks[2][1] = in_dim = 4 for the mode of size 5 is not warned
    assert "core 1 has shape [4, 2, 4]" in str(_rank_warnings(record)[0].message)
    assert layer.param_shapes()["factor_1"] == (4, 2, 4)


@pytest.mark.parametrize(
    "ranks, error, message",
    [
        ([[1, None, 2], [3, None, 2], [2, None, 1]], ValueError, r"ranks\[1\]\[0\]=3 must equal ranks\[0\]\[2\]=2"),
        ([[1, None, 2], [2, None, 2], [2, None, 3]], ValueError, r"TT boundary ranks must be 1"),
        ([[1, None, 0], [0, None, 2], [2, None, 1]], ValueError, r"ranks\[0\]\[2\] must be a positive integer; got 0"),
        ([[1, None, 2], [2, -1, 2], [2, None, 1]], ValueError, r"ranks\[1\]\[1\] must be a positive integer; got -1"),
        ([[1, None, 2], [2, 2.5, 2], [2, None, 1]], TypeError, r"ranks\[1\]\[1\] must be a positive integer; got 2.5"),
        ([[1, None, 2], [2, None], [2, None, 1]], ValueError, r"ranks\[1\] must be a core shape"),
    ],
)
def test_invalid_core_shapes_keep_their_errors(ranks, error, message):
    with pytest.raises(error, match=message):
        TT([7, 5, 6], ranks, 1)


def test_cp_takes_the_reference_wrappers_ranks_keyword():
    assert tensormoe.CPMMoE(4, 8, [32], ranks=16).config() == tensormoe.CPMMoE(4, 8, [32], rank=16).config()
    for kwargs in ({}, {"rank": 2, "ranks": 2}):
        with pytest.raises(TypeError, match=r"CPMMoE takes the CP rank as rank= \(or ranks=.*expected exactly one"):
            tensormoe.CPMMoE(4, 8, [32], **kwargs)
