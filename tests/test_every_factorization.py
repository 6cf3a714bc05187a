"""Every factorization on every installed backend equals the float64 dense reference, and the quick subset's list.

The property tests elsewhere draw the factorization at random; this one names each
(factorization, backend) pair, so that the quick subset (``-m "not slow"``, see
``tests/conftest.py``) covers all of them whatever examples Hypothesis draws.
"""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
from conftest import SLOW
from helpers import exact_forward, random_gates, rounding_tolerance, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st

import tensormoe
from tensormoe.ops import get_ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = {"cp": tensormoe.CPMMoE, "tucker": tensormoe.TuckerMMoE, "tt": tensormoe.TTMMoE, "tr": tensormoe.TRMMoE}


@pytest.mark.parametrize("kind", sorted(CLASSES))
@settings(max_examples=2)
@given(
    levels=st.integers(1, 2),
    experts=st.lists(st.integers(1, 4), min_size=2, max_size=2),
    in_dim=st.integers(1, 5),
    out_dim=st.integers(1, 5),
    rank=st.integers(1, 3),
    batch=st.integers(1, 4),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_layer_equals_the_float64_dense_reference(backend, kind, levels, experts, in_dim, out_dim, rank, batch, bias,
                                                  seed):
    key = "rank" if kind == "cp" else "ranks"
    layer = CLASSES[kind](in_dim, out_dim, experts[:levels], bias=bias, seed=seed, **{key: rank})
    params = random_gates(layer, seed)
    x = get_ops().asarray(np.random.default_rng(seed + 1).normal(size=(batch, in_dim)), "float32")
    y = to_numpy(layer.apply(params, x))
    coefficients = layer.coefficients(params, x)
    expected = exact_forward(layer, params, x, coefficients)  # TensorLy's reconstruction of W, einsum in float64
    tolerance = rounding_tolerance(layer, {k: to_numpy(v) for k, v in params.items()}, to_numpy(x),
                                   [to_numpy(a) for a in coefficients])
    assert y.shape == (batch, out_dim)
    assert np.all(np.abs(y - expected) <= tolerance), np.abs(y - expected).max()


def test_the_slow_list_names_tests_that_exist():
    """A renamed test would silently rejoin the quick subset: every name in ``SLOW`` must still be defined."""
    stale = []
    for path, names in SLOW.items():
        file = ROOT / path
        if not file.is_file():
            stale.append(path)
            continue
        if path.startswith("tests/"):
            defined = {n.name for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.FunctionDef)}
        else:  # a module's doctests: named after the module and its objects
            defined = {path[:-3].replace("/", ".")}
        stale += [f"{path}::{name}" for name in names if name != "*" and name not in defined]
    assert stale == []
