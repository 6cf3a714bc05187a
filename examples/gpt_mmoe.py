"""A character-level GPT whose MLP blocks are MMoE layers: accuracy, speed and expert specialisation.

Data: the topic texts of the Python documentation that ship with every Python
(pydoc_data/topics.py: about 465,000 characters of English prose and code);
nothing is downloaded.  The first 90% is the training split, the last 10% the
validation split; every character is a class.

Model: a small pre-LayerNorm GPT (token and position embeddings, causal
self-attention, an MLP per block, the output layer tied to the token embedding),
whose MLP blocks d -> 4d -> d are, per --models:

* linear: two torch.nn.Linear layers and a GELU (the baseline);
* cp: tensormoe.torch.MMoEMLP of two CP MMoE layers sharing one
  entmax-1.5 gate (the MMoE paper's GPT-2 block);
* tr: the same with tensor-ring layers (bond ranks 4, the input-output
  bond solved for the budget, the paper's rule);
* top2: the CP experts routed sparsely: top-2 token choice with learned
  training noise and a load-balancing loss; each layer contracts only the two
  selected experts' factor rows.

Every MMoE block has at most the trainable parameters of the linear block
(tensormoe.ranks.match_rank; the second layer's gate is unused and
frozen, so not counted; top-2's noise weights are).  All models are trained
alike (Adam, linear warm-up then cosine decay, batches of random windows).

Analysis of the MMoE models, on one block (--analyse-layer) and the
validation tokens labelled by the character to predict
(tensormoe.analysis): usage statistics and class specialisation of
every block; the counterfactual ablation of every expert in turn (per-class
accuracy change, class-level polysemanticity); the ablation curve of the
experts most selective for one character, removed after the gate's
normalisation and before it (masked logits); a check that the permanent
removal of an expert (its slices of both layers' factors) equals its removal at
inference; and edits of one expert in factorized form (tensormoe.analysis.edit_expert:
another expert's matrix copied into it, and a rank-one correction, with the
part of each achieved).
For the top-2 model the analysis runs its blocks through their coefficients
(the same outputs as the sparse path: zeros for the unselected experts).

Outputs (in --out): results.json (every number), and the figures
usage.png, heatmap_<model>.png, top_experts_<model>.png,
ablation_curve.png; the tables are printed.

Examples:
  python examples/gpt_mmoe.py                      the default run (10-15 minutes on 2 CPU cores)
  python examples/gpt_mmoe.py --quick              a smoke run of seconds (the tests run it)
  python examples/gpt_mmoe.py --models linear,cp --steps 2000 --experts 64 --out /tmp/gpt
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

MODELS = ("linear", "cp", "tr", "top2")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpt_mmoe")
QUICK = {"layers": 1, "embd": 32, "heads": 2, "block": 32, "batch": 16, "experts": 8, "steps": 60, "lr": 1e-2,
         "eval_tokens": 2048, "ablate": 4, "show_classes": 12, "timing_rounds": 2, "min_rows": 10}


# --- data -----------------------------------------------------------------------------------------


@dataclass
class Corpus:
    train: np.ndarray  # int64 character ids
    val: np.ndarray
    chars: list[str]

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def name(self, c: int) -> str:
        return repr(self.chars[c])


def load_corpus() -> Corpus:
    """The pydoc topic texts (sorted by topic), as character ids, split 90/10 in reading order."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    cut = int(0.9 * len(ids))
    return Corpus(ids[:cut], ids[cut:], chars)


