"""Worker of tests/test_distributed_jax.py: ``XLA_FLAGS=--xla_force_host_platform_device_count=4 python THIS OUT``.

Trains every case of ``distributed_cases`` for ``STEPS`` SGD steps on 4 host
devices, batch-sharded (data parallel) and rank-sharded
(:func:`tensormoe.distributed.jax.rank_parallel`), plus one case on a 2 x 2
(data, rank) mesh, and writes ``OUT/results.npz``: losses, final parameters and
the collectives of each compiled program.  The pytest process compares them
with its own one-device runs.
"""

from __future__ import annotations

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distributed_cases import JAX_CASES, batch, jax_layer, jax_loss, jax_sgd, jax_train

from tensormoe.distributed.jax import rank_parallel, rank_sharding
from tensormoe.routers import aux_loss

# one instruction per line: "%name = <result shapes> <kind>(<operands>)"; a tuple's shapes may hold /*index=5*/
_COLLECTIVE = re.compile(
    r"= (?P<shapes>.*?) (?P<kind>all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)


def collectives(compiled) -> list[tuple[str, list[str]]]:
    """``(kind, [array shapes])`` of every collective instruction of a compiled program."""
    return [(m["kind"], re.findall(r"\w+\[[\d,]*\]", m["shapes"])) for m in _COLLECTIVE.finditer(compiled.as_text())]


def record(results, key, losses, layer, programs) -> None:
    results[f"{key}/losses"] = np.array(losses)
    results.update({f"{key}/params/{n}": np.asarray(v) for n, v in layer.params.items()})
    for name, compiled in programs.items():
        results[f"{key}/{name}"] = np.array(json.dumps(collectives(compiled)))


def main() -> None:
    out = sys.argv[1]
    devices = jax.devices()
    if len(devices) != 4:
        raise SystemExit(f"expected 4 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=4); got {devices}")
    data = Mesh(np.array(devices), ("data",))
    ranks = Mesh(np.array(devices), ("rank",))
    results: dict[str, np.ndarray] = {}
    rows = NamedSharding(data, PartitionSpec("data"))
    replicated = NamedSharding(ranks, PartitionSpec())
    for fmt, router in JAX_CASES:
        key = f"{fmt}/{router}"
        layer = jax_layer(fmt, router)

        # -- data parallel: rows over 4 devices, parameters replicated
        step = jax_sgd(lambda layer, x, t, router=router: jax_loss(layer, x, t, router))
        placed = jax.device_put(layer, NamedSharding(data, PartitionSpec()))
        losses, final, compiled = jax_train(step, placed, lambda x, t: (jax.device_put(x, rows), jax.device_put(t, rows)))
        record(results, f"data/{key}", losses, final, {"step_collectives": compiled})

        # -- rank parallel: the default rank over 4 devices, rows replicated
        forward = rank_parallel(layer, ranks)

        def loss(layer, x, t, forward=forward, router=router):
            y, routing = forward(layer, x, return_routing=True)
            value = jnp.mean(jnp.sum((y - t) ** 2, axis=-1))
            return value + aux_loss(routing) if router == "top2" else value

        placed = jax.device_put(layer, rank_sharding(layer, ranks))
        losses, final, compiled = jax_train(jax_sgd(loss), placed, lambda x, t: (jax.device_put(x, replicated),
                                                                          jax.device_put(t, replicated)))
        x = jax.device_put(batch(0, "float32")[0], replicated)
        forward_only = jax.jit(forward).lower(placed, x).compile()
        record(results, f"rank/{key}", losses, final, {"step_collectives": compiled, "forward_collectives": forward_only})
        results[f"rank/{key}/specs"] = np.array(json.dumps({n: str(v.sharding.spec) for n, v in final.params.items()}))

    # -- data x rank: a 2 x 2 mesh, rows over "data", the rank over "rank"
    grid = Mesh(np.array(devices).reshape(2, 2), ("data", "rank"))
    for fmt, router in [("tr", "top2")]:
        layer = jax_layer(fmt, router)
        forward = rank_parallel(layer, grid, axis="rank", batch_axis="data")

        def loss(layer, x, t, forward=forward, router=router):
            y, routing = forward(layer, x, return_routing=True)
            return jnp.mean(jnp.sum((y - t) ** 2, axis=-1)) + aux_loss(routing)

        grid_rows = NamedSharding(grid, PartitionSpec("data"))
        placed = jax.device_put(layer, rank_sharding(layer, grid, axis="rank"))
        losses, final, compiled = jax_train(jax_sgd(loss), placed, lambda x, t, rows=grid_rows: (
            jax.device_put(x, rows), jax.device_put(t, rows)))
        record(results, f"grid/{fmt}/{router}", losses, final, {"step_collectives": compiled})
    np.savez(os.path.join(out, "results.npz"), **results)


if __name__ == "__main__":
    main()
