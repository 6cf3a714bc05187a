"""Demo: a CP multilinear MoE layer with 1024 experts on the backend chosen by TENSORMOE_BACKEND.

Run:  python examples/demo.py            (NumPy)
      TENSORMOE_BACKEND=pytorch python examples/demo.py
      TENSORMOE_BACKEND=jax python examples/demo.py

Every backend prints the same numbers (to float32 rounding): the weights come
from one seed, drawn in NumPy and cast.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import tensormoe
from tensormoe.ops import get_ops


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=1024, help="number of experts (default 1024)")
    parser.add_argument("--rank", type=int, default=256, help="CP rank (default 256)")
    parser.add_argument("--dim", type=int, default=768, help="input and output features (default 768)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    args = parser.parse_args(argv)

    backend = tensormoe.get_backend()
    layer = tensormoe.CPMMoE(args.dim, args.dim, expert_dims=[args.experts], rank=args.rank, seed=0)
    ops = get_ops()
    rng = np.random.default_rng(1)
    # non-zero gates, so that every input picks its own mixture of experts
    layer.params = {**layer.params, "gate_0": ops.asarray(rng.normal(size=(args.dim, args.experts)), "float32")}
    x = ops.asarray(rng.normal(size=(args.batch, args.dim)), "float32")

    y = layer(x)  # plans the contraction once
    start = time.perf_counter()
    y = layer(x)
    if hasattr(y, "block_until_ready"):
        y.block_until_ready()
    elapsed = time.perf_counter() - start

    y_np = ops.to_numpy(y).astype(np.float64)
    a_np = ops.to_numpy(layer.coefficients(None, x)[0])
    dense_bytes = layer.n_dense_params * 4
    print(f"backend            {backend}")
    print(f"layer              {layer!r}")
    print(f"output shape       {tuple(y.shape)}")
    print(f"parameters         {layer.n_params:,}")
    print(f"dense equivalent   {layer.n_dense_params:,} weights ({dense_bytes / 2**30:.1f} GiB in float32, never built)")
    print(f"forward FLOPs      {layer.plan(args.batch).flops:,} (planned path)")
    print(f"active experts     {np.count_nonzero(a_np, axis=-1).mean():.1f} per input on average (entmax-1.5 gate)")
    print(f"output mean/std    {y_np.mean():+.6f} / {y_np.std():.6f}")
    print(f"output[0, :4]      {np.array2string(y_np[0, :4], precision=5, floatmode='fixed')}")
    print(f"forward time       {elapsed * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
