"""The framework-neutral part of tensormoe.distributed, on NumPy: a split rank's shares sum to the layer.

A factorized weight tensor is a sum over any one of its rank indices; each
worker of rank parallelism runs :func:`tensormoe.distributed.local_layer` on its
slices.  Checked here for every format and every rank index, against the dense
forward through the TensorLy reconstruction, with random parameters.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

import tensormoe
from tensormoe.accounting import data_parallel_bytes, make_factorization, rank_parallel_bytes
from tensormoe.distributed import default_rank_index, local_layer, rank_axes, rank_index_size, with_rank
from tensormoe.layer import make_layer

#: (format, ranks, every rank index that can be split in 2, the expected default)
LAYERS = [
    ("cp", 4, [0], 0),
    ("tucker", [2, 2, 6, 2], [0, 1, 2, 3], 3),
    ("tt", [1, 2, 4, 6, 1], [1, 2, 3], 3),
    ("tr", [2, 4, 2, 6], [0, 1, 2, 3], 3),
]


def random_layer(kind, ranks, router=None):
    layer = make_layer(kind, 5, 3, [4, 2], ranks, router=router, dtype="float64")
    rng = np.random.default_rng(len(kind))
    layer.params = {name: rng.normal(size=shape) for name, shape in layer.param_shapes().items()}
    return layer


def take(value: np.ndarray, axis: int, part: int, parts: int) -> np.ndarray:
    size = value.shape[axis] // parts
    return np.take(value, range(part * size, (part + 1) * size), axis=axis)


@pytest.mark.parametrize(("kind", "ranks", "indices", "default"), LAYERS, ids=[x[0] for x in LAYERS])
def test_shares_of_a_split_rank_sum_to_the_layer(kind, ranks, indices, default):
    x = np.random.default_rng(1).normal(size=(6, 5))
    for router in (None, "top2"):
        layer = random_layer(kind, ranks, router)
        with tensormoe.backend_context("numpy"):
            expected = layer.dense_forward(None, x)
            routing = layer.route(None, x)
            assert default_rank_index(layer) == default
            for k in indices:
                axes = rank_axes(layer, k)
                local = local_layer(layer, 2, k)
                assert rank_index_size(local, k) * 2 == rank_index_size(layer, k)
                shares = []
                for part in range(2):
                    params = {n: take(v, axes[n], part, 2) if n in axes else v for n, v in layer.params.items()}
                    shares.append(local.apply(params, x, routing=routing))
                np.testing.assert_allclose(sum(shares), expected, rtol=1e-10, atol=1e-12, err_msg=f"{kind} rank {k}")
                # each share alone is not the layer (the split does something)
                assert np.abs(shares[0] - expected).max() > 1e-3


def test_rank_axes_follow_the_network():
    """Every parameter holding the rank's letter, on the axis of that letter, written out by hand."""
    cp, tucker, tt, tr = (random_layer(kind, ranks) for kind, ranks, _, _ in LAYERS)
    assert rank_axes(cp) == {"factor_0": 1, "factor_1": 1, "factor_2": 1, "factor_3": 1}
    assert rank_axes(tucker, 1) == {"factor_1": 1, "core": 1}
    assert rank_axes(tucker) == {"factor_3": 1, "core": 3}
    assert rank_axes(tt, 1) == {"factor_0": 2, "factor_1": 0}
    assert rank_axes(tt) == {"factor_2": 2, "factor_3": 0}
    assert rank_axes(tr, 0) == {"factor_0": 0, "factor_3": 2}
    assert rank_axes(tr.factorization) == rank_axes(tr)


def test_with_rank_keeps_the_configuration():
    layer = make_layer("tt", 5, 3, [4], 4, router="top2", gate_rank=2, bias=False)
    other = with_rank(layer, 1, 2)
    assert other.factorization.bonds == (1, 2, 4, 1)
    assert (other.routers, other.gate_rank, other.bias) == (layer.routers, 2, False)


def test_errors_name_the_argument():
    layer = random_layer("cp", 4)
    with pytest.raises(ValueError, match=r"rank_index=1 does not name a rank .* expected an integer in \[0, 1\)"):
        rank_axes(layer, 1)
    with pytest.raises(ValueError, match="rank_index=0 of CP.* has size 4, which 3 parts do not divide"):
        local_layer(layer, 3)
    with pytest.raises(ValueError, match="parts must be"):
        local_layer(layer, 0)
    with pytest.raises(TypeError, match="layer must be a tensormoe layer"):
        rank_axes(object())
    with pytest.raises(TypeError, match="a functional layer has no device"):
        tensormoe.distributed.rank_sharding(layer, mesh=None)


@pytest.mark.parametrize("kind", ["cp", "tucker", "tt", "tr"])
def test_communication_bytes_by_hand(kind):
    """Data parallel: every parameter; rank parallel: y[B, O], a[B, N_h] per level, the replicated factors."""
    ranks = {"cp": 8, "tucker": [3, 2, 4, 6], "tt": [1, 3, 5, 6, 1], "tr": [2, 3, 5, 6]}[kind]
    f = make_factorization(kind, 7, 9, [4, 2], ranks)
    shapes = f.param_shapes()
    replicated = {
        "cp": [],
        "tucker": ["factor_0", "factor_1", "factor_2"],
        "tt": ["factor_0", "factor_1"],
        "tr": ["factor_0", "factor_1"],
    }[kind]
    factor_params = sum(math.prod(s) for s in shapes.values())
    assert data_parallel_bytes(f, 7, dtype="float64") == 8 * (factor_params + 7 * 4 + 7 * 2)
    assert data_parallel_bytes(f, 7, gate_rank=1) == 4 * (factor_params + 7 + 4 + 7 + 2)
    rows, replicated_params = 11, sum(math.prod(shapes[n]) for n in replicated)
    assert rank_parallel_bytes(f, rows, dtype="bfloat16") == 2 * (rows * (9 + 4 + 2) + replicated_params)
    cost = tensormoe.accounting.factorization_cost(f, rows, dtype="float64")
    assert (cost.data_parallel_bytes, cost.rank_parallel_bytes) == (
        data_parallel_bytes(f, 7, dtype="float64"), rank_parallel_bytes(f, rows, dtype="float64"))
    crossover = cost.parallel_crossover_batch
    if crossover > 0:  # at the crossover both schemes send the same bytes
        at = tensormoe.accounting.factorization_cost(f, 1, dtype="float64")
        per_row = (9 + 4 + 2) * 8
        assert math.isclose(at.rank_parallel_bytes + (crossover - 1) * per_row, cost.data_parallel_bytes)
    with pytest.raises(ValueError, match="dtype='int8' is not a parameter dtype"):
        rank_parallel_bytes(f, 1, dtype="int8")


def test_import_loads_no_framework():
    code = "import sys, tensormoe.distributed; print(sorted(m for m in ('torch', 'jax') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
