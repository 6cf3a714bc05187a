"""How a plan is executed: opt_einsum's compiled expression vs tensormoe's lowered program.

Both run the same contraction of the same layer, side by side in one process:
opt_einsum's ``contract_expression`` (a generic pairwise contraction, which
transposes operands into a standard layout on every call) against the plan's
lowered program (matrix products over views, :mod:`tensormoe.lowering`).
Prints a Markdown table of minimum times in ms::

    python benchmarks/lowering.py
"""

import time

import numpy as np
import opt_einsum as oe

import tensormoe as tm
from cases import with_ones
from harness import EINSUM_NAMES, Backend


def side_by_side(f, g, n=200):
    """Minimum milliseconds of ``f()`` and of ``g()``, called alternately ``n`` times each after a warm-up."""
    for _ in range(5):
        f(), g()
    tf, tg = [], []
    for _ in range(n):
        for fn, ts in ((f, tf), (g, tg)):
            s = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - s)
    return np.min(tf) * 1e3, np.min(tg) * 1e3


LAYERS = {
    "cp": lambda: tm.CPMMoE(768, 768, [1024], rank=256),
    "tucker": lambda: tm.TuckerMMoE(768, 768, [1024], ranks=[64, 64, 64]),
    "tt": lambda: tm.TTMMoE(768, 768, [1024], ranks=[1, 32, 32, 1]),
    "tr": lambda: tm.TRMMoE(768, 768, [1024], ranks=[8, 16, 16]),
}


def main() -> None:
    rng = np.random.default_rng(0)
    print("| backend | layer | B | opt_einsum expression (ms, min) | lowered program (ms, min) | speed-up |")
    print("|---|---|---|---|---|---|")
    for be in tm.available_backends():
        if be == "jax":
            continue  # under jax.jit XLA compiles either into one program
        tm.set_backend(be)
        backend = Backend(be)
        for name, make in LAYERS.items():
            layer = make()
            p = layer.params
            for batch in (1, 64):
                x = backend.array(rng.standard_normal((batch, 768)).astype("float32"))
                operands = [*layer.coefficients(p, x), with_ones(x), *(p[k] for k in layer.factorization.network())]
                eq = layer.factorization.forward_equation()
                shapes = [tuple(o.shape) for o in operands]
                plan = tm.get_plan(eq, *shapes, backend=be)
                backend.tune(plan, operands)  # time the lowered candidates once, as a layer does
                expression = oe.contract_expression(eq, *shapes, optimize=oe.contract_path(eq, *shapes, shapes=True)[0])
                old, new = side_by_side(lambda: expression(*operands, backend=EINSUM_NAMES[be]),
                                        lambda: plan(*operands, backend=be))
                print(f"| {be} | {name} | {batch} | {old:.3f} | {new:.3f} | {old / new:.1f}x |")


if __name__ == "__main__":
    main()
