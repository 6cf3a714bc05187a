"""Gates: each gate activation, tensormoe's threshold methods and the limit's candidates, against softmax."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tensormoe.routing import gates

import chains
import limit_gates
from config import TARGET_GATE
from harness import Backend, ratio, time_side_by_side

#: Fewest logits from which ``"auto"`` runs ``"newton"`` on PyTorch's CPU without the kernel (tensormoe.routing.gates' notes)
NEWTON_FROM = {"entmax15": 2**16, "sparsemax": 2**18}


def auto_method(be: Backend, z: Any, gate: str) -> str:
    """The threshold method ``method="auto"`` runs on ``z``, by the rule ``tensormoe.routing.gates`` documents."""
    try:
        gates.ACTIVATIONS[gate](z, method="kernel")  # raises where the kernel cannot run
        return "kernel"
    except ValueError:
        pass
    if be.name == "jax":
        return "newton"
    if be.name == "numpy" or be.device != "cpu":
        return "sort"
    return "newton" if math.prod(z.shape) >= NEWTON_FROM[gate] else "sort"


def section_gates(be: Backend, cfg: dict, out: dict) -> None:
    rng = np.random.default_rng(5)
    # "auto" and the array methods ("auto" is the kernel where it is built: timing it twice would time the
    # second with a branch predictor warmed by the first)
    methods = ["auto", "sort", "newton"]
    for shape in cfg["gate_shapes"]:
        z = be.array(chains.layer_norm(rng.normal(size=shape)).astype("float32"))  # normalised logits, as in a layer
        fns = {"softmax": lambda f=be.compile(chains.softmax): f(z)}
        for name in ("entmax15", "sparsemax"):
            for m in methods:
                f = be.compile(lambda z, act=gates.ACTIVATIONS[name], m=m: act(z, method=m))
                label = f"auto = {auto_method(be, z, name)}" if m == "auto" else m
                fns[f"{name} ({label})"] = lambda f=f: f(z)
            if be.name not in cfg["gate_candidates"]:
                continue
            for cand, f in limit_gates.candidates(be.name, cfg["compiled_gates"]).items():
                if not limit_gates.is_exact(be.numpy(f(z, name)), be.numpy(z), name):
                    continue
                fns[f"{name} [{cand}]"] = lambda f=f, name=name: f(z, name)
        t = time_side_by_side(fns, be, cfg["repeats"], cfg["row_budget_s"])
        for name, v in t.items():
            r = ratio(v, t["softmax"])
            judged = be.name == "pytorch" and name.startswith("entmax15 (auto")
            out["gates"].append({"backend": be.label, "gate": name, "shape": shape, **v, "vs_softmax": r,
                                 "target": f"<= {TARGET_GATE}x softmax" if judged else None,
                                 "met": r["min"] <= TARGET_GATE if judged else None})
