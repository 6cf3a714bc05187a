"""Compare routers over the same factorized experts on scikit-learn's bundled digits.

Every 8x8 digit becomes 8 tokens (one per pixel row, with a one-hot row position);
a CP multilinear MoE layer maps each token to a hidden vector, a GELU and a linear
head classify the image.  Only the router changes between rows of the table: the
MMoE's dense entmax-1.5 / softmax / sparsemax gates, top-1 and top-2 token choice
with Shazeer et al.'s learned training noise and without noise, expert choice
(capacity factor 2) and Soft MoE (one slot per expert).  Every model has the same parameter budget for
the MoE layer (the CP rank absorbs what a router needs: the noisy top-k routers'
noise weights cost ``I * N`` parameters).

Training uses PyTorch autograd (Adam, cross-entropy plus ``tensormoe.routing.aux_loss``:
by default ``1e-2`` load balancing as in Switch and ``1e-3`` z-loss as in ST-MoE); the layer
runs on tensormoe's PyTorch backend.
The data ships with scikit-learn: nothing is downloaded.

Run:  python examples/compare_routers.py                      (about 3 minutes on 2 CPU cores)
      python examples/compare_routers.py --quick              (seconds; used by the tests)

Columns: test accuracy (mean +- std over seeds); usage entropy, the entropy of the
share of routing weight each expert receives on the test set divided by log N
(1: all experts used evenly); experts per token, the mean number of experts with a
non-zero weight (Soft MoE mixes every expert through its slots); training time per
epoch; and the time of one forward pass over the test set.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable

import numpy as np

DEFAULT_PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compare_routers.png")
_DEFAULT_PLOT_SHOWN = "examples/results/compare_routers.png"  # how --help names DEFAULT_PLOT

#: The routers compared, in table order.  A label is either a name that
#: :func:`tensormoe.routing.get_router` knows, or a key of ``BUILDERS``.
ROUTERS = ["entmax15", "softmax", "sparsemax", "top1", "top2", "top1-nonoise", "top2-nonoise", "expert_choice", "soft"]


def _top_k_without_noise(k: int) -> Callable[[int], object]:
    def build(levels: int) -> object:
        from tensormoe.routing import TopKRouter

        return TopKRouter(k=k, noise=None)

    return build


def _soft(levels: int) -> object:
    # Soft MoE can hold one level only: a hierarchical layer routes its other levels with entmax15
    return "soft" if levels == 1 else ["soft"] + ["entmax15"] * (levels - 1)


#: Labels that need more than a name: ``label -> build(levels)`` returns the layer's ``router=``.
#: To compare a new router, add its label to ``ROUTERS`` and, unless get_router knows the
#: label, a builder here.
BUILDERS: dict[str, Callable[[int], object]] = {
    "top1-nonoise": _top_k_without_noise(1),
    "top2-nonoise": _top_k_without_noise(2),
    "soft": _soft,
}


def make_router(label: str, levels: int) -> object:
    """The ``router=`` argument for ``label`` on a layer of ``levels`` expert levels."""
    return BUILDERS[label](levels) if label in BUILDERS else label


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
    """The largest CP rank whose layer (factors and router parameters) fits in ``budget``.

    Raises ``ValueError`` when not even rank 1 fits.
    """
    import tensormoe

    def size(rank: int) -> int:
        return tensormoe.CPMMoE(in_dim, out_dim, experts, rank=rank, router=router).n_params

    if size(1) > budget:
        raise ValueError(f"{budget} parameters are too few for router {router!r}: rank 1 needs {size(1)}")
    rank = 1
    while size(rank + 1) <= budget:
        rank += 1
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


def run(router_name: str, data: tuple, args: argparse.Namespace, seed: int, bar=None) -> dict:
    """Train one model with router ``router_name`` and seed ``seed``; its test scores and times.

    ``bar`` (a tqdm bar, optional) advances by one per epoch.
    """
    import torch

    import tensormoe
    from tensormoe.routing import aux_loss

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
            if bar is not None:
                bar.update()
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


def _clipped_errors(values: np.ndarray, stds: np.ndarray, low: float, high: float) -> np.ndarray:
    """Error bars of +- std, cut where they would leave the quantity's range [low, high]."""
    return np.stack([np.minimum(stds, values - low), np.minimum(stds, high - values)])


