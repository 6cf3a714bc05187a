"""Section 1: the planned forward (and forward+backward) against the limit, the same-gates chain and the FLOP time."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

import chains
import limit_gates
from cases import make_case, same_gates_forward
from config import KINDS, TARGET_LIMIT
from harness import Backend, ratio, time_side_by_side, verify


class Limits:
    """The limit's gate of each (backend, gate, logits shape): the fastest exact candidate, chosen once."""

    def __init__(self) -> None:
        self.chosen: dict[tuple, tuple[str, Callable]] = {}
        self.records: list[dict] = []

    def gate(self, be: Backend, layer: Any, p: dict, x: Any, cfg: dict) -> tuple[str, Callable]:
        """The name and function of the gate for this layer's logits ``x @ gate_0``, chosen on first use."""
        if layer.gate == "softmax":
            return "softmax", chains.softmax
        z = x @ p["gate_0"]
        z = chains.layer_norm(z) if layer.gate_norm is not None else z
        key = (be.label, layer.gate, tuple(z.shape))
        if key not in self.chosen:
            timer = lambda fns: time_side_by_side(fns, be, 3, cfg["limit_gate_budget"])
            name, fn, record = limit_gates.fastest(be.name, layer.gate, z, be.numpy, timer, cfg["compiled_gates"])
            self.chosen[key] = (name, fn)
            self.records.append({"backend": be.label, "gate": layer.gate, "logits": list(z.shape), "chosen": name,
                                 "candidates": record})
        return self.chosen[key]

    def forward(self, be: Backend, layer: Any, p: dict, x: Any, cfg: dict) -> tuple[Callable, str]:
        """``limit(p, x)`` (compiled on JAX) and the name of its gate."""
        name, act = self.gate(be, layer, p, x, cfg)
        return be.compile(lambda p, x: chains.limit_forward(layer, p, x, act)), name


LIMITS = Limits()


def matmul_rate(be: Backend, cfg: dict) -> dict[str, float]:
    """The machine's matrix-product rate on this backend: ``x[B, I] @ W[I, O]`` at the largest limit batch."""
    rng = np.random.default_rng(11)
    b = max(cfg["batches"])
    x = be.array(rng.normal(size=(b, cfg["I"])).astype("float32"))
    w = be.array(rng.normal(size=(cfg["I"], cfg["O"])).astype("float32"))
    matmul = be.compile(lambda x, w: x @ w)
    t = time_side_by_side({"matmul": lambda: matmul(x, w)}, be, cfg["repeats"], cfg["row_budget_s"])["matmul"]
    flops = 2 * b * cfg["I"] * cfg["O"]
    return {"shape": [b, cfg["I"], cfg["O"]], "gflops_per_s": flops / (t["min_ms"] * 1e6), **t}


def section_limit(be: Backend, cfg: dict, out: dict) -> None:
    rate = matmul_rate(be, cfg)
    out["matmul_rate"].append({"backend": be.label, **rate})
    flops_per_ms = rate["gflops_per_s"] * 1e6
    for kind in KINDS:
        for batch in cfg["batches"]:
            layer, pn, xn = make_case(kind, cfg["I"], cfg["O"], [cfg["N"]], cfg["ranks"][kind], batch)
            p, x = be.params(pn), be.array(xn)
            limit, gate_name = LIMITS.forward(be, layer, p, x, cfg)
            same = be.compile(lambda p, x, layer=layer: same_gates_forward(layer, p, x))
            y_planned = be.numpy(layer.apply(p, x))
            out["verified"].append({"backend": be.label, "kind": kind, "batch": batch,
                                    **verify(f"{be.label} {kind} B={batch}", be.numpy(limit(p, x)), y_planned)})
            verify(f"{be.label} {kind} B={batch} same gates", be.numpy(same(p, x)), y_planned)
            fns = {"planned": lambda layer=layer, p=p, x=x: layer.apply(p, x),
                   "limit": lambda limit=limit, p=p, x=x: limit(p, x),
                   "same_gates": lambda same=same, p=p, x=x: same(p, x)}
            t = time_side_by_side(fns, be, cfg["repeats"], cfg["row_budget_s"])
            r = ratio(t["planned"], t["limit"])
            cost = layer.cost(batch)
            flop_ms = cost.flops / flops_per_ms
            row = {
                "backend": be.label, "kind": kind, "ranks": cfg["ranks"][kind], "batch": batch,
                "planned": t["planned"], "limit": t["limit"], "same_gates": t["same_gates"], "ratio": r,
                "same_gates_ratio": ratio(t["planned"], t["same_gates"]), "limit_gate": gate_name,
                "gflops": cost.flops / 1e9, "flop_ms": flop_ms, "vs_flops": t["planned"]["min_ms"] / flop_ms,
                "limit_vs_flops": t["limit"]["min_ms"] / flop_ms, "target": f"<= {TARGET_LIMIT}",
                "met": r["min"] <= TARGET_LIMIT,
            }
            if be.name in cfg["grad_backends"] and batch in cfg["grad_batches"]:
                grads = {"planned": be.grad_step(layer.apply, p, x), "limit": be.grad_step(limit, p, x)}
                tb = time_side_by_side(grads, be, cfg["repeats"], cfg["row_budget_s"])
                rb = ratio(tb["planned"], tb["limit"])
                row["backward"] = {"planned": tb["planned"], "limit": tb["limit"], "ratio": rb,
                                   "met": rb["min"] <= TARGET_LIMIT}
            out["limit"].append(row)
