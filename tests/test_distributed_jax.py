"""Data and rank parallelism on JAX: 4 host devices against one device.

One subprocess (``distributed_jax_worker.py``, started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX loads) trains
the JAX cases of ``distributed_cases`` (every format with the dense gate, CP
with top-2 routing and its auxiliary losses; every parameter random) for
``STEPS`` SGD steps with the rows sharded (data parallel) and with the default
rank sharded (:func:`tensormoe.distributed.jax.rank_parallel`), and TR with
top-2 routing on a 2 x 2 (data, rank) mesh.  The tests compare the losses and
final parameters with the same steps on one device in this process, and read
the collectives of each compiled program.  Float32: tolerance ``2e-5``
absolute and relative (measured differences ~1e-6; a wrong share or reduction
is off by O(0.1)).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from distributed_cases import (
    IN_DIM,
    JAX_CASES,
    OUT_DIM,
    ROWS,
    functional_layer,
    jax_layer,
    jax_loss,
    jax_sgd,
    jax_train,
    launch,
)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_jax_worker.py")
TOLERANCE = 2e-5
IDS = [f"{fmt}-{router}" for fmt, router in JAX_CASES]
DENSE = [(fmt, router) for fmt, router in JAX_CASES if router == "dense"]

#: Where the default rank sits, written out by hand for each format (PartitionSpecs as JAX prints them)
SPLIT = {
    "cp": {"factor_0": "P(None, 'rank')", "factor_1": "P(None, 'rank')", "factor_2": "P(None, 'rank')"},
    "tucker": {"factor_2": "P(None, 'rank')", "core": "P(None, None, 'rank')"},
    "tt": {"factor_1": "P(None, None, 'rank')", "factor_2": "P('rank',)"},
    "tr": {"factor_1": "P(None, None, 'rank')", "factor_2": "P('rank',)"},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The 4-device run (about 20 s on 2 quiet cores, 50 s on busy ones; killed after 300 s)."""
    out = tmp_path_factory.mktemp("jax_distributed")
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4") if f)

    def references():  # computed while the worker runs
        for fmt, router in [*JAX_CASES, ("tr", "top2")]:
            reference(fmt, router)

    return launch([sys.executable, WORKER, str(out)], out, timeout=300, env={"XLA_FLAGS": flags}, meanwhile=references)


@functools.cache
def reference(fmt: str, router: str) -> tuple[list[float], dict[str, np.ndarray]]:
    """The same steps on one device, the whole batch."""
    import jax.numpy as jnp

    step = jax_sgd(lambda layer, x, t: jax_loss(layer, x, t, router))
    losses, final, _ = jax_train(step, jax_layer(fmt, router), lambda x, t: (jnp.asarray(x), jnp.asarray(t)))
    return losses, {name: np.asarray(value) for name, value in final.params.items()}


def check_equal(results, key: str, fmt: str, router: str) -> None:
    losses, params = reference(fmt, router)
    np.testing.assert_allclose(results[f"{key}/losses"], losses, rtol=TOLERANCE, atol=TOLERANCE, err_msg=key)
    initial = functional_layer(fmt, router, dtype="float32").params
    for name, value in params.items():
        np.testing.assert_allclose(results[f"{key}/params/{name}"], value, rtol=TOLERANCE, atol=TOLERANCE,
                                   err_msg=f"{key} {name}")
    assert max(np.abs(params[n] - initial[n]).max() for n in params) > 0.05  # the steps moved the parameters


