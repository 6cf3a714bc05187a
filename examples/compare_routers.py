"""Compare routers over the same factorized experts on scikit-learn's bundled digits.

Every 8x8 digit becomes 8 tokens (one per pixel row, with a one-hot row position);
a CP multilinear MoE layer maps each token to a hidden vector, a GELU and a linear
head classify the image.  Only the router changes between rows of the table: the
MMoE's dense entmax-1.5 / softmax / sparsemax gates, top-1 and top-2 token choice
with Shazeer et al.'s learned training noise and without noise, top-2 with a
per-expert capacity (``top2-capacity``: factor 2, one place per slot on average;
``gshard``: the mixture-of-experts package's defaults, factor 1.25 in training and
2 in eval shared by both slots, second expert by the random policy), expert choice
(capacity factor 2), Soft MoE (one slot per expert) and product keys (the same
experts as a 4 x 4 grid of sub-key pairs, two per token).  Every model has the same parameter budget for
the MoE layer (the CP rank absorbs what a router needs: the noisy top-k routers'
noise weights cost ``I * N`` parameters, the product-key router its queries and sub-keys).

``--routers peer`` (not in the default list) adds a row outside tensormoe: the MoE
layer is replaced by ``PEER_pytorch.PEER`` (He 2024; ``pip install PEER-pytorch``)
on the same ``n x n`` grid of experts as ``product_keys``, ``k=2`` of them per token,
one head, softmax scores, with the query width ``dim_key`` that brings its parameters
closest to the budget from below.  PEER maps ``d -> d``: the tokens are zero-padded
to the hidden width, so the weights reading the padding (half of its down-projection
and query weights here) never receive a gradient.  It has no routing losses.

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
import sys
import time
from collections.abc import Callable

import numpy as np

DEFAULT_PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compare_routers.png")
_DEFAULT_PLOT_SHOWN = "examples/results/compare_routers.png"  # how --help names DEFAULT_PLOT

#: The routers compared, in table order.  A label is either a name that
#: :func:`tensormoe.routing.get_router` knows, or a key of ``BUILDERS``.
ROUTERS = ["entmax15", "softmax", "sparsemax", "top1", "top2", "top1-nonoise", "top2-nonoise", "top2-capacity",
           "gshard", "expert_choice", "soft", "product_keys"]


def _top_k_without_noise(k: int) -> Callable[[int], object]:
    def build(levels: int) -> object:
        from tensormoe.routing import TopKRouter

        return TopKRouter(k=k, noise=None)

    return build


def _soft(levels: int) -> object:
    # Soft MoE can hold one level only: a hierarchical layer routes its other levels with entmax15
    return "soft" if levels == 1 else ["soft"] + ["entmax15"] * (levels - 1)


def _top2_capacity(levels: int) -> object:
    from tensormoe.routing import TopKRouter

    # the places are shared by both slots: factor 2 gives every token two places on average
    return TopKRouter(k=2, noise=None, capacity_factor=2.0)


def _product_keys(levels: int) -> object:
    from tensormoe.routing import ProductKeyRouter

    return ProductKeyRouter(k=2, key_dim=4)


#: Labels that need more than a name: ``label -> build(levels)`` returns the layer's ``router=``.
#: To compare a new router, add its label to ``ROUTERS`` and, unless get_router knows the
#: label, a builder here.
BUILDERS: dict[str, Callable[[int], object]] = {
    "top1-nonoise": _top_k_without_noise(1),
    "top2-nonoise": _top_k_without_noise(2),
    "top2-capacity": _top2_capacity,
    "soft": _soft,
    "product_keys": _product_keys,
}

#: Rows outside tensormoe's routers (chosen with ``--routers``, not run by default):
#: ``peer`` replaces the MoE layer by ``PEER_pytorch.PEER`` (see the module docstring)
EXTERNAL = ["peer"]

#: Routers of two equal expert levels ``[n, n]``: they get ``--experts N`` (a square) as ``[sqrt(N), sqrt(N)]``
JOINT = ("product_keys",)


def make_router(label: str, levels: int) -> object:
    """The ``router=`` argument for ``label`` on a layer of ``levels`` expert levels."""
    return BUILDERS[label](levels) if label in BUILDERS else label


def experts_for(label: str, experts: list[int]) -> list[int]:
    """The layer's ``expert_dims`` for ``label``: ``experts``, or ``[n, n]`` with ``n * n`` experts for product keys.

    Raises ``ValueError`` when product keys cannot hold ``experts``.
    """
    if label not in JOINT and label not in EXTERNAL:
        return list(experts)
    if len(experts) == 2 and experts[0] == experts[1]:
        return list(experts)
    side = math.isqrt(experts[0]) if len(experts) == 1 else 0
    if side < 2 or side * side != experts[0]:
        raise ValueError(f"{label} needs a square number of experts (--experts 16 is a 4 x 4 grid) or two equal "
                         f"levels (--experts 4 4); got {experts}")
    return [side, side]


def peer_width(in_dim: int, out_dim: int) -> int:
    """PEER's ``dim``: it maps ``d -> d`` with ``d`` even, so the tokens are zero-padded to it."""
    d = max(in_dim, out_dim)
    return d + d % 2


