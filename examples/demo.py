"""Demo: a CP multilinear MoE layer with 1024 experts on the backend chosen by TENSORMOE_BACKEND.

It builds the layer (768 -> 768, rank 256), runs it on a batch, and prints the
output, the parameter count, the size of the dense weight tensor that is never
built, and the median time of a forward pass next to a linear layer of the same
in/out size (``x @ W + b`` on the same backend), timed call by call in turn.

Every backend prints the same numbers (to float32 rounding): the weights come
from one seed, drawn in NumPy and cast.  Times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

import tensormoe
from tensormoe.ops import get_ops

EXAMPLES = """\
examples:
  python examples/demo.py                              # NumPy (or whatever TENSORMOE_BACKEND says)
  TENSORMOE_BACKEND=pytorch python examples/demo.py    # the same layer on PyTorch
  TENSORMOE_BACKEND=jax python examples/demo.py        # ... and on JAX
  python examples/demo.py --experts 64 --rank 32 --dim 128 --repeats 50

Everything is printed; no file is written.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--experts", type=_positive_int, default=1024, help="number of experts N (default 1024)")
    p.add_argument("--rank", type=_positive_int, default=256, help="CP rank R (default 256)")
    p.add_argument("--dim", type=_positive_int, default=768, help="input and output features (default 768)")
    p.add_argument("--batch", type=_positive_int, default=64, help="batch size (default 64)")
    p.add_argument(
        "--repeats", type=_positive_int, default=20,
        help="timed calls of the layer and of the linear layer, taken in turn; medians are printed (default 20)",
    )
    return p


def _wait(y: Any) -> Any:
    """Wait for an asynchronous backend (JAX, CUDA) to finish computing ``y``."""
    if hasattr(y, "block_until_ready"):
        y.block_until_ready()
    elif getattr(y, "is_cuda", False):
        import torch

        torch.cuda.synchronize(y.device)
    return y


def median_times(functions: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn so that a slow spell hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            _wait(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _threads(backend: str) -> str:
    if backend == "pytorch":
        import torch

        return f"{torch.get_num_threads()} PyTorch threads"
    return "the backend's default threads"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the layer on the current backend, time it against a linear layer, print and return the results."""
    args = parser().parse_args(argv)
    backend = tensormoe.get_backend()
    layer = tensormoe.CPMMoE(args.dim, args.dim, expert_dims=[args.experts], rank=args.rank, seed=0)
    ops = get_ops()
    rng = np.random.default_rng(1)
    # non-zero gates, so that every input picks its own mixture of experts
    layer.params = {**layer.params, "gate_0": ops.asarray(rng.normal(size=(args.dim, args.experts)), "float32")}
    x = ops.asarray(rng.normal(size=(args.batch, args.dim)), "float32")
    weight = ops.asarray(rng.normal(size=(args.dim, args.dim)) / np.sqrt(args.dim), "float32")
    bias = ops.asarray(np.zeros(args.dim), "float32")

    y = _wait(layer(x))  # the first call plans the contraction for this batch size
    _wait(layer(x))
    _wait(x @ weight + bias)
    median = median_times({"layer": lambda: layer(x), "linear": lambda: x @ weight + bias}, args.repeats)

    y_np = ops.to_numpy(y).astype(np.float64)
    a_np = ops.to_numpy(layer.coefficients(None, x)[0])
    dense_bytes = layer.n_dense_params * 4
    ratio = median["layer"] / median["linear"]
    print(f"backend            {backend}")
    print(f"layer              {layer!r}")
    print(f"output shape       {tuple(y.shape)}")
    print(f"parameters         {layer.n_params:,}")
    print(f"dense equivalent   {layer.n_dense_params:,} weights ({dense_bytes / 2**30:.1f} GiB in float32, never built)")
    print(f"forward FLOPs      {layer.plan(args.batch).flops:,} (planned path)")
    print(f"active experts     {np.count_nonzero(a_np, axis=-1).mean():.1f} per input on average (entmax-1.5 gate)")
    print(f"output mean/std    {y_np.mean():+.6f} / {y_np.std():.6f}")
    print(f"output[0, :4]      {np.array2string(y_np[0, :4], precision=5, floatmode='fixed')}")
    print(f"forward time       {median['layer'] * 1e3:.2f} ms  (median of {args.repeats} calls, batch {args.batch})")
    print(f"linear x @ W + b   {median['linear'] * 1e3:.2f} ms  ({args.dim} x {args.dim}, same backend, same calls)")
    print(f"ratio              {ratio:.1f}x the linear layer's time ({_threads(backend)})")
    return {"backend": backend, "layer_s": median["layer"], "linear_s": median["linear"], "ratio": ratio,
            "output": y_np}


if __name__ == "__main__":
    main()