def collectives(results, key: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """``(kind, [(dtype, shape), ...])`` of every collective of a compiled program."""
    out = []
    for kind, arrays in json.loads(str(results[key])):
        parsed = []
        for array in arrays:
            dtype, dims = re.fullmatch(r"(\w+)\[([\d,]*)\]", array).groups()
            parsed.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
        out.append((kind, parsed))
    return out


@pytest.mark.parametrize(("fmt", "router"), JAX_CASES, ids=IDS)
def test_data_parallel_equals_one_device(results, fmt, router):
    check_equal(results, f"data/{fmt}/{router}", fmt, router)


@pytest.mark.parametrize(("fmt", "router"), DENSE, ids=[f"{f}-{r}" for f, r in DENSE])
def test_data_parallel_all_reduces_every_gradient_once(results, fmt, router):
    """Rows are independent with the dense gate: the only collective is the gradients' all-reduce (and scalars).

    It carries at most every parameter's gradient once (``Cost.data_parallel_bytes``, what DDP sends).  XLA
    may all-reduce less: where the plan multiplies two parameters before meeting the rows (Tucker: the core
    with the output factor), the gradient of their ``[3, 2, 6]`` product is summed over devices instead of
    the two gradients it yields (36 numbers instead of 48).  Every gate and input/expert factor meets the
    rows itself, so its gradient is always in the all-reduce.
    """
    found = collectives(results, f"data/{fmt}/{router}/step_collectives")
    assert {kind for kind, _ in found} == {"all-reduce"}, found
    arrays = [shape for _, group in found for dtype, shape in group if shape]  # scalars: the loss, a flag
    layer = functional_layer(fmt, router, dtype="float32")
    assert layer.n_params == layer.cost(ROWS).data_parallel_bytes // 4
    assert sum(math.prod(shape) for shape in arrays) <= layer.n_params, arrays
    for name in ("gate_0", "factor_0", "factor_1"):  # these meet the rows: their gradients are summed as they are
        size = math.prod(layer.params[name].shape)  # XLA may sum it in another layout (a TT core as [r0 r1, I])
        assert size in [math.prod(a) for a in arrays], (name, layer.params[name].shape, arrays)


@pytest.mark.parametrize(("fmt", "router"), JAX_CASES, ids=IDS)
def test_rank_parallel_equals_one_device(results, fmt, router):
    check_equal(results, f"rank/{fmt}/{router}", fmt, router)
    specs = json.loads(str(results[f"rank/{fmt}/{router}/specs"]))
    assert specs == {name: SPLIT[fmt].get(name, "P()") for name in specs}, "the gradient step kept the shardings"


@pytest.mark.parametrize(("fmt", "router"), JAX_CASES, ids=IDS)
def test_rank_parallel_forward_holds_one_all_reduce_of_the_output(results, fmt, router):
    assert collectives(results, f"rank/{fmt}/{router}/forward_collectives") == [
        ("all-reduce", [("f32", (ROWS, OUT_DIM))])
    ]


@pytest.mark.parametrize(("fmt", "router"), JAX_CASES, ids=IDS)
def test_rank_parallel_step_all_reduces_only_rows(results, fmt, router):
    """Forward: ``y[B, O]``; backward: per-row cotangents where the replicated part meets the split one.

    No parameter-sized array and no gather, scatter or permutation: the split
    factors never travel.
    """
    found = collectives(results, f"rank/{fmt}/{router}/step_collectives")
    assert {kind for kind, _ in found} == {"all-reduce"}, found
    arrays = [shape for _, group in found for _, shape in group]
    assert arrays.count((ROWS, OUT_DIM)) == 1, found
    assert all(shape[0] == ROWS for shape in arrays), found


def test_data_times_rank_mesh_equals_one_device(results):
    check_equal(results, "grid/tr/top2", "tr", "top2")


def test_rank_sharding_errors_name_the_argument():
    from jax.sharding import Mesh

    from tensormoe.distributed.jax import rank_parallel, rank_sharding
    from tensormoe.jax import CPMMoE

    layer = CPMMoE(IN_DIM, OUT_DIM, [4], rank=3)
    mesh = Mesh(np.array(jax.devices()[:1]), ("rank",))
    with pytest.raises(ValueError, match="axis='data' is not an axis of the mesh"):
        rank_sharding(layer, mesh, axis="data")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        rank_sharding(layer, "cpu")
    with pytest.raises(TypeError, match="layer must be a tensormoe.jax layer"):
        rank_parallel(functional_layer("cp", "dense"), mesh)
    with pytest.raises(ValueError, match="batch_axis='rank' must differ"):
        rank_parallel(layer, mesh, batch_axis="rank")


@pytest.mark.skipif(
    not any(d.platform == "gpu" for d in jax.devices()) or len(jax.devices("gpu")) < 2, reason="needs 2 GPUs"
)
def test_rank_parallel_on_gpus():
    """Rank parallel over the first 2 GPUs (skipped without them)."""
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from tensormoe.distributed.jax import rank_parallel, rank_sharding

    mesh = Mesh(np.array(jax.devices("gpu")[:2]), ("rank",))
    for fmt, router in JAX_CASES:
        layer = jax_layer(fmt, router)
        x = jnp.asarray(np.random.default_rng(0).normal(size=(ROWS, IN_DIM)), dtype=jnp.float32)
        y = jax.jit(rank_parallel(layer, mesh))(jax.device_put(layer, rank_sharding(layer, mesh)), x)
        np.testing.assert_allclose(np.asarray(y), np.asarray(layer(x)), rtol=TOLERANCE, atol=TOLERANCE)
