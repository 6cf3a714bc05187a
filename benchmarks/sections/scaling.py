"""Section 6: the CP forward and its limit against the experts (one and two levels), the batch and the rank."""

from __future__ import annotations

import math

from cases import make_case
from harness import Backend, ratio, time_side_by_side, verify
from sections.limit import LIMITS, matmul_rate


def section_scaling(be: Backend, cfg: dict, out: dict) -> None:
    """Each point also gives the time per FLOP against the measured matmul rate (``vs_flops``): flat means
    the layer costs what its arithmetic costs at every size."""
    rates = [r for r in out["matmul_rate"] if r["backend"] == be.label]
    flops_per_ms = (rates[0] if rates else matmul_rate(be, cfg))["gflops_per_s"] * 1e6
    points = [("experts", n if isinstance(n, list) else [n], cfg["scaling_rank"], cfg["scaling_batch"])
              for n in cfg["scaling_ns"]]
    points += [("batch", [cfg["scaling_batch_n"]], cfg["scaling_batch_rank"], b) for b in cfg["scaling_batches"]]
    points += [("rank", [cfg["scaling_rank_n"]], r, cfg["scaling_batch"]) for r in cfg["scaling_ranks"]]
    for axis, dims, rank, batch in points:
        layer, pn, xn = make_case("cp", cfg["I"], cfg["O"], dims, rank, batch)
        p, x = be.params(pn), be.array(xn)
        fns = {"planned": lambda: layer.apply(p, x)}
        gate = None
        if axis != "rank" and be.name in cfg["gate_candidates"]:
            limit, gate = LIMITS.forward(be, layer, p, x, cfg)
            verify(f"{be.label} scaling {dims} B={batch}", be.numpy(limit(p, x)), be.numpy(layer.apply(p, x)))
            fns["limit"] = lambda: limit(p, x)
        t = time_side_by_side(fns, be, cfg["scaling_repeats"], cfg["row_budget_s"])
        flops = layer.cost(batch).flops
        row = {"backend": be.label, "axis": axis, "expert_dims": dims, "levels": len(dims),
               "experts": math.prod(dims), "rank": rank, "batch": batch, **t["planned"], "gflops": flops / 1e9,
               "vs_flops": t["planned"]["min_ms"] / (flops / flops_per_ms)}
        if "limit" in t:
            row.update(limit=t["limit"], limit_gate=gate, ratio=ratio(t["planned"], t["limit"]),
                       limit_vs_flops=t["limit"]["min_ms"] / (flops / flops_per_ms))
        out["scaling"].append(row)
