"""Top-k routing contracts only the selected experts' factor rows: time it against the dense contraction.

For each expert configuration, one CP layer (in = out = 768, rank 256, batch 64)
runs the same forward twice through ``layer.apply``: with dense coefficients
``[B, N_h]`` per level (k non-zeros per row, the rest exactly zero), and with the
same weights given sparsely as ``Routing(weights, indices)``, which gathers the
``B * k`` selected rows of each expert factor.  Both give the same output; the
planned FLOPs (opt_einsum's count) and the fastest of ``--repeat`` calls (the
least disturbed by other processes on a shared machine) are printed side by side.

Run:  python benchmarks/sparse_routing.py [--backend numpy|pytorch|jax] [--repeat 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import tensormoe
from harness import Backend

CONFIGS = [[1024], [16384], [65536], [1024, 1024]]


def timed(fn, repeat: int) -> float:
    out = fn()
    if hasattr(out, "block_until_ready"):
        out.block_until_ready()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads (default: PyTorch's)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.backend in ("pytorch", "torch"):
        import torch

        torch.set_num_threads(args.threads)

    print(f"backend {args.backend}, CP rank {args.rank}, in = out = {args.dim}, batch {args.batch}, top-{args.k} per level")
    print("| experts | dense coefficients: GFLOP | ms | top-k gathered: GFLOP | ms | max abs difference |")
    print("|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    with tensormoe.backend_context(args.backend):
        be = Backend(tensormoe.get_backend())
        for dims in CONFIGS:
            layer = tensormoe.CPMMoE(args.dim, args.dim, dims, rank=args.rank)
            x = be.array(rng.normal(size=(args.batch, args.dim)).astype("float32"))
            routing, dense = [], []
            for n in dims:
                index = np.argsort(rng.random((args.batch, n)), axis=-1)[:, : args.k]
                weights = rng.dirichlet(np.ones(args.k), size=args.batch)
                full = np.zeros((args.batch, n))
                np.put_along_axis(full, index, weights, axis=-1)
                routing.append(tensormoe.Routing(be.array(weights.astype("float32")), be.array(index)))
                dense.append(be.array(full.astype("float32")))
            f = layer.factorization
            operand_shapes = [(args.batch, args.dim + 1), *f.param_shapes().values()]
            dense_plan = layer.plan(args.batch)
            gathered = [(args.batch, args.k, args.rank) if k < len(dims) else s
                        for k, s in enumerate(f.param_shapes().values())]
            sparse_plan = tensormoe.get_plan(
                f.routed_equation([True] * len(dims)),
                *[(args.batch, args.k)] * len(dims), operand_shapes[0], *gathered,
            )
            t_dense = timed(lambda: layer.apply(None, x, coefficients=dense), args.repeat)
            t_sparse = timed(lambda: layer.apply(None, x, routing=routing), args.repeat)
            diff = np.abs(be.numpy(layer.apply(None, x, coefficients=dense))
                          - be.numpy(layer.apply(None, x, routing=routing))).max()
            label = " x ".join(map(str, dims)) + f" = {np.prod(dims):,}"
            print(f"| {label} | {dense_plan.flops / 1e9:.3f} | {t_dense * 1e3:.2f} "
                  f"| {sparse_plan.flops / 1e9:.3f} | {t_sparse * 1e3:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
