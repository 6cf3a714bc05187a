"""Compare routers over the same factorized experts on scikit-learn's bundled digits.

Every 8x8 digit becomes 8 tokens (one per pixel row, with a one-hot row position);
a CP multilinear MoE layer maps each token to a hidden vector, a GELU and a linear
head classify the image.  Only the router changes between rows of the table: the
MMoE's dense entmax-1.5 / softmax / sparsemax gates, top-1 and top-2 token choice
with Shazeer et al.'s learned training noise and without noise, expert choice
(capacity factor 2) and Soft MoE (one slot per expert).  Every model has the same parameter budget for
the MoE layer (the CP rank absorbs what a router needs: the noisy top-k routers'
noise weights cost ``I * N`` parameters).

Training uses PyTorch autograd (Adam, cross-entropy plus ``tensormoe.routers.aux_loss``:
by default ``1e-2`` load balancing as in Switch and ``1e-3`` z-loss as in ST-MoE); the layer
runs on tensormoe's PyTorch backend.
The data ships with scikit-learn: nothing is downloaded.

Run:  python examples/compare_routers.py --plot routers.png
      python examples/compare_routers.py --quick          (seconds; used by the tests)

Columns: test accuracy (mean +- std over seeds); usage entropy, the entropy of the
share of routing weight each expert receives on the test set divided by log N
(1: all experts used evenly); experts per token, the mean number of experts with a
non-zero weight (Soft MoE mixes every expert through its slots); training time per
epoch; and the time of one forward pass over the test set.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

#: The routers compared: a name :func:`tensormoe.routers.get_router` knows, or a label and its router.
ROUTERS = ["entmax15", "softmax", "sparsemax", "top1", "top2", "top1-nonoise", "top2-nonoise", "expert_choice", "soft"]


def make_router(label: str, levels: int):
    """The ``router=`` argument for ``label`` on a layer of ``levels`` expert levels.

    ``top<k>-nonoise`` is token choice without training noise; Soft MoE can hold one
    level only, so a hierarchical layer routes its other levels with entmax15.
    """
    from tensormoe.routers import TopKRouter

    if label.endswith("-nonoise"):
        return TopKRouter(k=int(label[3:-len("-nonoise")]), noise=None)
    if label == "soft" and levels > 1:
        return ["soft"] + ["entmax15"] * (levels - 1)
    return label


def load_tokens(n_samples: int | None, seed: int) -> tuple:
    """Digits as 8 row tokens ``[B, 8, 16]`` (8 pixels in [0, 1] + one-hot row), split 75/25."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.images / 16.0, digits.target
    if n_samples is not None:
        x, y = x[:n_samples], y[:n_samples]
    tokens = np.concatenate([x, np.broadcast_to(np.eye(8), (len(x), 8, 8))], axis=-1).astype(np.float32)
    return train_test_split(tokens, y, test_size=0.25, random_state=seed, stratify=y)


def rank_for_budget(router: object, budget: int, in_dim: int, out_dim: int, experts: list[int]) -> int:
    """The largest CP rank whose layer (factors and router parameters) fits in ``budget``."""
    import tensormoe

    def size(rank: int) -> int:
        return tensormoe.CPMMoE(in_dim, out_dim, experts, rank=rank, router=router).n_params

    rank = 1
    while size(rank + 1) <= budget:
        rank += 1
    if size(rank) > budget:
        raise SystemExit(f"--budget {budget} is too small for router {router!r}")
    return rank


def usage(routing, experts: list[int]) -> tuple[float, float]:
    """Usage entropy / log N and experts per token, over the flat expert index of all levels.

    The weight of expert ``(n_1, ..., n_H)`` is the product of the levels' weights
    (Soft MoE: the combine weight of the expert's slots).  When the levels route
    different rows (a Soft MoE level with others routing its slots), the levels
    are scored one by one and averaged.
    """
    import torch

    per_level = []
    for r, n in zip(routing, experts):
        w = r.probs if r.is_soft else r.to_dense(n)
        per_level.append(w.detach().reshape(-1, n).double())

    def score(w: torch.Tensor) -> tuple[float, float]:
        share = w.abs().sum(0) / w.abs().sum()
        entropy = float(-(share * torch.log(share.clamp_min(1e-30))).sum()) / math.log(share.numel())
        return entropy, float((w != 0).sum(-1).double().mean())

    if len({w.shape[0] for w in per_level}) > 1:
        scores = [score(w) for w in per_level]
        return float(np.mean([s[0] for s in scores])), float(np.prod([s[1] for s in scores]))
    joint = per_level[0]
    for w in per_level[1:]:
        joint = (joint[:, :, None] * w[:, None, :]).reshape(joint.shape[0], -1)
    return score(joint)


