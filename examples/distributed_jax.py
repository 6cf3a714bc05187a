"""Train an MMoE classifier over several JAX devices: the batch sharded, or the factorization's rank sharded.

    python examples/distributed_jax.py                        # 4 CPU devices, data parallel, digits
    python examples/distributed_jax.py --scheme rank --router top2
    python examples/distributed_jax.py --scheme both           # a 2 x 2 (data, rank) mesh
    python examples/distributed_jax.py --synthetic --steps 30 --devices 1 2 4   # step times side by side

On CPU the script asks XLA for ``--host-devices`` devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before JAX is
imported); on GPUs it uses the GPUs.  Model: ``x -> MMoE -> GELU -> linear
head``, trained with Adam in one ``jax.jit``-compiled step.

Schemes:

* ``data``: parameters replicated (``NamedSharding(mesh, P())``), rows of every
  batch sharded over the mesh (``P("data")``); XLA all-reduces the gradients.
* ``rank``: the MMoE's factors sharded on their default rank
  (:func:`tensormoe.distributed.jax.rank_sharding`), its forward
  :func:`tensormoe.distributed.jax.rank_parallel` (one all-reduce of ``y``);
  rows and the head replicated.
* ``both``: a 2-D mesh, rows over ``data`` and the rank over ``rank``.

With ``--devices 1 2 4`` the same training runs on meshes of the first 1, 2
and 4 devices, interleaved step by step (round robin), and the median step
time of each is printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scheme", choices=["data", "rank", "both"], default="data")
    parser.add_argument("--format", choices=["cp", "tucker", "tt", "tr"], default="cp")
    parser.add_argument("--rank", type=int, default=32, help="the factorization's rank (every bond for TT/TR)")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--router", choices=["dense", "top2"], default="dense")
    parser.add_argument("--batch", type=int, default=128, help="rows per step")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the digits")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: --epochs)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median step time")
    parser.add_argument("--synthetic", action="store_true", help="random data (timing) instead of the digits")
    parser.add_argument("--in-dim", type=int, default=64, help="features of the synthetic rows")
    parser.add_argument("--host-devices", type=int, default=4, help="CPU devices XLA creates (CPU only)")
    parser.add_argument("--devices", type=int, nargs="+", default=None,
                        help="mesh sizes to train on side by side (default: every device)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    if "jax" not in sys.modules:  # the host devices must be asked for before JAX starts
        flag = f"--xla_force_host_platform_device_count={args.host_devices}"
        os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), flag) if f)
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import tensormoe
    from tensormoe.distributed.jax import rank_parallel, rank_sharding
    from tensormoe.jax import wrap
    from tensormoe.routing import aux_loss

    # -- data (the same as examples/distributed_torch.py)
    if args.synthetic:
        rng = np.random.default_rng(0)
        x_train = rng.normal(size=(args.batch * 8, args.in_dim)).astype(np.float32)
        y_train = rng.integers(0, 10, size=len(x_train))
        x_test, y_test = x_train[: args.batch], y_train[: args.batch]
    else:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
        mean, std = x_train.mean(0), x_train.std(0) + 1.0
        x_train, x_test = (((a - mean) / std).astype(np.float32) for a in (x_train, x_test))

    # -- model: the MMoE (a tensormoe.jax pytree) and a linear head, in one pytree
    ranks = args.rank if args.format != "tucker" else [min(args.rank, args.experts), args.rank, args.rank]
    layer = wrap(tensormoe.layers.make_layer(args.format, x_train.shape[1], args.hidden, [args.experts], ranks,
                                            router="top2" if args.router == "top2" else None, seed=0))
    key = jax.random.PRNGKey(0)
    head = {"w": jax.random.normal(key, (args.hidden, 10)) / np.sqrt(args.hidden), "b": jnp.zeros(10)}

    def make_step(mesh: Mesh):
        """The placed model, the row sharding, and the jitted Adam step for this mesh."""
        rank_axis = {"data": None, "rank": "rank", "both": "rank"}[args.scheme]
        data_axis = {"data": "data", "rank": None, "both": "data"}[args.scheme]
        if rank_axis:
            forward = rank_parallel(layer, mesh, axis=rank_axis, batch_axis=data_axis)
            mmoe = jax.device_put(layer, rank_sharding(layer, mesh, axis=rank_axis))
        else:
            def forward(mmoe, x, return_routing):
                return mmoe.layer.apply(mmoe.params, x, return_routing=return_routing, backend="jax")

            mmoe = jax.device_put(layer, NamedSharding(mesh, P()))
        model = {"mmoe": mmoe, "head": jax.device_put(head, NamedSharding(mesh, P()))}
        rows = NamedSharding(mesh, P(data_axis))

        def loss_fn(model, x, y):
            h, routing = forward(model["mmoe"], x, return_routing=True)
            logits = jax.nn.gelu(h) @ model["head"]["w"] + model["head"]["b"]
            loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
            return loss + (aux_loss(routing) if args.router == "top2" else 0.0), logits

        def step(model, moments, x, y, t):
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(model, x, y)
            m, v = moments
            m = jax.tree_util.tree_map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
            v = jax.tree_util.tree_map(lambda v, g: 0.999 * v + 0.001 * g * g, v, grads)
            model = jax.tree_util.tree_map(
                lambda p, m, v: p - 3e-3 * (m / (1 - 0.9**t)) / (jnp.sqrt(v / (1 - 0.999**t)) + 1e-8), model, m, v)
            return model, (m, v), loss

        zeros = jax.tree_util.tree_map(jnp.zeros_like, model)
        predict = jax.jit(lambda model, x: loss_fn(model, x, jnp.zeros(len(x), jnp.int32))[1])
        return model, (zeros, zeros), rows, jax.jit(step), predict

    def mesh_of(n: int) -> Mesh:
        devices = np.array(jax.devices()[:n])
        if args.scheme == "both":
            return Mesh(devices.reshape(max(1, n // 2), min(n, 2)), ("data", "rank"))
        return Mesh(devices, ("data",) if args.scheme == "data" else ("rank",))

    sizes = args.devices or [len(jax.devices())]
    if max(sizes) > len(jax.devices()):
        raise SystemExit(f"--devices {sizes} asks for more than the {len(jax.devices())} devices JAX has")
    runs = {n: make_step(mesh_of(n)) for n in sizes}
    per_epoch = len(x_train) // args.batch
    total = args.steps if args.steps is not None else args.epochs * per_epoch
    order = np.concatenate([np.random.default_rng(0).permutation(len(x_train)) for _ in range(total // per_epoch + 1)])
    times: dict[int, list[float]] = {n: [] for n in sizes}
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        progress = tqdm(total=total * len(sizes), desc=f"{args.scheme} on {sizes} device(s)", unit="step")
    for t in range(total):
        index = order[t * args.batch:(t + 1) * args.batch]
        for n in sizes:  # round robin: a slow spell of the machine slows every mesh alike
            model, moments, rows, step, predict = runs[n]
            x, y = jax.device_put(x_train[index], rows), jax.device_put(y_train[index], rows)
            start = time.perf_counter()
            model, moments, loss = step(model, moments, x, y, t + 1)
            loss.block_until_ready()
            times[n].append(time.perf_counter() - start)
            runs[n] = (model, moments, rows, step, predict)
            if progress is not None:
                progress.update()
    if progress is not None:
        progress.close()

    results = []
    for n in sizes:
        model, _, rows, _, predict = runs[n]
        logits = predict(model, jax.device_put(x_test[: len(x_test) // n * n], rows))
        accuracy = float((np.asarray(logits).argmax(-1) == y_test[: len(logits)]).mean())
        cost = layer.layer.cost(args.batch)
        results.append({
            "scheme": args.scheme, "devices": n, "format": args.format, "router": args.router, "batch": args.batch,
            "steps": total, "step_ms": 1e3 * statistics.median(times[n][args.warmup:] or times[n]),
            "accuracy": accuracy, "data_parallel_bytes": cost.data_parallel_bytes,
            "rank_parallel_bytes": cost.rank_parallel_bytes, "platform": jax.devices()[0].platform,
        })
        print(f"{args.scheme} on {n} {results[-1]['platform']} device(s): median step {results[-1]['step_ms']:.2f} ms, "
              f"test accuracy {accuracy:.3f}" + (" (synthetic labels)" if args.synthetic else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    return results


if __name__ == "__main__":
    main()
