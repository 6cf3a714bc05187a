"""Product keys and capacity (issue 19): tensormoe's product-key CP layer against PEER-pytorch at 1024 x 1024
experts, and its top-2 layer with capacity against the ``mixture-of-experts`` package, forward and
forward+backward time and peak memory.

It runs alone (not part of ``run.py``'s sections: the peers' million-expert layer alone takes gigabytes)::

    nice -n 19 timeout 1500 python benchmarks/sections/product_keys.py --threads 1 --batches 64,1024

Sizes and the parameter arithmetic
----------------------------------
Notation: ``d`` features in and out, ``N = n * n`` experts, ``h`` heads, ``k`` experts kept per head,
``d_k`` the sub-key width, ``R`` the CP rank.

*Product keys (the PEER side).*  PEER-pytorch with ``dim=d``, ``num_experts=N``, ``heads=h``,
``num_experts_per_head=k``, ``product_key_topk=k``, ``dim_key=d_k`` and ``non_competing_scores=False``
(softmax over each head's ``k`` experts, the paper's choice; the package's default keeps one expert per
head with a ReLU weight) holds

* expert embeddings ``weight_down_embed``, ``weight_up_embed``: ``2 N d``;
* the query projection ``to_queries`` (no bias): ``d * 2 h d_k``;
* the sub-keys ``keys [h, n, 2, d_k]``: ``2 h n d_k``.

A token reads the query projection, every sub-key (it is scored against all ``2 n`` of each head) and
the ``h k`` experts it selects: active ``2 h k d + 2 h d_k d + 2 h n d_k``.

tensormoe's product-key CP layer (phase 2) on ``expert_dims=[n, n]`` with bias holds the factors
``U_1 [n, R]``, ``U_2 [n, R]``, ``U_in [d + 1, R]``, ``U_out [d, R]``: ``R (2 n + 2 d + 1)``, and a
router of the same size as PEER's (``query_0``, ``query_1`` ``[d, h d_k]``; ``keys_0``, ``keys_1``
``[h, n, d_k]``): ``2 h d_k (d + n)``.  A token reads the ``2 h k`` selected rows of ``U_1`` and ``U_2``,
all of ``U_in`` and ``U_out`` and the router: active ``R (2 h k + 2 d + 1) + 2 h d_k (d + n)``.

With the defaults ``d = 256``, ``n = 1024`` (``N = 1,048,576``), ``h = 8``, ``k = 16``, ``d_k = 128``:

* router (both sides): ``2 * 8 * 128 * (256 + 1024) = 2,621,440``;
* PEER at ``N = 1024^2``: ``2 * 1,048,576 * 256 + 2,621,440 = 539,492,352`` parameters (2.16 GB in
  float32, as much again for the gradients); active ``2 * 8 * 16 * 256 + 2,621,440 = 2,686,976``;
* **matched active parameters**: ``R (2 h k + 2 d + 1) = 2 h k d``, i.e.
  ``R = round(65,536 / 769) = 85``; tensormoe's layer then holds ``85 * 2,561 + 2,621,440 = 2,839,125``
  parameters and reads ``85 * 769 + 2,621,440 = 2,686,805`` per token (PEER: 2,686,976);
* **matched parameters**: PEER at a million experts cannot be matched in size by a CP layer that stays a
  layer: ``R (2 n + 2 d + 1) = 2 N d`` gives ``R = 209,633``, whose gathered rows alone are
  ``B * 2 h k * R`` numbers (6.9 GB at ``B = 64``).  So the matched-parameters comparison shrinks PEER to
  tensormoe's size instead: the largest ``n'`` with ``2 n'^2 d + 2 h d_k (d + n') <= 2,839,125`` is
  ``n' = 65`` (``N' = 4,225`` experts, ``2,820,608`` parameters, 0.7 % fewer).

*Top-2 with capacity (the mixture-of-experts side).*  The package README's layer: ``MoE(dim=512,
num_experts=16, hidden_dim=2048, activation=nn.LeakyReLU)`` with its defaults (``second_policy``
``random``, threshold 0.2, capacity factor 1.25 in training and 2.0 in eval, loss coefficient 1e-2):
``16 * 2 * 512 * 2048 + 512 * 16 = 33,562,624`` parameters (the experts' two weight tensors and the
gate; no biases); a token uses at most two experts: active ``2 * 2 * 512 * 2048 + 512 * 16 = 4,202,496``.
tensormoe's top-2 CP layer with 16 experts, ``d = 512``, bias, holds ``R (16 + 513 + 512) + 512 * 16``
(gate ``[512, 16]``, no learned noise, as the package) and reads ``R (2 + 513 + 512) + 512 * 16``:
matched parameters ``R = round(33,554,432 / 1,041) = 32,233``; matched active ``R = round(4,194,304 /
1,027) = 4,084``.

How it measures
---------------
Inputs are one sequence ``[1, B, d]`` of ``B`` tokens (one capacity group of ``B`` tokens for the
mixture-of-experts package, as tensormoe's ``[B, I]`` is one group).  Forward: ``eval()`` mode under
``torch.no_grad()`` (the package's eval capacity factor 2.0); forward+backward: ``train()`` mode
(capacity 1.25), gradients set to ``None`` first, ``y.sum()`` backpropagated (the package's auxiliary
loss is not added).  Each row group (same ``d``) is timed round-robin with ``harness.time_side_by_side``
against ``nn.Linear(d, d)``; peak memory is ``harness.rss_window`` around one call after the warm-up
with every gradient freed first (the peak resident growth of that call: activations, and for
forward+backward the gradients it allocates).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # run alone: the benchmarks folder and the repository on the path
    for _p in (str(HERE.parent.parent), str(HERE.parent)):
        if _p not in sys.path:
            sys.path.insert(0, _p)

from harness import Backend, ratio, rss_window, set_torch_threads, time_side_by_side

DEFAULTS = {"dim": 256, "n": 1024, "heads": 8, "k": 16, "dim_key": 128,
            "moe_dim": 512, "moe_experts": 16, "moe_hidden": 2048,
            "batches": [64, 1024], "repeats": 10, "row_budget_s": 6.0}


# -- arithmetic (the module docstring) ---------------------------------------------------------------

def router_params(d: int, n: int, h: int, dk: int) -> int:
    """Query projection and sub-keys of a two-level product-key router: ``2 h d_k (d + n)``."""
    return 2 * h * dk * (d + n)


def peer_params(d: int, n: int, h: int, dk: int) -> int:
    """PEER-pytorch's parameter count with ``N = n * n`` experts (embeddings, queries, keys)."""
    return 2 * n * n * d + router_params(d, n, h, dk)


