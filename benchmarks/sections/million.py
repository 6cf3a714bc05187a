"""Section 5: the million-expert CP layer against its limit and a linear layer, with FLOPs and peak memory."""

from __future__ import annotations

import math
import tracemalloc
from typing import Any

import numpy as np

import tensormoe
from cases import make_case, million_rank, same_gates_forward
from config import TARGET_LIMIT, TARGET_MEMORY, TARGET_MILLION
from harness import Backend, ratio, rss_window, run_cases, set_torch_threads, time_side_by_side, verify
from sections.limit import LIMITS


def rss_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: the peak RSS growth of one forward, after a warm-up call at batch 1."""
    backend = spec["backend"]
    if backend == "pytorch":
        set_torch_threads(spec["threads"])
    layer, params, x = make_case("cp", spec["I"], spec["O"], spec["dims"], spec["rank"], spec["batch"])
    with tensormoe.backend_context(backend):
        be = Backend(backend)
        p, xb, x1 = be.params(params), be.array(x), be.array(x[:1])
        be.sync(layer.apply(p, x1))  # start-up: thread pools, lazy initialisation
        before, after, method = rss_window(lambda: be.sync(layer.apply(p, xb)))
    return {"bytes": after - before, "method": method}


def forward_memory(be: Backend, layer: Any, p: dict, x: Any, spec: dict) -> dict[str, Any]:
    """Peak memory of one forward beyond the parameters and the input, and how it was measured."""
    if be.name == "numpy":
        layer.apply(p, x)
        tracemalloc.start()
        tracemalloc.reset_peak()
        layer.apply(p, x)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return {"bytes": peak, "method": "tracemalloc peak of one call"}
    if be.name == "jax":
        import jax

        compiled = jax.jit(lambda p, x: layer.apply(p, x)).lower(p, x).compile()
        ma = compiled.memory_analysis()
        if ma is None:
            return {"bytes": None, "method": "XLA memory_analysis unavailable"}
        return {"bytes": int(ma.temp_size_in_bytes + ma.output_size_in_bytes),
                "method": "XLA memory_analysis: temp + output"}
    if be.device != "cpu":
        import torch

        be.sync(layer.apply(p, x))
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        be.sync(layer.apply(p, x))
        return {"bytes": int(torch.cuda.max_memory_allocated() - before), "method": "torch.cuda.max_memory_allocated"}
    if spec["subprocess"]:
        (res,) = run_cases("rss", [{**spec, "backend": be.name}], 120)
        where = "one call in a fresh process after a warm-up at B=1"
    else:
        before, after, method = rss_window(lambda: be.sync(layer.apply(p, x)))
        res, where = {"bytes": after - before, "method": method}, "one call in this process (after the timings)"
    if res is None:
        return {"bytes": None, "method": "peak RSS growth: the worker timed out"}
    note = "" if res["bytes"] > 0 else " (0: the call fit in memory already resident, below what RSS resolves)"
    return {"bytes": max(0, res["bytes"]), "method": f"{res['method']}, {where}{note}"}


def section_million(be: Backend, cfg: dict, out: dict) -> None:
    dims = cfg["million"]
    batch = cfg["million_batch"]
    i, o = cfg["I"], cfg["O"]
    rank = million_rank(i, o, dims)
    layer, pn, xn = make_case("cp", i, o, dims, rank, batch)
    p, x = be.params(pn), be.array(xn)
    limit, gate_name = LIMITS.forward(be, layer, p, x, cfg)
    same = be.compile(lambda p, x: same_gates_forward(layer, p, x))
    y = be.numpy(layer.apply(p, x))
    out["verified"].append({"backend": be.label, "kind": "cp-million", "batch": batch,
                            **verify(f"{be.label} million", be.numpy(limit(p, x)), y)})
    verify(f"{be.label} million same gates", be.numpy(same(p, x)), y)
    w_io = be.array(np.random.default_rng(3).normal(size=(i, o)).astype("float32"))
    matmul = be.compile(lambda x, w: x @ w)
    low, lpn, _ = make_case("cp", i, o, dims, rank, batch, gate_rank=cfg["gate_rank"])  # a low-rank gate projection
    lp = be.params(lpn)
    fns = {"planned": lambda: layer.apply(p, x), "limit": lambda: limit(p, x), "same_gates": lambda: same(p, x),
           "linear": lambda: matmul(x, w_io), "gate_rank": lambda: low.apply(lp, x)}
    t = time_side_by_side(fns, be, cfg["repeats"], cfg["row_budget_s"])
    cost = layer.cost(batch)
    bound_elems = batch * (i + o + rank + sum(dims)) + layer.n_params
    mem = forward_memory(be, layer, p, x, {"I": i, "O": o, "dims": dims, "rank": rank, "batch": batch,
                                           "threads": cfg.get("threads", 1), "subprocess": cfg["rss_subprocess"]})
    mem_ratio = None if mem["bytes"] is None else mem["bytes"] / (4 * bound_elems)
    r = ratio(t["planned"], t["limit"])
    out["million"].append({
        "backend": be.label, "expert_dims": dims, "experts": math.prod(dims), "rank": rank, "batch": batch,
        "times": t, "vs_limit": r, "vs_linear": ratio(t["planned"], t["linear"]),
        "flops": {"gates": cost.gate_flops, "contraction": cost.forward_flops, "total": cost.flops,
                  "linear": cost.linear_flops, "total_over_linear": cost.flops / cost.linear_flops,
                  "gate_share": cost.gate_flops / cost.flops},
        "params": layer.n_params, "dense_w_bytes": layer.n_dense_params * 4,
        "memory": {**mem, "bound_bytes": 4 * bound_elems, "over_bound": mem_ratio,
                   "target": f"<= {TARGET_MEMORY} x 4 B x (B*(I+O+R+sum N) + params)",
                   "met": None if mem_ratio is None else mem_ratio <= TARGET_MEMORY},
        "target": f"planned/limit <= {TARGET_LIMIT}", "met": r["min"] <= TARGET_LIMIT,
        "limit_gate": gate_name, "same_gates_ratio": ratio(t["planned"], t["same_gates"]),
        "linear_target": f"planned/linear <= {TARGET_MILLION}" if be.name == "pytorch" else None,
        "linear_met": ratio(t["planned"], t["linear"])["min"] <= TARGET_MILLION if be.name == "pytorch" else None,
        "gate_rank": {"gate_rank": cfg["gate_rank"], "vs_linear": ratio(t["gate_rank"], t["linear"]),
                      "vs_full_gates": ratio(t["gate_rank"], t["planned"]), "flops": low.cost(batch).flops},
    })