def peer_params(d: int, n_experts: int, dim_key: int, heads: int = 1) -> int:
    """PEER's parameters: down and up embeddings ``2 N d``, queries ``d * 2 h dk``, sub-keys ``h * 2 sqrt(N) dk``."""
    return 2 * n_experts * d + d * 2 * heads * dim_key + heads * 2 * math.isqrt(n_experts) * dim_key


def peer_dim_key(budget: int, in_dim: int, out_dim: int, experts: list[int]) -> int:
    """The largest ``dim_key`` whose PEER layer fits in ``budget`` parameters.

    Raises ``ValueError`` when not even ``dim_key=1`` fits.
    """
    d, n = peer_width(in_dim, out_dim), experts[0] * experts[1]
    if peer_params(d, n, 1) > budget:
        raise ValueError(f"{budget} parameters are too few for router 'peer': dim_key 1 needs {peer_params(d, n, 1)}")
    dim_key = 1
    while peer_params(d, n, dim_key + 1) <= budget:
        dim_key += 1
    return dim_key


def peer_missing() -> str | None:
    """Why the ``peer`` row cannot run (PEER_pytorch or its imports absent), or None."""
    try:
        import PEER_pytorch  # noqa: F401
    except ImportError as err:
        return f"PEER_pytorch is not installed ({err}); pip install PEER-pytorch"
    return None


class PeerModel:
    """``PEER_pytorch.PEER`` in the MoE layer's place: ``forward(x, training) -> (h, routing)``.

    ``routing`` is the dense ``[tokens, N]`` weight of each expert (its softmax score
    where selected, 0 elsewhere), recomputed with PEER's own retrieval steps.
    """

    def __init__(self, in_dim: int, out_dim: int, experts: list[int], budget: int, seed: int):
        import torch
        from PEER_pytorch import PEER

        self.in_dim, self.out_dim, self.n = in_dim, out_dim, experts[0] * experts[1]
        self.d = peer_width(in_dim, out_dim)
        self.dim_key = peer_dim_key(budget, in_dim, out_dim, experts)
        torch.manual_seed(seed)
        self.layer = PEER(dim=self.d, heads=1, num_experts=self.n, num_experts_per_head=2, product_key_topk=2,
                          dim_key=self.dim_key, non_competing_scores=False)
        self.n_params = sum(p.numel() for p in self.layer.parameters())
        if self.n_params != peer_params(self.d, self.n, self.dim_key):
            raise AssertionError(f"PEER has {self.n_params} parameters, the arithmetic says "
                                 f"{peer_params(self.d, self.n, self.dim_key)}")

    def parameters(self) -> list:
        return list(self.layer.parameters())

    def _pad(self, x):
        import torch

        return torch.nn.functional.pad(x, (0, self.d - x.shape[-1]))

    def routing(self, x):
        """Dense expert weights ``[tokens, N]`` from PEER's retrieval (product-key top-2, softmax)."""
        import torch

        layer, x = self.layer, self._pad(x)
        q = layer.to_queries(layer.norm(x))  # [2, b, n, h, dk]
        sim = torch.einsum("pbnhd,hkpd->pbnhk", q, layer.keys)
        (sx, sy), (ix, iy) = sim.topk(layer.product_key_topk, dim=-1)
        scores = (sx[..., :, None] + sy[..., None, :]).flatten(-2)
        indices = (ix[..., :, None] * layer.num_keys + iy[..., None, :]).flatten(-2)
        top, pick = scores.topk(layer.num_experts_per_head_topk, dim=-1)
        weights = layer.score_activation(top)
        dense = torch.zeros(*indices.shape[:-1], self.n, dtype=weights.dtype)
        dense.scatter_add_(-1, indices.gather(-1, pick), weights)
        return dense.sum(-2).reshape(-1, self.n)  # heads summed

    def forward(self, x, training: bool):
        self.layer.train(training)
        return self.layer(self._pad(x))[..., :self.out_dim], None


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


