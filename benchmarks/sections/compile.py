"""torch.compile (PyTorch): ``torch.compile(fullgraph=True)`` of each module against eager, and its graph."""

from __future__ import annotations

import time
from typing import Any

from cases import make_layer
from harness import Backend, ratio, time_side_by_side


def section_compile(be: Backend, cfg: dict, out: dict) -> None:
    if be.name != "pytorch":
        return
    import torch

    import tensormoe.torch

    def compiled_row(kind: str, batch: int, t: dict, compile_s: float, seen: list[str] | None) -> dict[str, Any]:
        r = ratio(t["compiled"], t["eager"])
        return {
            "backend": be.label, "kind": kind, "batch": batch, "compiler": cfg["compile_backend"],
            "compile_s": compile_s, "eager": t["eager"], "compiled": t["compiled"], "ratio": r,
            "kernel_in_graph": None if seen is None else any("sparse_gate" in op for op in seen),
            "einsum_in_graph": None if seen is None else any("einsum" in op for op in seen),
            "graph_ops": None if seen is None else len(seen),
            "target": None if seen is None else "compiled < eager", "met": None if seen is None else r["min"] < 1.0,
        }

    def timed(module: Any, x: Any) -> tuple[dict, float]:
        """Compile ``module`` (after a reset), time its first call, then eager against compiled."""
        torch._dynamo.reset()
        compiled = torch.compile(module, fullgraph=True, backend=cfg["compile_backend"])
        start = time.perf_counter()
        y = compiled(x)
        compile_s = time.perf_counter() - start
        torch.testing.assert_close(y, module(x), rtol=1e-4, atol=1e-5)
        fns = {"eager": lambda: module(x), "compiled": lambda: compiled(x)}
        return time_side_by_side(fns, be, cfg["repeats"], cfg["row_budget_s"]), compile_s

    linear = torch.nn.Linear(cfg["I"], cfg["O"]).to(be.device)
    for batch in cfg["compile_batches"]:  # the reference: what compiling does to a plain linear layer here
        x = torch.randn(batch, cfg["I"], device=be.device)
        with torch.no_grad():
            t, compile_s = timed(linear, x)
        out["compile"].append(compiled_row("nn.Linear (reference)", batch, t, compile_s, None))
    for kind in cfg["compile_kinds"]:
        module = make_layer(kind, cfg["I"], cfg["O"], [cfg["N"]], cfg["ranks"][kind], shell=tensormoe.torch)
        module = module.to(be.device)
        with torch.no_grad():
            module.params["gate_0"].normal_(0, cfg["I"] ** -0.5)
        for batch in cfg["compile_batches"]:
            x = torch.randn(batch, cfg["I"], device=be.device)
            seen: list[str] = []

            def recording(gm: Any, inputs: Any) -> Any:
                seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
                return gm.forward

            with torch.no_grad():
                module(x)  # an eager call first: plans the contraction (once for every batch size)
                torch._dynamo.reset()
                torch.compile(module, fullgraph=True, backend=recording)(x)
                t, compile_s = timed(module, x)
            out["compile"].append(compiled_row(kind, batch, t, compile_s, seen))
