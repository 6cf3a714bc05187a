"""Every factorization on every installed backend equals the float64 dense reference, and the quick subset's list.

The property tests elsewhere draw the factorization at random; this one names each
(factorization, backend) pair, with every other parameter drawn from a generator seeded by
the pair, so that the quick subset (``-m "not slow"``, see
``tests/conftest.py``) covers all of them whatever examples Hypothesis draws.
"""

from __future__ import annotations

import ast
import pathlib
import zlib

import numpy as np
import pytest
from conftest import SLOW
from helpers import exact_forward, random_gates, rounding_tolerance, to_numpy

import tensormoe
from tensormoe.ops import get_ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = {"cp": tensormoe.CPMMoE, "tucker": tensormoe.TuckerMMoE, "tt": tensormoe.TTMMoE, "tr": tensormoe.TRMMoE}


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_layer_equals_the_float64_dense_reference(backend, kind):
    """One random layer of each factorization: two expert levels, random sizes, ranks, gates, input and bias."""
    rng = np.random.default_rng(zlib.crc32(f"{kind}-{backend}".encode()))
    experts = [int(n) for n in rng.integers(2, 5, size=2)]
    in_dim, out_dim, rank, batch = (int(v) for v in rng.integers(2, 6, size=4))
    bias, seed = bool(rng.integers(2)), int(rng.integers(2**16))
    key = "rank" if kind == "cp" else "ranks"
    layer = CLASSES[kind](in_dim, out_dim, experts, bias=bias, seed=seed, **{key: rank})
    params = random_gates(layer, seed)
    x = get_ops().asarray(rng.normal(size=(batch, in_dim)), "float32")
    y = to_numpy(layer.apply(params, x))
    coefficients = layer.coefficients(params, x)
    expected = exact_forward(layer, params, x, coefficients)  # TensorLy's reconstruction of W, einsum in float64
    tolerance = rounding_tolerance(layer, {k: to_numpy(v) for k, v in params.items()}, to_numpy(x),
                                   [to_numpy(a) for a in coefficients])
    assert y.shape == (batch, out_dim)
    assert np.all(np.abs(y - expected) <= tolerance), np.abs(y - expected).max()
    assert np.abs(expected).max() > 0  # a layer that computes something


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