def usage(routing, experts: list[int], joint: bool = False) -> tuple[float, float]:
    """Usage entropy / log N and experts per token, over the flat expert index of all levels.

    The weight of expert ``(n_1, ..., n_H)`` is the product of the levels' weights
    (Soft MoE: the combine weight of the expert's slots); with ``joint`` levels
    (product keys) it is the weight of the selected pair.  When the levels route
    different rows (a Soft MoE level with others routing its slots), the levels
    are scored one by one and averaged.
    """
    import torch

    from tensormoe.routing import pair_to_dense

    if joint:
        pairs = pair_to_dense(routing[0], routing[1], experts[0], experts[1]).detach()
        per_level = [pairs.reshape(-1, experts[0] * experts[1]).double()]
        experts = [experts[0] * experts[1]]
    else:
        per_level = []
    for r, n in zip(routing if not joint else (), experts):
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

    data = tuple(torch.as_tensor(a) for a in data)
    x_train, x_test, _, y_test = data
    in_dim, tokens = x_train.shape[-1], x_train.shape[-2]
    experts = experts_for(router_name, args.experts)
    if router_name in EXTERNAL:
        return _run_peer(router_name, data, args, seed, experts, bar)
    router = make_router(router_name, len(experts))
    rank = rank_for_budget(router, args.budget, in_dim, args.hidden, experts)
    torch.manual_seed(seed)
    with tensormoe.backend_context("pytorch"):
        layer = tensormoe.CPMMoE(in_dim, args.hidden, experts, rank=rank, router=router, seed=seed)
        params = {k: v.clone().requires_grad_(True) for k, v in layer.params.items()}
        head = torch.nn.Linear(tokens * args.hidden, 10)
        generator = np.random.default_rng(seed)

        def forward(x, training):
            rng = int(generator.integers(2**31))  # training noise; the random second-expert policy draws in eval too
            h, routing = layer.apply(params, x, training=training, rng=rng, return_routing=True)
            return head(torch.nn.functional.gelu(h).flatten(1)), routing

        epoch_times = _train([*params.values(), *head.parameters()], forward, data, args, generator, bar,
                             loss_of=lambda r: aux_loss(r, load_balancing=args.load_balancing, z=args.z_loss))
        logits, routing, infer = _evaluate(forward, x_test)
        accuracy = float((logits.argmax(-1) == y_test).double().mean())
        entropy, active = usage(routing, experts, joint=router_name in JOINT)
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