def plot(rows: list[dict], path: str, n_seeds: int, title: str) -> None:
    """Bar charts of test accuracy, usage entropy and training time per router (mean, +- std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["router"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    panels = [  # key, panel title, y label, scale, range of the quantity
        ("accuracy", "test accuracy", "test accuracy (%)", 100, (0.0, 100.0)),
        ("entropy", "expert usage", "usage entropy / log N (1 = all experts alike)", 1, (0.0, 1.0)),
        ("epoch_s", "training time", "training time per epoch (s)", 1, (0.0, np.inf)),
    ]
    for ax, (key, title_, label, scale, (low, high)) in zip(axes, panels):
        values = np.array([scale * r[key] for r in rows])
        stds = np.array([scale * r[key + "_std"] for r in rows])
        errors = _clipped_errors(values, stds, low, high) if n_seeds > 1 else None
        ax.bar(names, values, yerr=errors, color="C0", capsize=3)
        ax.set_title(title_)
        ax.set_ylabel(label)
        ax.set_xlabel("router")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
        ax.grid(True, axis="y", alpha=0.3)
    lo = min(100 * r["accuracy"] for r in rows)
    axes[0].set_ylim(max(0.0, lo - 5), 100)
    axes[1].set_ylim(0, 1.05)
    spread = f"bars: mean over {n_seeds} seeds, error bars ± std (cut at the range's ends)" if n_seeds > 1 else "one seed"
    fig.suptitle(f"{title}\n{spread}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


EXAMPLES = f"""\
examples:
  python examples/compare_routers.py                         # every router, 3 seeds x 30 epochs (minutes)
  python examples/compare_routers.py --quick                 # a smoke run of a few seconds
  python examples/compare_routers.py --routers top1 soft --seeds 5 --plot routers.png
  python examples/compare_routers.py --experts 4 4 --plot ''  # two expert levels; no plot

outputs: the table (Markdown) goes to standard output; the plot to --plot
(default {_DEFAULT_PLOT_SHOWN}, its folder is created); a progress bar
(one step per epoch) to standard error when it is a terminal, unless --quiet.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0; got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0; got {text!r}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0; got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--routers", nargs="+", default=ROUTERS, choices=ROUTERS, metavar="ROUTER",
                   help=f"routers to compare, from: {' '.join(ROUTERS)} (default: all)")
    p.add_argument("--experts", type=_positive_int, nargs="+", default=[16],
                   help="experts per level (default 16; e.g. 4 4 for two levels)")
    p.add_argument("--hidden", type=_positive_int, default=32, help="hidden features per token (default 32)")
    p.add_argument("--budget", type=_positive_int, default=2048,
                   help="parameters of the MoE layer, router included; sets each router's CP rank (default 2048)")
    p.add_argument("--epochs", type=_positive_int, default=30, help="training epochs per run (default 30)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per training step (default 64)")
    p.add_argument("--lr", type=_positive, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--load-balancing", type=_non_negative, default=1e-2,
                   help="load-balancing loss weight (default 1e-2)")
    p.add_argument("--z-loss", type=_non_negative, default=1e-3, help="router z-loss weight (default 1e-3)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="training runs per router, seeds 0, 1, ... (default 3)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="PyTorch CPU threads (default 1: these small matrices are fastest, and timings steadiest, on one)")
    p.add_argument("--plot", default=DEFAULT_PLOT, metavar="FILE.png",
                   help=f"PNG of accuracy, usage and time per router (default {_DEFAULT_PLOT_SHOWN}; "
                        "'' for none)")
    p.add_argument("--quick", action="store_true", help="a few seconds: 300 digits, 2 epochs, one seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    """Train every router in ``--routers`` ``--seeds`` times; print the table, write the plot, return the rows."""
    parse = parser()
    args = parse.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 2, 1
    try:
        import torch
    except ImportError:
        parse.error("this example trains with PyTorch: pip install -e '.[torch,examples]'")
    from tqdm.auto import tqdm

    data = load_tokens(300 if args.quick else None, seed=0)
    in_dim = data[0].shape[-1]
    for name in args.routers:  # every budget problem before any training
        try:
            rank_for_budget(make_router(name, len(args.experts)), args.budget, in_dim, args.hidden, args.experts)
        except ValueError as err:
            parse.error(f"argument --budget: {err}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    runs = [(name, seed) for name in args.routers for seed in range(args.seeds)]
    bar = tqdm(total=len(runs) * args.epochs, desc="training", unit="epoch", disable=True if args.quiet else None)
    results = []
    try:
        for name, seed in runs:
            bar.set_postfix_str(f"{name}, seed {seed}")
            results.append(run(name, data, args, seed, bar))
    finally:
        bar.close()
        torch.set_num_threads(threads)
    rows = summarise(results)
    setup = (f"digits: {len(data[0])} train / {len(data[1])} test images as 8 row tokens; experts {args.experts}, "
             f"hidden {args.hidden}, MoE budget {args.budget} parameters, {args.epochs} epochs, {args.seeds} seed(s), "
             f"aux loss weights {args.load_balancing:g} (balance) and {args.z_loss:g} (z)")
    print(setup)
    print(table(rows, args.seeds))
    if args.plot:
        title = (f"Routers over the same CP experts: digits, experts {args.experts}, "
                 f"{args.budget} MoE parameters each, {args.epochs} epochs")
        plot(rows, args.plot, args.seeds, title)
        print(f"plot written to {args.plot}")
    return rows


if __name__ == "__main__":
    main()
