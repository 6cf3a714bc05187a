"""The factorized CP forward against the dense reference, on every installed backend, in one run.

    python benchmarks/forward_vs_dense.py [--repeats 20]

Times (median of ``--repeats`` calls after a warm-up): the CP layer's planned
forward (B=64, I=O=768, rank 256, gates included) at 1024 and 128 experts, and
the dense reference (``dense_forward``: W reconstructed through TensorLy, then
one contraction) at 128 experts; 1024 experts would need a 2.3 GiB W.  Prints
the ratios, measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import tensormoe
from harness import Backend


def median_ms(fn, repeats: int) -> float:
    def run():
        out = fn()
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(64, 768))
    print(f"{'backend':8} {'CP N=1024':>10} {'CP N=128':>10} {'dense N=128':>12} {'dense/CP(128)':>14} {'dense(128)/CP(1024)':>20}")
    for backend in tensormoe.available_backends():
        with tensormoe.backend_context(backend):
            x = Backend(backend).array(x_np.astype("float32"))
            big = tensormoe.CPMMoE(768, 768, [1024], rank=256)
            small = tensormoe.CPMMoE(768, 768, [128], rank=256)
            t_big = median_ms(lambda: big(x), args.repeats)
            t_small = median_ms(lambda: small(x), args.repeats)
            t_dense = median_ms(lambda: small.dense_forward(None, x), max(3, args.repeats // 4))
            print(f"{backend:8} {t_big:9.2f}ms {t_small:9.2f}ms {t_dense:11.1f}ms {t_dense / t_small:13.0f}x {t_dense / t_big:19.0f}x")


if __name__ == "__main__":
    main()