def peer_active(d: int, n: int, h: int, k: int, dk: int) -> int:
    """Parameters one token reads in PEER: ``h k`` expert pairs of ``d``-vectors and the router."""
    return 2 * h * k * d + router_params(d, n, h, dk)


def pk_cp_params(d: int, n: int, rank: int, h: int, dk: int) -> int:
    """tensormoe's product-key CP layer (``expert_dims=[n, n]``, bias) with its router."""
    return rank * (2 * n + 2 * d + 1) + router_params(d, n, h, dk)


def pk_cp_active(d: int, n: int, rank: int, h: int, k: int, dk: int) -> int:
    return rank * (2 * h * k + 2 * d + 1) + router_params(d, n, h, dk)


def matched_active_rank(d: int, h: int, k: int) -> int:
    """CP rank whose active parameters equal PEER's: ``R (2 h k + 2 d + 1) = 2 h k d``."""
    return max(1, round(2 * h * k * d / (2 * h * k + 2 * d + 1)))


def matched_total_side(budget: int, d: int, h: int, dk: int) -> int:
    """Largest ``n'`` with PEER's parameter count at ``N' = n'^2`` within ``budget``."""
    n = max(1, math.isqrt(budget // (2 * d)))
    while n > 1 and peer_params(d, n, h, dk) > budget:
        n -= 1
    while peer_params(d, n + 1, h, dk) <= budget:
        n += 1
    return n


def moe_params(d: int, experts: int, hidden: int) -> int:
    """The mixture-of-experts package's ``MoE``: two weight tensors per expert and the gate, no biases."""
    return experts * 2 * d * hidden + d * experts


def moe_active(d: int, experts: int, hidden: int) -> int:
    return 2 * 2 * d * hidden + d * experts


def cp_top2_ranks(d: int, experts: int, hidden: int) -> dict[str, int]:
    """tensormoe top-2 CP ranks (``d -> d``, bias, gate ``[d, N]``) matching the package's layer."""
    gate = d * experts
    return {"matched parameters": round((moe_params(d, experts, hidden) - gate) / (experts + 2 * d + 1)),
            "matched active": round((moe_active(d, experts, hidden) - gate) / (2 + 2 * d + 1))}


# -- the layers ----------------------------------------------------------------------------------------

def peer_layers(cfg: dict) -> dict[str, Any]:
    """PEER at ``n x n`` experts (matched active parameters) and at ``n' x n'`` (matched parameters)."""
    import torch
    from PEER_pytorch import PEER

    d, n, h, k, dk = cfg["dim"], cfg["n"], cfg["heads"], cfg["k"], cfg["dim_key"]
    rank = matched_active_rank(d, h, k)
    # PEER's top-k per half needs k sub-keys: tiny smoke-test sizes get n' >= k (0 effect at the defaults: 65)
    n_total = max(k, matched_total_side(pk_cp_params(d, n, rank, h, dk), d, h, dk))
    out = {}
    for label, side in ((f"PEER {n}^2 (matched active)", n), (f"PEER {n_total}^2 (matched params)", n_total)):
        torch.manual_seed(0)
        layer = PEER(dim=d, heads=h, num_experts=side * side, num_experts_per_head=k, product_key_topk=k,
                     dim_key=dk, non_competing_scores=False)
        count = sum(p.numel() for p in layer.parameters())
        if count != peer_params(d, side, h, dk):
            raise AssertionError(f"{label}: {count} parameters, the arithmetic says {peer_params(d, side, h, dk)}")
        out[label] = layer
    return out


def moe_layer(cfg: dict) -> Any:
    """The mixture-of-experts README's layer (its defaults for policies, thresholds and capacities)."""
    import torch
    from mixture_of_experts import MoE

    torch.manual_seed(0)
    d, e, hidden = cfg["moe_dim"], cfg["moe_experts"], cfg["moe_hidden"]
    layer = MoE(dim=d, num_experts=e, hidden_dim=hidden, activation=torch.nn.LeakyReLU)
    count = sum(p.numel() for p in layer.parameters())
    if count != moe_params(d, e, hidden):
        raise AssertionError(f"MoE: {count} parameters, the arithmetic says {moe_params(d, e, hidden)}")
    return layer


def cp_top2_params(d: int, experts: int, rank: int) -> int:
    """tensormoe's top-2 CP layer ``d -> d`` with bias and a gate ``[d, N]`` (no learned noise)."""
    return rank * (experts + 2 * d + 1) + d * experts


class _Routed:
    """Builds a ``torch.nn.Module`` that calls a tensormoe module as the peers are called: ``m(x)``.

    ``train()`` / ``eval()`` set ``training=``; a ``torch.Generator`` held by the module draws the routers'
    random numbers (the random second-expert policy draws in eval too).  Defined lazily: torch is imported
    only when the section runs.
    """

    @staticmethod
    def wrap(module: Any, label: str) -> Any:
        import torch

        class Routed(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = module
                self.generator = torch.Generator().manual_seed(0)

            def forward(self, x: Any) -> Any:
                return self.inner(x, training=self.training, rng=self.generator)

            def extra_repr(self) -> str:
                return label

        return Routed()


def tensormoe_models(cfg: dict, dim: int) -> dict[str, Any]:
    """tensormoe's layers for the row group of width ``dim``, as ``torch.nn.Module``s called ``m(x[1, B, d])``.

    For ``dim == cfg["dim"]``: the product-key CP layer on ``expert_dims=[n, n]`` with ``heads``, ``k``,
    ``dim_key`` as PEER and ``rank=matched_active_rank(...)`` (85 by default); for ``dim ==
    cfg["moe_dim"]``: the top-2 CP layer with the package's policies and capacities (``router="gshard"``)
    at the two ranks of :func:`cp_top2_ranks`.  Each count is checked against the arithmetic above.
    """
    from tensormoe.routing import ProductKeyRouter
    from tensormoe.torch import CPMMoE

    out = {}
    if dim == cfg["dim"]:
        d, n, h, k, dk = cfg["dim"], cfg["n"], cfg["heads"], cfg["k"], cfg["dim_key"]
        rank = matched_active_rank(d, h, k)
        layer = CPMMoE(d, d, [n, n], rank=rank, router=ProductKeyRouter(k=k, heads=h, key_dim=dk), seed=0)
        count = sum(p.numel() for p in layer.parameters())
        if count != pk_cp_params(d, n, rank, h, dk):
            raise AssertionError(f"product-key CP: {count} parameters, the arithmetic says "
                                 f"{pk_cp_params(d, n, rank, h, dk)}")
        out[f"tensormoe product-key CP {n}^2, R={rank} (matched active)"] = _Routed.wrap(layer, "product keys")
    if dim == cfg["moe_dim"]:
        d, e, hidden = cfg["moe_dim"], cfg["moe_experts"], cfg["moe_hidden"]
        for label, rank in cp_top2_ranks(d, e, hidden).items():
            layer = CPMMoE(d, d, [e], rank=rank, router="gshard", seed=0)
            count = sum(p.numel() for p in layer.parameters())
            if count != cp_top2_params(d, e, rank):
                raise AssertionError(f"top-2 CP: {count} parameters, the arithmetic says {cp_top2_params(d, e, rank)}")
            out[f"tensormoe top-2 CP gshard, R={rank} ({label})"] = _Routed.wrap(layer, "gshard")
    return out


# -- timing ----------------------------------------------------------------------------------------------

def _first(y: Any) -> Any:
    return y[0] if isinstance(y, tuple) else y


def _calls(models: dict[str, Any], x3: Any) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """Forward (eval, no grad) and forward+backward (train) calls of every model on ``x3[1, B, d]``."""
    import torch

    fwd, bwd = {}, {}
    for name, m in models.items():
        x = x3[0] if isinstance(m, torch.nn.Linear) or getattr(m, "takes_matrix", False) else x3

        def forward(m: Any = m, x: Any = x) -> Any:
            m.eval()
            with torch.no_grad():
                return _first(m(x))

        def step(m: Any = m, x: Any = x) -> Any:
            m.train()
            m.zero_grad(set_to_none=True)
            y = _first(m(x))
            y.sum().backward()
            return y

        fwd[name], bwd[name] = forward, step
    return fwd, bwd


def time_group(models: dict[str, Any], baseline: str, batch: int, dim: int, be: Backend, cfg: dict) -> list[dict]:
    import torch

    torch.manual_seed(batch)
    x3 = torch.randn(1, batch, dim)
    fwd, bwd = _calls(models, x3)
    rows = []
    t_fwd = time_side_by_side(fwd, be, cfg["repeats"], cfg["row_budget_s"])
    t_bwd = time_side_by_side(bwd, be, cfg["repeats"], cfg["row_budget_s"])
    for name, m in models.items():
        # gradients freed first: the step's peak then holds the gradients it allocates (PEER: 2 N d numbers)
        m.zero_grad(set_to_none=True)
        mem_f = rss_window(fwd[name])
        mem_b = rss_window(bwd[name])
        m.zero_grad(set_to_none=True)
        rows.append({
            "model": name, "dim": dim, "batch": batch, "params": sum(p.numel() for p in m.parameters()),
            "forward": t_fwd[name], "backward": t_bwd[name],
            "forward_vs_linear": ratio(t_fwd[name], t_fwd[baseline]),
            "backward_vs_linear": ratio(t_bwd[name], t_bwd[baseline]),
            "forward_peak_mib": (mem_f[1] - mem_f[0]) / 2**20, "backward_peak_mib": (mem_b[1] - mem_b[0]) / 2**20,
            "memory_method": mem_f[2],
        })
    return rows


def section_product_keys(be: Backend, cfg: dict, out: dict) -> None:
    """Rows ``out["product_keys"]``: tensormoe's layers beside PEER and the mixture-of-experts package."""
    if be.name != "pytorch":
        return
    import torch

    out.setdefault("product_keys", [])
    groups = []
    try:
        peers = peer_layers(cfg)
    except ImportError:
        peers = {}
    if peers:
        groups.append((cfg["dim"], peers))
    try:
        groups.append((cfg["moe_dim"], {"mixture-of-experts README (top-2, capacity)": moe_layer(cfg)}))
    except ImportError:
        pass
    for dim in (cfg["dim"], cfg["moe_dim"]):  # tensormoe's rows even where a peer is not installed
        if all(d != dim for d, _ in groups):
            groups.append((dim, {}))
    for dim, peer in groups:
        base = f"nn.Linear({dim}, {dim})"
        torch.manual_seed(0)
        models = {base: torch.nn.Linear(dim, dim), **peer, **tensormoe_models(cfg, dim)}
        for batch in cfg["batches"]:
            out["product_keys"].extend(time_group(models, base, batch, dim, be, cfg))


def _table(rows: list[dict]) -> str:
    head = ("| model | d | B | params | fwd ms (min) | fwd / linear | fwd+bwd ms (min) | fwd+bwd / linear "
            "| fwd peak MiB | fwd+bwd peak MiB |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dim']} | {r['batch']} | {r['params']:,} | {r['forward']['median_ms']:.3g} "
            f"({r['forward']['min_ms']:.3g}) | {r['forward_vs_linear']['median']:.3g} | "
            f"{r['backward']['median_ms']:.3g} ({r['backward']['min_ms']:.3g}) | "
            f"{r['backward_vs_linear']['median']:.3g} | {r['forward_peak_mib']:.1f} | {r['backward_peak_mib']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default=",".join(map(str, DEFAULTS["batches"])))
    parser.add_argument("--dim", type=int, default=DEFAULTS["dim"], help="PEER's d (d = 768 needs ~13 GB)")
    parser.add_argument("--n", type=int, default=DEFAULTS["n"], help="sub-keys per half: N = n * n experts")
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"])
    parser.add_argument("--row-budget", type=float, default=DEFAULTS["row_budget_s"])
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    set_torch_threads(args.threads)
    import torch

    cfg = {**DEFAULTS, "dim": args.dim, "n": args.n, "batches": [int(b) for b in args.batches.split(",")],
           "repeats": args.repeats, "row_budget_s": args.row_budget}
    out: dict[str, Any] = {}
    began = time.perf_counter()
    section_product_keys(Backend("pytorch"), cfg, out)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load": os.getloadavg(),
            "seconds": round(time.perf_counter() - began, 1), "config": cfg}
    print(json.dumps(meta))
    print(_table(out.get("product_keys", [])))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": out.get("product_keys", [])}, indent=1))


if __name__ == "__main__":
    main()
