"""Section 4: each layer against a parameter-matched linear layer and a plain ``I x O`` one."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from cases import make_case
from config import TARGET_BACKWARD, TARGET_FORWARD
from harness import Backend, ratio, time_side_by_side


def linear_layer(be: Backend) -> Callable[[dict, Any], Any]:
    """``x @ w + b`` as ``torch.nn.Linear`` computes it (one fused ``addmm`` on PyTorch)."""
    if be.name == "pytorch":
        import torch

        return lambda q, x: torch.nn.functional.linear(x, q["w"].T, q["b"])
    return lambda q, x: x @ q["w"] + q["b"]


def section_linear(be: Backend, cfg: dict, out: dict) -> None:
    batch = cfg["linear_batch"]
    rng = np.random.default_rng(7)
    for kind in cfg["linear_kinds"]:
        layer, pn, xn = make_case(kind, cfg["I"], cfg["O"], [cfg["N"]], cfg["ranks"][kind], batch)
        p, x = be.params(pn), be.array(xn)
        width = layer.n_params // cfg["I"]
        w_pm = be.array(rng.normal(size=(cfg["I"], width)).astype("float32"))
        w_io = be.array(rng.normal(size=(cfg["I"], cfg["O"])).astype("float32"))
        matmul = be.compile(lambda x, w: x @ w)
        t = time_side_by_side({"layer": lambda: layer.apply(p, x), "matched": lambda: matmul(x, w_pm),
                               "linear": lambda: matmul(x, w_io)}, be, cfg["repeats"], cfg["row_budget_s"])
        row = {"backend": be.label, "kind": kind, "batch": batch, "params": layer.n_params,
               "matched_shape": [cfg["I"], width], "forward": t,
               "forward_vs_matched": ratio(t["layer"], t["matched"]), "forward_vs_linear": ratio(t["layer"], t["linear"])}
        if be.name != "numpy":  # forward+backward: gradients of every parameter
            linear = linear_layer(be)
            steps = {"layer": be.grad_step(layer.apply, p, x)}
            for name, w in (("matched", w_pm), ("linear", w_io)):
                steps[name] = be.grad_step(linear, {"w": w, "b": be.array(np.zeros(w.shape[1], "float32"))}, x)
            tb = time_side_by_side(steps, be, cfg["repeats"], cfg["row_budget_s"])
            row.update(backward=tb, backward_vs_matched=ratio(tb["layer"], tb["matched"]),
                       backward_vs_linear=ratio(tb["layer"], tb["linear"]))
        judged = be.name == "pytorch" and kind == "cp"  # the default layer on PyTorch (issue 13)
        row["target"] = f"fwd <= {TARGET_FORWARD}x, fwd+bwd <= {TARGET_BACKWARD}x I x O" if judged else None
        row["met"] = (row["forward_vs_linear"]["min"] <= TARGET_FORWARD
                      and row.get("backward_vs_linear", {"min": 0})["min"] <= TARGET_BACKWARD) if judged else None
        out["linear"].append(row)