def eval_windows(corpus: Corpus, block: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed validation windows ``[W, block]`` spread over the split, and their targets (the next characters)."""
    n = max(1, min(tokens // block, (len(corpus.val) - 1) // block))
    starts = np.linspace(0, len(corpus.val) - block - 1, n).astype(np.int64)
    x = np.stack([corpus.val[s : s + block] for s in starts])
    y = np.stack([corpus.val[s + 1 : s + block + 1] for s in starts])
    return x, y


# --- the model --------------------------------------------------------------------------------------


def build_model(kind: str, vocab: int, args: argparse.Namespace) -> Any:
    """The GPT with MLP blocks of ``kind``, and the MMoE blocks' configuration (ranks)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    import tensormoe
    from tensormoe.ranks import match_rank
    from tensormoe.torch import CPMMoE, MMoEMLP, TRMMoE

    d, hidden, n = args.embd, 4 * args.embd, args.experts

    class SparseMMoEMLP(MMoEMLP):
        """MMoEMLP with top-k routing objects: each layer contracts only the selected experts' factor rows.

        ``sparse = False`` runs the parent's forward through dense coefficients
        (zeros for unselected experts: the same outputs), which the analysis's
        interventions act on.
        """

        sparse = True
        aux: Any = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.sparse:
                return super().forward(x)
            p1, p2 = dict(self.first.params.items()), dict(self.second.params.items())
            routing = self.first.layer.route(p1, x, training=self.training, rng=self.rng if self.training else None,
                                             backend="pytorch")
            self.aux = tensormoe.aux_loss(routing) if self.training else None
            h = self.first.layer.apply(p1, x, routing=routing, backend="pytorch")
            return self.second.layer.apply(p2, self.activation(h), routing=routing, backend="pytorch")

    def mlp() -> tuple[nn.Module, dict[str, Any]]:
        if kind == "linear":
            return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)), {}
        linear_1, linear_2 = (d + 1) * hidden, (hidden + 1) * d
        if kind == "tr":
            r1 = match_rank("tr", d, hidden, [n], linear_1, bond_rank=4).ranks
            r2 = match_rank("tr", hidden, d, [n], linear_2, bond_rank=4, count_gates=False).ranks
            return MMoEMLP(TRMMoE(d, hidden, [n], ranks=r1), TRMMoE(hidden, d, [n], ranks=r2)), {"ranks": [r1, r2]}
        if kind == "cp":
            r1 = match_rank("cp", d, hidden, [n], linear_1).ranks
            r2 = match_rank("cp", hidden, d, [n], linear_2, count_gates=False).ranks
            return MMoEMLP(CPMMoE(d, hidden, [n], rank=r1), CPMMoE(hidden, d, [n], rank=r2)), {"ranks": [r1, r2]}
        # top2: the learned noise projection costs another d * n parameters in the first layer
        r1 = match_rank("cp", d, hidden, [n], linear_1 - d * n).ranks
        r2 = match_rank("cp", hidden, d, [n], linear_2, count_gates=False).ranks
        block = SparseMMoEMLP(CPMMoE(d, hidden, [n], rank=r1, router="top2"),
                              CPMMoE(hidden, d, [n], rank=r2, router="top2"))
        return block, {"ranks": [r1, r2]}

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp, self.config = mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            q, k, v = (z.view(b, t, args.heads, d // args.heads).transpose(1, 2)
                       for z in self.qkv(self.ln_1(x)).split(d, dim=-1))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(y)
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.zeros(args.block, d))
            nn.init.normal_(self.tok.weight, std=0.02)
            nn.init.normal_(self.pos, std=0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(args.layers))
            self.ln_f = nn.LayerNorm(d)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            x = self.tok(idx) + self.pos[: idx.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x) @ self.tok.weight.T  # output layer tied to the embedding

    model = GPT()
    if kind == "top2":
        for i, block in enumerate(model.blocks):
            block.mlp.rng = torch.Generator().manual_seed(args.seed * 1000 + i)
    return model


def trainable(module: Any) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --- training and evaluation ---------------------------------------------------------------------------


