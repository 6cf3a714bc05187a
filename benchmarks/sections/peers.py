"""Peers (PyTorch): tensormoe's CP layer against peer layers at matched parameters, forward and forward+backward."""

from __future__ import annotations

import math
from typing import Any, Callable

import tensormoe
from config import TARGET_PEERS
from harness import Backend, ratio, time_side_by_side


def peer_models(cfg: dict, params: int, tokens: int) -> dict[str, Any]:
    """Peer layers at about ``params`` parameters for sequences of ``tokens`` (None where not installed)."""
    import torch

    d = cfg["peers_dim"]
    models: dict[str, Any] = {"nn.Linear (I x O)": torch.nn.Linear(d, d),
                              "nn.Linear (matched)": torch.nn.Linear(d, max(1, params // d))}
    try:
        from mixture_of_experts import MoE

        experts = 8
        hidden = max(1, round((params - d * experts) / (2 * experts * d)))
        models["lucidrains-moe"] = MoE(dim=d, num_experts=experts, hidden_dim=hidden)
    except ImportError:
        models["lucidrains-moe"] = None
    try:
        from PEER_pytorch import PEER

        n = cfg["peers_experts"]
        models["peer"] = PEER(dim=d, heads=4, num_experts=n, num_experts_per_head=min(16, math.isqrt(n)),
                              dim_key=min(128, d // 2))
    except ImportError:
        models["peer"] = None
    try:
        from soft_moe_pytorch import SoftMoE

        # one slot per token (seq_len): its dispatch and combine grow with the square of the tokens
        models["soft-moe"] = SoftMoE(dim=d, seq_len=tokens, num_experts=2, expert_mult=1)
    except ImportError:
        models["soft-moe"] = None
    return models


def section_peers(be: Backend, cfg: dict, out: dict) -> None:
    if be.name != "pytorch":
        return
    import torch

    from tensormoe.torch import CPMMoE

    try:
        import entmax
    except ImportError:  # pip install .[peers]
        entmax = None

    d, n = cfg["peers_dim"], cfg["peers_experts"]
    rank = cfg["ranks"]["cp"]
    torch.manual_seed(0)
    ours = CPMMoE(d, d, [n], rank=rank).to(be.device)
    with torch.no_grad():
        ours.params["gate_0"].normal_(0, d**-0.5)  # random gates: the sparse coefficients do real work
    count = sum(v.numel() for v in ours.parameters())
    eq = tensormoe.CPMMoE(d, d, [n], rank=rank).factorization.forward_equation()
    p = ours.params

    def unplanned(x: Any) -> Any:
        # what code without tensormoe runs: torch.einsum over the same operands, the entmax package's gate
        a = entmax.entmax15(torch.nn.functional.layer_norm(x @ p["gate_0"], (n,)), dim=-1)
        return torch.einsum(eq, a, torch.nn.functional.pad(x, (0, 1), value=1.0), p["factor_0"], p["factor_1"],
                            p["factor_2"])

    def fwd_bwd(f: Callable, model: Any) -> Callable:
        def step() -> Any:
            if model is not None:
                model.zero_grad(set_to_none=True)
            y = f()
            y.sum().backward()
            return y

        return step

    for batch in cfg["peers_batches"]:
        torch.manual_seed(batch)
        models = {"tensormoe CP": ours, **peer_models(cfg, count, batch)}
        x3 = torch.randn(1, batch, d, device=be.device)  # [batch of one sequence, tokens, dim]
        x2 = x3[0]
        calls: dict[str, Callable] = {}
        for name, m in models.items():
            if m is None:
                continue
            m = m.to(be.device)
            if name == "tensormoe CP" or name.startswith("nn.Linear"):
                calls[name] = lambda m=m: m(x2)
            else:
                calls[name] = lambda m=m: (lambda y: y[0] if isinstance(y, tuple) else y)(m(x3))
        if entmax is not None:
            calls["unplanned (torch.einsum + entmax)"] = lambda: unplanned(x2)
            torch.testing.assert_close(calls["unplanned (torch.einsum + entmax)"](), ours(x2), rtol=2e-3, atol=2e-4)
        with torch.no_grad():
            fwd = time_side_by_side(calls, be, cfg["repeats"], cfg["row_budget_s"])
        owners = {**models, "unplanned (torch.einsum + entmax)": ours}
        bwd = time_side_by_side({k: fwd_bwd(f, owners[k]) for k, f in calls.items()}, be, cfg["repeats"],
                                cfg["row_budget_s"])
        base_f, base_b = fwd["nn.Linear (I x O)"], bwd["nn.Linear (I x O)"]
        for name in calls:
            model = owners[name]
            row = {"backend": be.label, "model": name, "batch": batch,
                   "params": sum(v.numel() for v in model.parameters()) if name in models else count,
                   "forward": fwd[name], "backward": bwd[name], "forward_vs_linear": ratio(fwd[name], base_f),
                   "backward_vs_linear": ratio(bwd[name], base_b), "target": None, "met": None}
            if name in TARGET_PEERS and batch == max(cfg["peers_batches"]):
                r = ratio(fwd["tensormoe CP"], fwd[name])
                row.update(ours_vs=r, target=f"tensormoe CP / {name} <= {TARGET_PEERS[name]}",
                           met=r["min"] <= TARGET_PEERS[name])
            out["peers"].append(row)
