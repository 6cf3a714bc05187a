"""Sections 2 and 2b: the planned forward and contraction against the framework's einsum with its defaults."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

import tensormoe
from cases import make_case, planned_contraction, unplanned_operands
from config import KINDS, TARGET_UNPLANNED
from harness import Backend, ratio, run_cases, time_side_by_side, verify


def framework_einsum(be: Backend) -> Callable:
    """``torch.einsum`` or ``jnp.einsum``: a path search on every call."""
    if be.name == "pytorch":
        import torch

        return torch.einsum
    import jax.numpy as jnp

    return jnp.einsum


def einsum_worker(case: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: seconds of ``tl.einsum`` (NumPy, no path) over one case's forward operands."""
    import time

    import tensorly as tl

    tl.set_backend("numpy")
    with tensormoe.backend_context("numpy"):
        layer, params, x = make_case(case["kind"], case["I"], case["O"], case["dims"], case["ranks"], case["batch"])
        eq = layer.factorization.forward_equation()
        operands = unplanned_operands(layer, params, x)
        start = time.perf_counter()
        y = tl.einsum(eq, *operands)
        seconds = time.perf_counter() - start
        want = np.asarray(layer.apply(params, x))
    return {"seconds": seconds, "max_abs_diff": float(np.abs(y - want).max()), "scale": float(np.abs(want).max())}


def section_unplanned(be: Backend, cfg: dict, out: dict) -> None:
    numpy_rows: list[tuple[dict, dict]] = []
    for kind in cfg["unplanned_kinds"]:
        for batch in cfg["unplanned_batches"]:
            layer, pn, xn = make_case(kind, cfg["I"], cfg["O"], [cfg["N"]], cfg["ranks"][kind], batch)
            p, x = be.params(pn), be.array(xn)
            y_planned = be.numpy(layer.apply(p, x))
            row = {"backend": be.label, "kind": kind, "batch": batch}
            eq = layer.factorization.forward_equation()
            if be.name == "numpy":
                if batch != cfg["small_batch"] and len(cfg["unplanned_batches"]) > 1:
                    continue  # one NumPy attempt per factorization (it times out at realistic sizes)
                row["planned"] = time_side_by_side({"planned": lambda: layer.apply(p, x)}, be, cfg["repeats"],
                                                   cfg["row_budget_s"])["planned"]
                numpy_rows.append((row, {"kind": kind, "I": cfg["I"], "O": cfg["O"], "dims": [cfg["N"]],
                                         "ranks": cfg["ranks"][kind], "batch": batch}))
                row["target"] = row["met"] = None
                out["unplanned"].append(row)
                continue
            einsum = framework_einsum(be)
            fns = {"planned": lambda layer=layer, p=p, x=x: layer.apply(p, x),
                   "unplanned": lambda layer=layer, p=p, x=x, eq=eq: einsum(eq, *unplanned_operands(layer, p, x))}
            if be.name == "jax" and cfg["unplanned_extras"]:
                jitted = be.compile(lambda p, x, layer=layer, eq=eq: einsum(eq, *unplanned_operands(layer, p, x)))
                fns["unplanned_jit"] = lambda jitted=jitted, p=p, x=x: jitted(p, x)
            if cfg["unplanned_extras"]:  # the contraction alone, operands computed once: cached plan vs the einsum
                operands = unplanned_operands(layer, p, x)
                fns["contract_planned"] = planned_contraction(be, eq, operands, layer.optimize)
                fns["contract_unplanned"] = lambda operands=operands, eq=eq: einsum(eq, *operands)
            for key in [k for k in fns if "unplanned" in k]:
                verify(f"{be.label} {kind} B={batch} {key}", be.numpy(fns[key]()), y_planned)
            t = time_side_by_side(fns, be, cfg["repeats"], cfg["row_budget_s"])
            row.update(planned=t["planned"], unplanned=t["unplanned"], speedup=ratio(t["unplanned"], t["planned"]))
            if "contract_planned" in t:
                row["contraction"] = {"planned": t["contract_planned"], "unplanned": t["contract_unplanned"],
                                      "speedup": ratio(t["contract_unplanned"], t["contract_planned"])}
            if "unplanned_jit" in t:
                row["unplanned_jit"] = t["unplanned_jit"]
                row["speedup_jit"] = ratio(t["unplanned_jit"], t["planned"])
            row["target"] = row["met"] = None  # the target is judged per call, in section_overhead
            out["unplanned"].append(row)
    if numpy_rows:  # tl.einsum on NumPy: no path, so a timeout per case, after the in-process timings
        timeout = cfg["numpy_timeout"]
        for (row, _), res in zip(numpy_rows, run_cases("unplanned-numpy", [spec for _, spec in numpy_rows], timeout)):
            row["timeout_s"] = timeout
            if res is None or res["seconds"] > timeout:
                row["unplanned"], row["speedup"] = None, {"min": None, "median": None}
            else:
                row["unplanned"] = {"median_ms": 1e3 * res["seconds"], "min_ms": 1e3 * res["seconds"], "repeats": 1}
                row["speedup"] = ratio(row["unplanned"], row["planned"])
                if res["max_abs_diff"] > 2e-3 * res["scale"] + 1e-6:
                    raise RuntimeError(f"tl.einsum disagrees with the layer for {row['kind']}: {res}")


def section_overhead(be: Backend, cfg: dict, out: dict) -> None:
    """Section 2b: the contraction alone at small batch, cached plan vs the framework's einsum per call.

    With large ranks a small-batch contraction is bound by reading the factors, which
    both do alike; with small ranks what is left is the per-call cost of the einsum
    (parsing, path search) that the cached plan does not pay.
    """
    if be.name == "numpy":
        return  # NumPy's unplanned einsum has no path at all: section 2 times it out
    einsum = framework_einsum(be)
    for ranks_name, ranks in (("small", cfg["overhead_ranks"]), ("large", cfg["ranks"])):
        for kind in KINDS:
            layer, pn, xn = make_case(kind, cfg["I"], cfg["O"], [cfg["N"]], ranks[kind], cfg["overhead_batch"])
            p, x = be.params(pn), be.array(xn)
            operands = unplanned_operands(layer, p, x)
            eq = layer.factorization.forward_equation()
            fns = {"planned": planned_contraction(be, eq, operands, layer.optimize),
                   "unplanned": lambda operands=operands, eq=eq: einsum(eq, *operands)}
            want = be.numpy(layer.apply(p, x))
            for key, fn in fns.items():
                verify(f"{be.label} {kind} overhead {key}", be.numpy(fn()), want)
            t = time_side_by_side(fns, be, cfg["repeats"], cfg["row_budget_s"])
            speedup = ratio(t["unplanned"], t["planned"])
            judged = be.name == "pytorch"
            out["overhead"].append({
                "backend": be.label, "kind": kind, "ranks": ranks[kind], "rank_size": ranks_name,
                "batch": cfg["overhead_batch"], "planned": t["planned"], "unplanned": t["unplanned"],
                "speedup": speedup, "target": f">= {TARGET_UNPLANNED}x" if judged else None,
                "met": speedup["min"] >= TARGET_UNPLANNED if judged else None,
            })