def train(model: Any, corpus: Corpus, args: argparse.Namespace, label: str) -> dict[str, Any]:
    """Adam with warm-up and cosine decay; returns the loss curve and the training throughput."""
    import torch
    from torch.nn import functional as F
    from tqdm.auto import trange

    rng = np.random.default_rng(args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    warmup = max(1, args.steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    model.train()
    start = time.perf_counter()
    bar = trange(args.steps, desc=f"training {label}", leave=False, disable=args.quiet)
    for _ in bar:
        starts = rng.integers(0, len(corpus.train) - args.block - 1, size=args.batch)
        x = torch.from_numpy(np.stack([corpus.train[s : s + args.block] for s in starts]))
        y = torch.from_numpy(np.stack([corpus.train[s + 1 : s + args.block + 1] for s in starts]))
        loss = F.cross_entropy(model(x).reshape(-1, corpus.vocab), y.reshape(-1))
        aux = [b.mlp.aux for b in model.blocks if getattr(b.mlp, "aux", None) is not None]
        total = loss + sum(aux) if aux else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    k = max(1, min(10, args.steps // 5))
    return {"loss_curve": losses, "first_loss": float(np.mean(losses[:k])), "last_loss": float(np.mean(losses[-k:])),
            "train_seconds": seconds, "loop_tokens_per_s": args.steps * args.batch * args.block / seconds}


def predict(model: Any, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Logits ``[W, T, V]`` of the windows, in eval mode without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


def evaluate(model: Any, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    z = predict(model, x).reshape(-1, model.tok.weight.shape[0]).astype(np.float64)
    z -= z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    target = y.reshape(-1)
    return {"val_loss": float(-logp[np.arange(len(target)), target].mean()),
            "val_accuracy": float((z.argmax(1) == target).mean())}


def throughput(models: dict[str, Any], corpus: Corpus, x_val: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """Training (forward + backward) and inference tokens per second, timed side by side.

    Round-robin: every round times one training step and one inference pass of
    every model on the same batches, so that a change of the machine's load
    hits all models alike; the median over rounds is reported (after one
    warm-up round).  No optimizer step: the weights stay as trained.
    """
    import torch
    from torch.nn import functional as F

    rng = np.random.default_rng(args.seed + 1)
    starts = rng.integers(0, len(corpus.train) - args.block - 1, size=args.batch)
    x = torch.from_numpy(np.stack([corpus.train[s : s + args.block] for s in starts]))
    y = torch.from_numpy(np.stack([corpus.train[s + 1 : s + args.block + 1] for s in starts]))
    xe = torch.from_numpy(x_val[: args.batch])
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": []} for k in models}
    for round_ in range(args.timing_rounds + 1):
        for kind, model in models.items():
            model.train()
            start = time.perf_counter()
            loss = F.cross_entropy(model(x).reshape(-1, corpus.vocab), y.reshape(-1))
            loss.backward()
            train_s = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            model.eval()
            with torch.no_grad():
                start = time.perf_counter()
                model(xe)
                infer_s = time.perf_counter() - start
            if round_:  # the first round warms up (plans, allocations)
                times[kind]["train"].append(train_s)
                times[kind]["infer"].append(infer_s)
    return {kind: {"train_tokens_per_s": x.numel() / float(np.median(t["train"])),
                   "infer_tokens_per_s": xe.numel() / float(np.median(t["infer"]))} for kind, t in times.items()}


# --- analysis --------------------------------------------------------------------------------------------


def block_usage(model: Any, x: np.ndarray, y: np.ndarray, vocab: int) -> list[Any]:
    """:class:`tensormoe.analysis.ExpertUsage` of every MMoE block over the windows, labelled by target character."""
    import torch

    from tensormoe.analysis import expert_usage

    usages: list[Any] = [0] * len(model.blocks)
    position = {"start": 0}

    def hook(index: int) -> Callable[..., None]:
        def record(module: Any, inputs: tuple[torch.Tensor]) -> None:
            labels = y[position["start"] : position["start"] + inputs[0].shape[0]]
            usages[index] = usages[index] + expert_usage(module.coefficients(inputs[0]), labels, vocab)

        return record

    handles = [b.mlp.register_forward_pre_hook(hook(i)) for i, b in enumerate(model.blocks)]
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(x), 64):
                position["start"] = start
                model(torch.from_numpy(x[start : start + 64]))
    finally:
        for h in handles:
            h.remove()
    return usages


def analyse(model: Any, corpus: Corpus, x: np.ndarray, y: np.ndarray, args: argparse.Namespace,
            label: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Specialisation, counterfactual ablation and edits of one MMoE model; JSON results and the plotted objects."""
    from tensormoe import analysis

    for block in model.blocks:
        block.mlp.sparse = False  # interventions act on the coefficient path (same outputs)
    layer = args.analyse_layer % len(model.blocks)
    mlp = model.blocks[layer].mlp
    usages = block_usage(model, x, y, corpus.vocab)
    counts = usages[layer].class_rows
    # class statistics over the characters with enough rows (a rare one gives noisy means)
    frequent = np.flatnonzero(counts >= args.min_rows)
    usages = [u.select_classes(frequent) for u in usages]
    usage = usages[layer]

    def accuracy(removed: tuple[int, ...], mode: str = "after") -> np.ndarray:
        with analysis.intervene(mlp, list(removed), mode=mode):
            logits = predict(model, x)
        return analysis.class_accuracy(logits, y, corpus.vocab)

    out: dict[str, Any] = {"analysed_layer": layer}
    out["blocks"] = [
        {"specialisation": u.specialisation(), "specialisation_raw": u.specialisation(balanced=False),
         "mean_class_entropy": float(np.nanmean(u.class_entropy())),
         "effective_experts_per_token": float(math.exp(u.mean_entropy())),
         "used_experts": int(u.used().sum()), "experts": u.n_experts()}
        for u in usages
    ]
    # every expert removed in turn: per-class accuracy change and polysemanticity over the frequent classes
    effects = analysis.ablation_effects(accuracy, range(usage.n_experts()), progress=not args.quiet)
    poly = effects.polysemanticity(frequent)
    scored = ~np.isnan(poly)
    out["polysemanticity"] = {"mean": float(np.nanmean(poly)) if scored.any() else None, "scored": int(scored.sum()),
                              "classes": len(frequent), "uniform_bound": 1 - 1 / max(len(frequent), 1),
                              "min_rows": args.min_rows}

    def others(change: np.ndarray, c: int) -> float:
        rest = np.setdiff1d(np.flatnonzero(counts > 0), [c])
        return float(np.average(change[rest], weights=counts[rest]))

    # the experts whose removal costs one frequent class the most (counterfactual evidence)
    drops = np.nan_to_num(effects.drop[:, frequent], nan=0.0)
    worst = np.argsort(-drops.max(1), kind="stable")[:8]
    top_class, top_share = usage.top_class(), usage.top_share()
    out["counterfactual"] = [
        {"expert": int(e), "class": corpus.name(int(frequent[drops[e].argmax()])),
         "class_change": float(effects.change[e, frequent[drops[e].argmax()]]),
         "others_change": others(effects.change[e], int(frequent[drops[e].argmax()])),
         "polysemanticity": None if np.isnan(poly[e]) else float(poly[e]),
         "routing_top_class": corpus.name(int(top_class[e])) if top_class[e] >= 0 else "unused",
         "routing_top_share": None if np.isnan(top_share[e]) else float(top_share[e])}
        for e in worst if drops[e].max() > 0
    ]
    # the most selective expert of each of the most frequent classes, removed alone
    most = np.argsort(-counts, kind="stable")[: min(6, len(frequent))]
    rows = []
    for c in most:
        e = int(usage.top_experts(int(c), 1)[0])
        rows.append({"class": corpus.name(int(c)), "expert": e, "selectivity": float(usage.selectivity()[e, c]),
                     "target_change": float(effects.change[e, c]), "others_change": others(effects.change[e], int(c))})
    out["expert_effects"] = rows
    # ablation curves: the frequent class with the most selective expert, and the most frequent letter
    sel = np.nan_to_num(usage.selectivity(), nan=-np.inf)
    targets = [int(max(frequent, key=lambda c: sel[:, c].max()))]
    letters = [int(c) for c in np.argsort(-counts, kind="stable") if corpus.chars[c].isalpha() and counts[c] > 0]
    if letters and letters[0] not in targets:
        targets.append(letters[0])
    curves = {}
    for target in targets:
        order = [int(e) for e in usage.top_experts(target, args.ablate)]
        for mode in ("after", "before"):
            curves[target, mode] = analysis.ablation_curve(lambda r, m=mode: accuracy(r, m), order, target,
                                                           weights=counts, progress=not args.quiet)
    out["curves"] = [{"target": corpus.name(t), "mode": m, "order": list(c.order),
                      "target_accuracy": c.target_accuracy.tolist(), "other_accuracy": c.other_accuracy.tolist()}
                     for (t, m), c in curves.items()]
    target = targets[0]
    order = list(curves[target, "after"].order)
    # permanent removal of the target's first expert (both layers' slices) == removal at inference
    e = order[0]
    edited = copy.deepcopy(model)
    for name in ("first", "second"):
        sub = getattr(edited.blocks[layer].mlp, name)
        sub.load_state_dict({"params." + k: v for k, v in analysis.scale_expert(sub, None, e, 0.0).items()})
    with analysis.intervene(mlp, [e]):
        removed = predict(model, x)
    permanent = predict(edited, x)
    out["permanent_removal"] = {"expert": e, "max_abs_logit_difference": float(np.abs(permanent - removed).max()),
                                "max_abs_logit": float(np.abs(removed).max())}
    # rewrite expert e of the second layer into the expert used least by the target class
    donor = int(np.nanargmin(usage.class_mean()[target]))
    second = mlp.second
    _, report = analysis.edit_expert(second, None, e, second.expert_weight(donor).detach())
    # and a rank-one correction of expert e (half its norm, random directions): how much of it its slice can carry
    w = second.expert_weight(e).detach().numpy().astype(np.float64)
    rng = np.random.default_rng(args.seed)
    delta = np.outer(rng.normal(size=w.shape[0]), rng.normal(size=w.shape[1]))
    delta *= 0.5 * np.linalg.norm(w) / np.linalg.norm(delta)
    _, rank_one = analysis.edit_expert(second, None, e, w + delta)
    out["edit"] = {"expert": e, "into": donor, "achieved": report.achieved, "leakage": report.leakage,
                   "rank_one_achieved": rank_one.achieved, "rank_one_leakage": rank_one.leakage,
                   "rank": getattr(second, "rank", None) or second.factorization.describe_ranks()}
    return out, {"usage": usage, "usages": usages, "curves": curves}


# --- main ------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__.split("\nExamples:\n")
    parser = argparse.ArgumentParser(
        description=doc[0].splitlines()[0] + "\n\n" + "\n".join(doc[0].splitlines()[2:]),
        epilog="examples:\n" + doc[1], formatter_class=argparse.RawDescriptionHelpFormatter)

    def positive(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
        return value

    def real(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}")
        return value

    def models(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in names if t not in MODELS]
        if not names or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(MODELS)}; got {text!r}")
        return names

    p = parser.add_argument
    p("--models", type=models, default=list(MODELS),
      help=f"comma-separated MLP kinds to train and compare, from {', '.join(MODELS)} (default: all)")
    p("--steps", type=positive, default=1000, help="training steps per model (default 1000)")
    p("--batch", type=positive, default=32, help="windows per training step (default 32)")
    p("--block", type=positive, default=64, help="characters per window, the context length (default 64)")
    p("--layers", type=positive, default=2, help="transformer blocks (default 2)")
    p("--embd", type=positive, default=64, help="embedding width d; the MLPs are d -> 4d -> d (default 64)")
    p("--heads", type=positive, default=4, help="attention heads; must divide --embd (default 4)")
    p("--experts", type=positive, default=64, help="experts per MMoE layer (default 64)")
    p("--lr", type=real, default=3e-3, help="peak Adam learning rate (default 3e-3)")
    p("--seed", type=int, default=0, help="seed of the initialisation, the batches and the noise (default 0)")
    p("--eval-tokens", type=positive, default=16384,
      help="validation characters used for the loss, the accuracy and all analyses (default 16384)")
    p("--analyse-layer", type=int, default=-1, help="block whose experts are ablated; negative counts from the "
                                                    "end (default -1, the last)")
    p("--ablate", type=positive, default=8, help="experts removed along the ablation curve (default 8)")
    p("--min-rows", type=positive, default=50,
      help="validation rows a character needs to enter the class statistics, the polysemanticity and the "
           "counterfactual table (default 50: a rarer class gives noisy means and loses much accuracy when one "
           "row flips)")
    p("--show-classes", type=positive, default=24,
      help="most frequent characters shown in the heat maps (default 24; statistics use all)")
    p("--threads", type=positive, default=1,
      help="PyTorch CPU threads (default 1: on a shared machine more threads than free cores run many times slower)")
    p("--timing-rounds", type=positive, default=7,
      help="rounds of the side-by-side throughput measurement; the median is reported (default 7)")
    p("--out", default=DEFAULT_OUT, help=f"folder for results.json and the figures (default {DEFAULT_OUT})")
    p("--quick", action="store_true",
      help="tiny model and few steps: a smoke run of seconds (overrides the sizes; the tests run it)")
    p("--quiet", action="store_true", help="no progress bars and no printed tables")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.embd % args.heads:
        parser.error(f"argument --heads: {args.heads} must divide --embd {args.embd}")
    if args.ablate > args.experts:
        parser.error(f"argument --ablate: {args.ablate} exceeds --experts {args.experts}")
    if not -args.layers <= args.analyse_layer < args.layers:
        parser.error(f"argument --analyse-layer: {args.analyse_layer} is not a block of --layers {args.layers}")
    try:  # before minutes of training, not after
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        parser.error(f"argument --out: cannot create the folder {args.out!r}: {error.strerror}")
    if not os.access(args.out, os.W_OK):
        parser.error(f"argument --out: the folder {args.out!r} is not writable")
    return args


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    corpus = load_corpus()
    x_val, y_val = eval_windows(corpus, args.block, args.eval_tokens)
    results: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items()},
        "data": {"source": "pydoc_data/topics.py", "train_chars": len(corpus.train), "val_chars": len(corpus.val),
                 "vocab": corpus.vocab, "eval_tokens": int(y_val.size)},
        "machine": {"threads": args.threads, "load_before": load(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "models": {},
    }
    models: dict[str, Any] = {}
    for kind in args.models:
        torch.manual_seed(args.seed)
        model = models[kind] = build_model(kind, corpus.vocab, args)
        row: dict[str, Any] = {"params": trainable(model), "mlp_params": trainable(model.blocks[0].mlp),
                               "mlp_config": model.blocks[0].config}
        row.update(train(model, corpus, args, kind))
        row.update(evaluate(model, x_val, y_val))
        results["models"][kind] = row
    for kind, speed in throughput(models, corpus, x_val, args).items():
        results["models"][kind].update(speed)
    kept: dict[str, Any] = {}
    for kind, model in models.items():
        if kind != "linear":
            results["models"][kind]["analysis"], kept[kind] = analyse(model, corpus, x_val, y_val, args, kind)
    results["machine"]["load_after"] = load()
    figures = write_figures(kept, corpus, args)
    results["figures"] = figures
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if not args.quiet:
        print_tables(results, corpus)
    return results


def write_figures(kept: dict[str, Any], corpus: Corpus, args: argparse.Namespace) -> list[str]:
    from tensormoe import plots

    names = [corpus.name(c) for c in range(corpus.vocab)]
    paths = []
    size = f"{args.layers} blocks, d={args.embd}, {args.experts} experts, {args.steps} steps"
    for kind, obj in kept.items():
        layer = args.analyse_layer % args.layers
        path = os.path.join(args.out, f"heatmap_{kind}.png")
        plots.class_heatmap(obj["usage"], classes=names, max_classes=args.show_classes, path=path,
                            title=f"{kind} GPT ({size}), block {layer}: share of each expert's mean "
                                  f"coefficient per next character")
        paths.append(path)
        path = os.path.join(args.out, f"top_experts_{kind}.png")
        plots.top_experts(obj["usage"], k=3, classes=names, max_classes=args.show_classes, path=path,
                          title=f"{kind} GPT, block {layer}: the 3 experts most selective for each character")
        paths.append(path)
    if kept:
        curves, labels = [], []
        for kind, obj in kept.items():
            for (_, mode), curve in obj["curves"].items():
                curves.append(curve)
                labels.append(f"{kind}, {mode} normalisation")
        path = os.path.join(args.out, "ablation_curve.png")
        plots.ablation_curve(curves, labels=labels, classes=names, path=path,
                             title=f"Removing the experts most selective for a character, block "
                                   f"{args.analyse_layer % args.layers} ({size})")
        paths.append(path)
        path = os.path.join(args.out, "usage.png")
        plots.usage_histogram([obj["usage"] for obj in kept.values()], labels=list(kept), path=path,
                              title=f"Expert usage on the validation characters ({size})")
        paths.append(path)
    return paths


def print_tables(results: dict[str, Any], corpus: Corpus) -> None:
    cfg, machine = results["config"], results["machine"]
    print(f"\n{results['data']['train_chars']:,} training / {results['data']['eval_tokens']:,} validation characters "
          f"(pydoc topics, {corpus.vocab} classes); {cfg['layers']} blocks, d={cfg['embd']}, "
          f"{cfg['experts']} experts, {cfg['steps']} steps of {cfg['batch']}x{cfg['block']}; "
          f"{machine['threads']} threads, load {machine['load_before']} -> {machine['load_after']}\n")
    print("| MLP | params (MLP / all) | train loss first -> last | val loss | val acc | train tok/s | infer tok/s |")
    print("|---|---|---|---|---|---|---|")
    for kind, r in results["models"].items():
        print(f"| {kind} | {r['mlp_params']:,} / {r['params']:,} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
              f"{r['val_loss']:.3f} | {100 * r['val_accuracy']:.1f}% | {r['train_tokens_per_s']:,.0f} | "
              f"{r['infer_tokens_per_s']:,.0f} |")
    analysed = {k: r["analysis"] for k, r in results["models"].items() if "analysis" in r}
    if not analysed:
        return
    print("\n| MLP | block | specialisation (balanced / raw) | class entropy | experts per token | used |")
    print("|---|---|---|---|---|---|")
    for kind, a in analysed.items():
        for i, b in enumerate(a["blocks"]):
            print(f"| {kind} | {i} | {b['specialisation']:.3f} / {b['specialisation_raw']:.3f} | "
                  f"{b['mean_class_entropy']:.3f} | {b['effective_experts_per_token']:.2f} | "
                  f"{b['used_experts']}/{b['experts']} |")
    print("\n| MLP | mean polysemanticity (experts scored / classes) | permanent removal = at inference (max abs "
          "logit diff) | edits of one expert: copy of another, rank-one correction (achieved, leakage) |")
    print("|---|---|---|---|")
    for kind, a in analysed.items():
        p = a["polysemanticity"]
        mean = "n/a" if p["mean"] is None else f"{p['mean']:.3f}"
        print(f"| {kind} | {mean} ({p['scored']} / {p['classes']}) | "
              f"{a['permanent_removal']['max_abs_logit_difference']:.2e} | "
              f"{a['edit']['achieved']:.3f}, {a['edit']['leakage']:.1e}; {a['edit']['rank_one_achieved']:.3f}, "
              f"{a['edit']['rank_one_leakage']:.1e} |")
    print("\n| MLP | target | removal | target accuracy, 0 -> k experts removed | other classes |")
    print("|---|---|---|---|---|")
    for kind, a in analysed.items():
        for c in a["curves"]:
            print(f"| {kind} | {c['target']} | {c['mode']} normalisation | "
                  f"{' -> '.join(f'{100 * v:.1f}' for v in c['target_accuracy'][::max(1, len(c['order']) // 4)])} | "
                  f"{100 * c['other_accuracy'][0]:.1f} -> {100 * c['other_accuracy'][-1]:.1f} |")
    for kind, a in analysed.items():
        print(f"\n{kind}, block {a['analysed_layer']}: the experts whose removal costs one character the most")
        print("| expert | character | its accuracy change | others' change | polysemanticity | routing: top class "
              "(share) |")
        print("|---|---|---|---|---|---|")
        for r in a["counterfactual"]:
            poly = "n/a" if r["polysemanticity"] is None else f"{r['polysemanticity']:.2f}"
            share = "" if r["routing_top_share"] is None else f" ({r['routing_top_share']:.2f})"
            print(f"| {r['expert']} | {r['class']} | {100 * r['class_change']:+.1f} pt | "
                  f"{100 * r['others_change']:+.2f} pt | {poly} | {r['routing_top_class']}{share} |")
    for kind, a in analysed.items():
        print(f"\n{kind}, block {a['analysed_layer']}: the most selective expert of each frequent character, removed")
        print("| character | expert | selectivity | its accuracy change | others' change |")
        print("|---|---|---|---|---|")
        for r in a["expert_effects"]:
            print(f"| {r['class']} | {r['expert']} | {r['selectivity']:.3f} | {100 * r['target_change']:+.1f} pt | "
                  f"{100 * r['others_change']:+.2f} pt |")


if __name__ == "__main__":
    main()