def run(router_name: str, data: tuple, args: argparse.Namespace, seed: int) -> dict:
    import torch

    import tensormoe
    from tensormoe.routers import aux_loss

    x_train, x_test, y_train, y_test = (torch.as_tensor(a) for a in data)
    in_dim, tokens = x_train.shape[-1], x_train.shape[-2]
    router = make_router(router_name, len(args.experts))
    rank = rank_for_budget(router, args.budget, in_dim, args.hidden, args.experts)
    torch.manual_seed(seed)
    with tensormoe.backend_context("pytorch"):
        layer = tensormoe.CPMMoE(in_dim, args.hidden, args.experts, rank=rank, router=router, seed=seed)
        params = {k: v.clone().requires_grad_(True) for k, v in layer.params.items()}
        head = torch.nn.Linear(tokens * args.hidden, 10)
        optimizer = torch.optim.Adam([*params.values(), *head.parameters()], lr=args.lr)
        generator = np.random.default_rng(seed)

        def forward(x, training):
            rng = int(generator.integers(2**31)) if training else None
            h, routing = layer.apply(params, x, training=training, rng=rng, return_routing=True)
            return head(torch.nn.functional.gelu(h).flatten(1)), routing

        epoch_times = []
        for _ in range(args.epochs):
            order = torch.as_tensor(generator.permutation(len(x_train)))
            start = time.perf_counter()
            for batch in order.split(args.batch_size):
                logits, routing = forward(x_train[batch], training=True)
                loss = torch.nn.functional.cross_entropy(logits, y_train[batch])
                loss = loss + aux_loss(routing, load_balancing=args.load_balancing, z=args.z_loss)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            epoch_times.append(time.perf_counter() - start)
        with torch.no_grad():
            forward(x_test, training=False)  # warm-up
            start = time.perf_counter()
            logits, routing = forward(x_test, training=False)
            infer = time.perf_counter() - start
        accuracy = float((logits.argmax(-1) == y_test).double().mean())
        entropy, active = usage(routing, args.experts)
    return {
        "router": router_name,
        "rank": rank,
        "params": layer.n_params,
        "accuracy": accuracy,
        "entropy": entropy,
        "active": active,
        "epoch_s": float(np.median(epoch_times)),
        "infer_ms": infer * 1e3,
    }


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["router"] for r in results):
        runs = [r for r in results if r["router"] == name]
        row = {"router": name, "rank": runs[0]["rank"], "params": runs[0]["params"]}
        for key in ("accuracy", "entropy", "active", "epoch_s", "infer_ms"):
            values = np.array([r[key] for r in runs])
            row[key], row[key + "_std"] = float(values.mean()), float(values.std())
        rows.append(row)
    return rows


def table(rows: list[dict], n_seeds: int) -> str:
    lines = [
        "| router | CP rank | MoE params | test accuracy | usage entropy | experts / token | train s / epoch | test forward ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        acc = f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f}" if n_seeds > 1 else f"{100 * r['accuracy']:.1f}"
        lines.append(
            f"| {r['router']} | {r['rank']} | {r['params']:,} | {acc} % | {r['entropy']:.2f} | {r['active']:.1f} "
            f"| {r['epoch_s']:.2f} | {r['infer_ms']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["router"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("accuracy", "test accuracy", 100), ("entropy", "usage entropy / log N", 1), ("epoch_s", "train s / epoch", 1)]
    for ax, (key, label, scale) in zip(axes, panels):
        ax.bar(names, [scale * r[key] for r in rows], yerr=[scale * r[key + "_std"] for r in rows], color="C0", capsize=3)
        ax.set_title(label)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
    lo = min(100 * r["accuracy"] for r in rows)
    axes[0].set_ylim(max(0.0, lo - 5), 100)
    fig.suptitle("Routers over the same CP experts (digits, equal parameter budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routers", nargs="+", default=ROUTERS, help=f"routers to compare (default: {' '.join(ROUTERS)})")
    parser.add_argument("--experts", type=int, nargs="+", default=[16], help="experts per level (default 16; e.g. 4 4)")
    parser.add_argument("--hidden", type=int, default=32, help="hidden features per token (default 32)")
    parser.add_argument("--budget", type=int, default=2048, help="parameters of the MoE layer (default 2048)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--load-balancing", type=float, default=1e-2, help="load-balancing loss weight (default 1e-2)")
    parser.add_argument("--z-loss", type=float, default=1e-3, help="router z-loss weight (default 1e-3)")
    parser.add_argument("--seeds", type=int, default=3, help="training runs per router (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch CPU threads (default 1: these small matrices are fastest, and timings steadiest, on one)")
    parser.add_argument("--plot", default="compare_routers.png", help="PNG path for the plot ('' for none)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: 300 digits, 2 epochs, one seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 2, 1
    import torch

    data = load_tokens(300 if args.quick else None, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = [run(name, data, args, seed) for name in args.routers for seed in range(args.seeds)]
    finally:
        torch.set_num_threads(threads)
    rows = summarise(results)
    print(f"digits: {len(data[0])} train / {len(data[1])} test images as 8 row tokens; experts {args.experts}, "
          f"hidden {args.hidden}, MoE budget {args.budget} parameters, {args.epochs} epochs, {args.seeds} seed(s), "
          f"aux loss weights {args.load_balancing:g} (balance) and {args.z_loss:g} (z)")
    print(table(rows, args.seeds))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    return rows


if __name__ == "__main__":
    main()
