"""First calls: what a new layer (its one plan search and timing) and then a new batch size cost."""

from __future__ import annotations

import time

from tensormoe import contraction

from cases import make_case
from config import KINDS
from harness import Backend


def section_firstcall(be: Backend, cfg: dict, out: dict) -> None:
    """Single calls are noisy on a shared machine, so "a new batch size" is the fastest of the first calls at
    several new sizes (five; one on JAX), and "steady" the fastest of five repeated calls at the last of them."""
    if be.name not in cfg["firstcall_backends"]:
        return
    b = cfg["firstcall_batch"]
    # JAX compiles each new shape (seconds): one new size there
    new_sizes = [b + k for k in range(1, 1 + (1 if be.name == "jax" else cfg["firstcall_sizes"]))]
    for kind in KINDS:
        layer, pn, xn = make_case(kind, cfg["I"], cfg["O"], [cfg["N"]], cfg["ranks"][kind], new_sizes[-1])
        p = be.params(pn)
        xs = {rows: be.array(xn[:rows]) for rows in (b, *new_sizes)}

        def once(rows: int) -> float:
            start = time.perf_counter()
            be.sync(layer.apply(p, xs[rows]))
            return 1e3 * (time.perf_counter() - start)

        contraction.clear_cache()
        new_layer = once(b)
        searches = contraction.cache_info()["misses"]
        again = min(once(b) for _ in range(5))
        new_batch = min(once(rows) for rows in new_sizes)
        searches = contraction.cache_info()["misses"] - searches  # plan searches the new sizes caused
        steady = min(once(new_sizes[-1]) for _ in range(5))
        judged = be.name != "jax"  # on JAX a new shape is a new trace and XLA compilation, whatever the plan
        out["firstcall"].append({
            "backend": be.label, "kind": kind, "batch": b,
            "ms": {"new layer": new_layer, "again": again, "new batch size": new_batch, "steady": steady},
            "new_layer_extra_ms": new_layer - again, "new_batch_extra_ms": new_batch - steady,
            "new_batch_searches": searches,
            "target": "new batch size: < 20 ms extra (plan search and timing)" if judged else None,
            "met": new_batch - steady < 20 if judged else None,
        })
