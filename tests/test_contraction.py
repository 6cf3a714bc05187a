"""Contraction planning: cache keys, plan inspection, optimizer choice."""

from __future__ import annotations

import importlib.util

import numpy as np
import opt_einsum
import pytest

from tensormoe import contraction

EQ = "bn,nr,bi,ir,or->bo"
SHAPES = [(8, 16), (16, 4), (8, 5), (5, 4), (6, 4)]


def test_plan_is_cached_per_key():
    contraction.clear_cache()
    p = contraction.get_plan(EQ, *SHAPES)
    assert contraction.get_plan(EQ, *SHAPES) is p
    assert contraction.get_plan(EQ, *SHAPES, dtype="float64") is not p
    assert contraction.get_plan(EQ, *SHAPES, backend="pytorch") is not p
    assert contraction.get_plan(EQ, *SHAPES, optimize="greedy") is not p
    info = contraction.cache_info()
    assert info["size"] == 4 and info["hits"] == 1 and info["misses"] == 4


def test_plan_reports_opt_einsum_path_info():
    p = contraction.get_plan(EQ, *SHAPES, optimize="optimal")
    path, info = opt_einsum.contract_path(EQ, *SHAPES, shapes=True, optimize="optimal")
    assert p.path == [tuple(s) for s in path]
    assert p.flops == info.opt_cost
    assert p.largest_intermediate == info.largest_intermediate


def test_plan_result_equals_einsum():
    rng = np.random.default_rng(0)
    ops = [rng.normal(size=s) for s in SHAPES]
    out = contraction.contract(EQ, *ops, backend="numpy", dtype="float64")
    np.testing.assert_allclose(out, np.einsum(EQ, *ops), rtol=1e-12)


def test_cache_is_bounded():
    contraction.clear_cache()
    for b in range(contraction._cache.maxsize + 5):
        contraction.get_plan("bi,io->bo", (b + 1, 2), (2, 3))
    assert contraction.cache_info()["size"] == contraction._cache.maxsize


@pytest.mark.parametrize("bad, error", [("fastest", ValueError), (3, TypeError)])
def test_unknown_optimizer(bad, error):
    with pytest.raises(error, match="optimize"):
        contraction.get_plan(EQ, *SHAPES, optimize=bad)


@pytest.mark.skipif(importlib.util.find_spec("cotengra") is None, reason="cotengra not installed")
def test_cotengra_preset():
    p = contraction.get_plan(EQ, *SHAPES, optimize="greedy-compressed")
    assert p.flops > 0 and len(p.path) == len(SHAPES) - 1