def _train(params: list, forward, data: tuple, args: argparse.Namespace, generator, bar, loss_of=None) -> list:
    """Adam over ``params`` for ``args.epochs``; ``loss_of(routing)`` adds routing losses.  The epoch times."""
    import torch

    x_train, _, y_train, _ = data
    optimizer = torch.optim.Adam(params, lr=args.lr)
    epoch_times = []
    for _ in range(args.epochs):
        order = torch.as_tensor(generator.permutation(len(x_train)))
        start = time.perf_counter()
        for batch in order.split(args.batch_size):
            logits, routing = forward(x_train[batch], training=True)
            loss = torch.nn.functional.cross_entropy(logits, y_train[batch])
            if loss_of is not None:
                loss = loss + loss_of(routing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epoch_times.append(time.perf_counter() - start)
        if bar is not None:
            bar.update()
    return epoch_times


def _evaluate(forward, x_test) -> tuple:
    """``(logits, routing, seconds)`` of one timed forward over the test set, after a warm-up call."""
    import torch

    with torch.no_grad():
        forward(x_test, training=False)  # warm-up
        start = time.perf_counter()
        logits, routing = forward(x_test, training=False)
        return logits, routing, time.perf_counter() - start


def _run_peer(router_name: str, data: tuple, args: argparse.Namespace, seed: int, experts: list[int], bar) -> dict:
    """:func:`run` for the ``peer`` row: PEER_pytorch's layer in the MoE layer's place, no routing losses."""
    import torch

    x_train, x_test, _, y_test = data
    in_dim, tokens = x_train.shape[-1], x_train.shape[-2]
    model = PeerModel(in_dim, args.hidden, experts, args.budget, seed)
    head = torch.nn.Linear(tokens * args.hidden, 10)
    generator = np.random.default_rng(seed)

    def forward(x, training):
        h, _ = model.forward(x, training)
        return head(torch.nn.functional.gelu(h).flatten(1)), None

    epoch_times = _train([*model.parameters(), *head.parameters()], forward, data, args, generator, bar)
    logits, _, infer = _evaluate(forward, x_test)
    with torch.no_grad():
        dense = model.routing(x_test).double()
    share = dense.sum(0) / dense.sum()
    entropy = float(-(share * torch.log(share.clamp_min(1e-30))).sum()) / math.log(share.numel())
    return {
        "router": router_name,
        "rank": f"dk={model.dim_key}",
        "params": model.n_params,
        "accuracy": float((logits.argmax(-1) == y_test).double().mean()),
        "entropy": entropy,
        "active": float((dense != 0).sum(-1).double().mean()),
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
product_keys routes a grid of experts: --experts 16 becomes 4 x 4 (a number
that is not a square leaves it out of the default routers).
peer (PEER_pytorch.PEER on the same grid; not in the default routers) is left
out with a note when PEER-pytorch is not installed:
  python examples/compare_routers.py --routers product_keys peer --plot ''
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
    p.add_argument("--routers", nargs="+", default=ROUTERS, choices=ROUTERS + EXTERNAL, metavar="ROUTER",
                   help=f"routers to compare, from: {' '.join(ROUTERS)} (default: all); and "
                        f"{' '.join(EXTERNAL)}: PEER_pytorch's layer in the MoE layer's place (needs PEER-pytorch)")
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

    explicit = "--routers" in (argv if argv is not None else sys.argv[1:])
    routers = []
    for name in args.routers:  # product keys need a grid of experts
        if name in EXTERNAL and (why := peer_missing()):
            print(f"note: {name} left out: {why}", file=sys.stderr)
            continue
        try:
            experts_for(name, args.experts)
            routers.append(name)
        except ValueError as err:
            if explicit:
                parse.error(f"argument --experts: {err}")
            print(f"note: {name} left out: {err}", file=sys.stderr)
    args.routers = routers
    if not routers:
        print("note: no router left to compare", file=sys.stderr)
        return []
    data = load_tokens(300 if args.quick else None, seed=0)
    in_dim = data[0].shape[-1]
    for name in args.routers:  # every budget problem before any training
        experts = experts_for(name, args.experts)
        try:
            if name in EXTERNAL:
                peer_dim_key(args.budget, in_dim, args.hidden, experts)
            else:
                rank_for_budget(make_router(name, len(experts)), args.budget, in_dim, args.hidden, experts)
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
