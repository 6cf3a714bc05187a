"""Contraction planning: cache keys, plan inspection, optimizer choice."""

from __future__ import annotations

import importlib.util

import numpy as np
import opt_einsum
import pytest

import tensormoe
from tensormoe.network import contraction

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


def test_a_batch_free_plan_is_searched_once_and_runs_for_any_rows():
    """batch=: one search (at SEARCH_ROWS) serves every number of rows; each result equals np.einsum."""
    equation = "ab,ac,be,ce,de->ad"
    rng = np.random.default_rng(0)
    factors = [rng.standard_normal(s) for s in [(7, 3), (5, 3), (4, 3)]]
    contraction.clear_cache()
    plans = set()
    for rows in (1, 2, 300, 5):
        a, x = rng.standard_normal((rows, 7)), rng.standard_normal((rows, 5))
        plan = contraction.get_plan(equation, (rows, 7), (rows, 5), *(f.shape for f in factors), dtype="float64",
                                    batch="a")
        plans.add(id(plan))
        np.testing.assert_allclose(plan(a, x, *factors, backend="numpy"), np.einsum(equation, a, x, *factors),
                                   rtol=1e-12, atol=1e-12)
    assert len(plans) == 1 and contraction.cache_info()["misses"] == 1
    assert plan.shapes[0] == (contraction.SEARCH_ROWS, 7) and plan.batch == "a"
    with pytest.raises(ValueError, match="batch='ab' is not an index"):
        contraction.get_plan(equation, (2, 7), (2, 5), *(f.shape for f in factors), batch="ab")


def test_tuning_never_runs_on_more_rows_than_search_rows(monkeypatch):
    """A large first batch is timed on its first SEARCH_ROWS rows; a small one on zeros of SEARCH_ROWS rows."""
    seen = []
    original = contraction.Plan.tune

    def recording(self, *operands, **kwargs):
        seen.append([tuple(o.shape) for o in operands])
        return original(self, *operands, **kwargs)

    monkeypatch.setattr(contraction.Plan, "tune", recording)
    layer = tensormoe.CPMMoE(64, 48, [96], rank=32)
    for rows in (3000, 3):  # a new layer shape each time: planned and timed anew
        contraction.clear_cache()
        seen.clear()
        layer(np.ones((rows, 64), dtype="float32"))
        assert seen and all(shape[0] <= contraction.SEARCH_ROWS for shapes in seen for shape in shapes[:2])
        assert seen[0][0] == (contraction.SEARCH_ROWS, 96)
