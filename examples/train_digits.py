"""Train a digit classifier whose hidden layer is a multilinear mixture of experts.

Data: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; shipped with
scikit-learn, nothing is downloaded), split 75/25 stratified.

Model: ``x[64] -> hidden[64] -> GELU -> linear head[10]``.  The hidden layer is
either an MMoE (32 experts; CP by default, ``--kind`` for Tucker, TT or TR; the
largest ranks whose parameters, gates included, fit the budget) or a plain
linear layer ``64 -> 64`` with bias: the budget is the linear layer's parameter
count, so the two are parameter-matched.
Both are trained the same way (Adam, batch 64, cross-entropy).

Backend: ``--backend`` or the ``TENSORMOE_BACKEND`` flag.

* ``pytorch``: :mod:`tensormoe.torch` modules and ``torch.optim.Adam``;
* ``jax``: :mod:`tensormoe.jax` pytree layers, one ``jax.jit``-compiled Adam step;
* ``numpy``: NumPy has no automatic differentiation, so the model is trained with
  PyTorch (JAX if PyTorch is missing), saved with :mod:`tensormoe.io` and served
  in NumPy from the file: the test accuracy printed is NumPy's.

Output: the test accuracy of both models, and a PNG of expert specialisation:
for each expert, the share of its coefficient mass (summed over the test set)
that goes to each class.

Run:  python examples/train_digits.py                       (the flag's backend)
      python examples/train_digits.py --backend jax --plot experts.png
      python examples/train_digits.py --quick                (a few seconds)
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import tensormoe
from tensormoe import io
from tensormoe.ranks import match_rank

CLASSES = 10
HIDDEN = 64
DEFAULT_PLOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_digits_experts.png")


@dataclass
class Data:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_data(seed: int) -> Data:
    """The digits, standardised with the training set's statistics (float32)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1.0
    norm = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return Data(norm(x_train), y_train.astype(np.int64), norm(x_test), y_test.astype(np.int64))


KINDS = ("cp", "tucker", "tt", "tr")
CLASS_NAMES = {"cp": "CPMMoE", "tucker": "TuckerMMoE", "tt": "TTMMoE", "tr": "TRMMoE"}


def mmoe_config(in_dim: int, out_dim: int, experts: int, seed: int, kind: str = "cp") -> dict[str, Any]:
    """The MMoE of factorization ``kind`` with the largest ranks whose parameters, gates included, fit a linear layer's."""
    match = match_rank(kind, in_dim, out_dim, [experts], "linear")
    key = "rank" if kind == "cp" else "ranks"
    return {"class": CLASS_NAMES[kind], "in_dim": in_dim, "out_dim": out_dim, "expert_dims": [experts],
            key: match.ranks, "seed": seed}


def gelu(x: Any, xp: Any) -> Any:
    """GELU, tanh form (the same function on every backend)."""
    return 0.5 * x * (1 + xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@dataclass
class Trained:
    """A trained model as NumPy-facing functions."""

    logits: Callable[[np.ndarray], np.ndarray]
    coefficients: Callable[[np.ndarray], np.ndarray] | None
    n_params: int
    seconds: float
    # writes an MMoE hidden layer to the path with tensormoe.io; returns the other arrays
    export: Callable[[str], dict[str, np.ndarray]] | None = None


def batches(n: int, batch: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for start in range(0, n, batch):
        yield order[start : start + batch]


def progress(epochs: int, label: str, quiet: bool):
    from tqdm.auto import trange

    return trange(epochs, desc=label, unit="epoch", leave=False, disable=True if quiet else None)


# --- PyTorch ------------------------------------------------------------------------------


def train_torch(kind: str, data: Data, config: dict[str, Any], args: argparse.Namespace) -> Trained:
    import torch

    import tensormoe.torch as tmt

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if kind == "mmoe":
        hidden = tmt.wrap(tensormoe.layers.layer_from_config(config))
    else:
        hidden = torch.nn.Linear(data.x_train.shape[1], HIDDEN)
    head = torch.nn.Linear(HIDDEN, CLASSES)
    model = torch.nn.ModuleDict({"hidden": hidden, "head": head})

    def forward(x: torch.Tensor) -> torch.Tensor:
        return head(gelu(hidden(x), torch))

    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    bar = progress(args.epochs, f"pytorch {kind}", args.quiet)
    for _ in bar:
        for idx in batches(len(x), args.batch, rng):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(forward(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start

    def logits(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return forward(torch.from_numpy(a)).numpy()

    def coefficients(a: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return hidden.coefficients(torch.from_numpy(a))[0].numpy()

    def export(path: str) -> dict[str, np.ndarray]:
        arrays = {"w": head.weight.detach().numpy().copy(), "b": head.bias.detach().numpy().copy()}
        if kind == "mmoe":
            io.save(hidden, path)
        else:
            arrays.update(hidden_w=hidden.weight.detach().numpy().copy(), hidden_b=hidden.bias.detach().numpy().copy())
        return arrays

    n_params = sum(p.numel() for p in model.parameters())
    return Trained(logits, coefficients if kind == "mmoe" else None, n_params, seconds, export)


# --- JAX ----------------------------------------------------------------------------------


def train_jax(kind: str, data: Data, config: dict[str, Any], args: argparse.Namespace) -> Trained:
    import jax
    import jax.numpy as jnp

    import tensormoe.jax as tmj

    rng = np.random.default_rng(args.seed)

    def dense(n_in: int, n_out: int) -> dict[str, Any]:  # PyTorch's default Linear init
        bound = 1 / math.sqrt(n_in)
        return {"w": jnp.asarray(rng.uniform(-bound, bound, (n_out, n_in)), jnp.float32),
                "b": jnp.asarray(rng.uniform(-bound, bound, n_out), jnp.float32)}

    if kind == "mmoe":
        hidden: Any = tmj.wrap(tensormoe.layers.layer_from_config(config))
    else:
        hidden = dense(data.x_train.shape[1], HIDDEN)
    model = {"hidden": hidden, "head": dense(HIDDEN, CLASSES)}

    def forward(model: dict[str, Any], x: Any) -> Any:
        h = model["hidden"]
        h = h(x) if kind == "mmoe" else x @ h["w"].T + h["b"]
        return gelu(h, jnp) @ model["head"]["w"].T + model["head"]["b"]

    def loss_fn(model: dict[str, Any], x: Any, y: Any) -> Any:
        logp = jax.nn.log_softmax(forward(model, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    b1, b2, eps = 0.9, 0.999, 1e-8

    @jax.jit
    def step(model, m, v, t, x, y):  # Adam, as torch.optim.Adam computes it
        loss, grads = jax.value_and_grad(loss_fn)(model, x, y)
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
        scale = args.lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        model = jax.tree_util.tree_map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + eps * jnp.sqrt(1 - b2**t)),
                                       model, m, v)
        return model, m, v, loss

    m = jax.tree_util.tree_map(jnp.zeros_like, model)
    v = jax.tree_util.tree_map(jnp.zeros_like, model)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    n_full = len(data.x_train) // args.batch * args.batch  # full batches only: one compiled shape
    t = 0
    start = time.perf_counter()
    bar = progress(args.epochs, f"jax {kind}", args.quiet)
    for _ in bar:
        for idx in batches(n_full, args.batch, rng):
            t += 1
            model, m, v, loss = step(model, m, v, t, x[idx], y[idx])
        bar.set_postfix(loss=f"{float(loss):.3f}")
    seconds = time.perf_counter() - start
    predict = jax.jit(forward)

    def logits(a: np.ndarray) -> np.ndarray:
        return np.asarray(predict(model, jnp.asarray(a)))

    def coefficients(a: np.ndarray) -> np.ndarray:
        return np.asarray(model["hidden"].coefficients(jnp.asarray(a))[0])

    def export(path: str) -> dict[str, np.ndarray]:
        arrays = {k: np.asarray(val) for k, val in model["head"].items()}
        if kind == "mmoe":
            io.save(model["hidden"], path)
        else:
            arrays.update({f"hidden_{k}": np.asarray(val) for k, val in model["hidden"].items()})
        return arrays

    n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(model))
    return Trained(logits, coefficients if kind == "mmoe" else None, n_params, seconds, export)


# --- NumPy: serve a model trained with autodiff -------------------------------------------


def serve_numpy(kind: str, data: Data, config: dict[str, Any], args: argparse.Namespace) -> Trained:
    """Train with an autodiff backend, then evaluate in NumPy from the exported weights."""
    trainer = train_torch if "pytorch" in tensormoe.available_backends() else train_jax
    trained = trainer(kind, data, config, args)
    path = os.path.join(args.save or tempfile.mkdtemp(prefix="tensormoe-digits-"), "hidden.npz")
    arrays = trained.export(path)
    if kind == "mmoe":
        layer = io.layer_from_file(path, backend="numpy")  # the NumPy layer, from the file alone

        def hidden(a: np.ndarray) -> np.ndarray:
            with tensormoe.backend_context("numpy"):
                return layer(a)

        def coefficients(a: np.ndarray) -> np.ndarray | None:
            with tensormoe.backend_context("numpy"):
                return layer.coefficients(None, a)[0]
    else:

        def hidden(a: np.ndarray) -> np.ndarray:
            return a @ arrays["hidden_w"].T + arrays["hidden_b"]

        coefficients = None  # type: ignore[assignment]

    def logits(a: np.ndarray) -> np.ndarray:
        return gelu(hidden(a), np) @ arrays["w"].T + arrays["b"]

    gap = float(np.abs(logits(data.x_test) - trained.logits(data.x_test)).max())
    if not args.quiet:
        source = f"from {path}" if kind == "mmoe" else "from its arrays"
        print(f"{kind} served in NumPy {source}: max |logit difference| vs the trainer = {gap:.2e}")
    return Trained(logits, coefficients, trained.n_params, trained.seconds)


TRAINERS = {"pytorch": train_torch, "jax": train_jax, "numpy": serve_numpy}


# --- expert specialisation ----------------------------------------------------------------


def class_mass(coefficients: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``M[c, n]``, the share of expert ``n``'s coefficient mass that goes to class ``c``, and which experts are used.

    An expert is unused when sparse gating gives it no mass on any test image;
    its column of ``M`` is zero.
    """
    mass = np.stack([coefficients[labels == c].sum(0) for c in range(CLASSES)])
    total = mass.sum(0)
    used = total > 1e-6 * total.sum()
    return mass / np.where(used, total, 1.0), used


def specialisation(mass: np.ndarray, used: np.ndarray) -> float:
    """Mean over used experts of the largest class share: 0.1 for none (uniform), 1 for one class per expert."""
    return float(mass[:, used].max(0).mean())


def plot_specialisation(mass: np.ndarray, used: np.ndarray, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # used experts grouped by their main class (strongest first), unused ones last
    order = np.lexsort((-mass.max(0), mass.argmax(0), ~used))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * mass.shape[1] + 2), 4))
    image = ax.imshow(mass[:, order], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(mass.shape[1]), [str(n) if used[n] else f"({n})" for n in order], fontsize=6, rotation=90)
    ax.set_yticks(range(CLASSES))
    ax.set_xlabel(f"expert, grouped by main class ({int((~used).sum())} unused, in parentheses)")
    ax.set_ylabel("digit class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of the expert's coefficient mass")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------


EXAMPLES = """\
examples:
  python examples/train_digits.py                          # the TENSORMOE_BACKEND flag's backend (NumPy by default)
  python examples/train_digits.py --backend jax --plot experts.png
  python examples/train_digits.py --backend pytorch --kind tr --repeats 3
  python examples/train_digits.py --quick                  # 3 epochs: a few seconds

outputs: the results go to standard output; the expert-specialisation PNG to --plot
(default examples/results/train_digits_experts.png, its folder is created); with
--backend numpy the trained MMoE's weights to --save/hidden.npz (default: a new
temporary folder, printed); progress bars (one step per epoch) to standard error
when it is a terminal, unless --quiet.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0; got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default=None, choices=sorted(TRAINERS),
                   help="numpy, pytorch or jax (default: the TENSORMOE_BACKEND flag, numpy when unset)")
    p.add_argument("--kind", default="cp", choices=KINDS,
                   help="factorization of the MMoE: cp, tucker, tt or tr, at the largest ranks that fit the "
                        "linear layer's parameters (default cp)")
    p.add_argument("--experts", type=_positive_int, default=32, help="experts in the MMoE hidden layer (default 32)")
    p.add_argument("--epochs", type=_positive_int, default=40, help="training epochs (default 40)")
    p.add_argument("--batch", type=_positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=_positive_float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the batches (default 0)")
    p.add_argument("--repeats", type=_positive_int, default=1, help="runs with seeds seed, seed+1, ... (default 1)")
    p.add_argument("--plot", default=DEFAULT_PLOT, metavar="FILE.png",
                   help="PNG of expert specialisation (default examples/results/train_digits_experts.png)")
    p.add_argument("--save", default=None, metavar="FOLDER",
                   help="folder for the NumPy backend's weights file hidden.npz (default: a new temporary folder)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="PyTorch CPU threads (default 1: this model is too small to gain from more)")
    p.add_argument("--gate-rank", type=_positive_int, default=None,
                   help="low-rank gate of this rank (gate_rank=); the ranks stay those matched with "
                        "full gates, so the MMoE has fewer parameters (default: full gate)")
    p.add_argument("--quick", action="store_true", help="3 epochs: a smoke run of a few seconds")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, train and evaluate both models, and return the results."""
    parse = parser()
    args = parse.parse_args(argv)
    if args.quick:
        args.epochs = 3
    backend = args.backend or tensormoe.get_backend()
    if backend not in tensormoe.available_backends():
        parse.error(f"argument --backend: {backend!r} is not installed here "
                    f"(installed: {', '.join(tensormoe.available_backends())})")
    if not {"pytorch", "jax"} & set(tensormoe.available_backends()):
        parse.error("training needs PyTorch or JAX: pip install -e '.[all,examples]'")
    if args.save is not None and not os.path.isdir(args.save):
        parse.error(f"argument --save: {args.save!r} is not a folder")
    with tensormoe.backend_context(backend) as backend:
        return run(backend, args)


def run(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train both models on ``backend`` for each seed; print and return their results."""
    if backend == "numpy" and args.save is None:
        args.save = tempfile.mkdtemp(prefix="tensormoe-digits-")  # one folder for all seeds
    runs: dict[str, list[dict[str, float]]] = {"mmoe": [], "linear": []}
    results: dict[str, Any] = {"backend": backend, "plot": args.plot}
    for repeat in range(args.repeats):
        seed = args.seed + repeat
        data = load_data(seed)
        budget = data.x_train.shape[1] * HIDDEN + HIDDEN  # the linear hidden layer's parameters
        config = mmoe_config(data.x_train.shape[1], HIDDEN, args.experts, seed, getattr(args, "kind", "cp"))
        ranks = config.get("rank", config.get("ranks"))
        name = f"{CLASS_NAMES[getattr(args, 'kind', 'cp')][:-4]} MMoE"
        ranks_text = f"rank {ranks}" if isinstance(ranks, int) else f"ranks {ranks}"
        if getattr(args, "gate_rank", None) is not None:
            config["gate_rank"] = args.gate_rank
        for kind in ("mmoe", "linear"):
            trained = TRAINERS[backend](kind, data, config, argparse.Namespace(**{**vars(args), "seed": seed}))
            row = {"accuracy": float((trained.logits(data.x_test).argmax(1) == data.y_test).mean()),
                   "params": trained.n_params, "seconds": trained.seconds}
            if trained.coefficients is not None:
                mass, used = class_mass(trained.coefficients(data.x_test), data.y_test)
                row.update(specialisation=specialisation(mass, used), used=int(used.sum()))
                if repeat == 0:
                    title = (f"{args.experts}-expert {name} ({ranks_text}) on digits, {backend}, "
                             f"seed {seed}: test accuracy {row['accuracy']:.3f}")
                    plot_specialisation(mass, used, args.plot, title)
            runs[kind].append(row)
    for kind, rows in runs.items():
        results[kind] = {key: [r[key] for r in rows] for key in rows[0]}
    results.update(budget=budget, rank=ranks, kind=getattr(args, "kind", "cp"))

    if not args.quiet:
        def mean(values: list[float], digits: int = 4) -> str:
            text = f"{np.mean(values):.{digits}f}"
            return text + (f" +- {np.std(values):.{digits}f}" if len(values) > 1 else "")

        hidden_mmoe = results["mmoe"]["params"][0] - (HIDDEN * CLASSES + CLASSES)
        print(f"backend {backend}, {args.epochs} epochs, {len(data.x_train)} train / {len(data.x_test)} test "
              f"images, {args.repeats} seed(s) from {args.seed}")
        print(f"{'hidden layer':<48}{'params (hidden)':>16}{'params (all)':>14}{'test accuracy':>22}{'train s':>9}")
        gate = "" if config.get("gate_rank") is None else f", gate rank {config['gate_rank']}"
        rows = [(f"{name}, {args.experts} experts, {ranks_text}{gate}", hidden_mmoe, results["mmoe"]),
                ("linear 64 -> 64", budget, results["linear"])]
        for name, hidden_params, r in rows:
            print(f"{name:<48}{hidden_params:>16}{r['params'][0]:>14}{mean(r['accuracy']):>22}"
                  f"{np.mean(r['seconds']):>9.1f}")
        print(f"experts used: {mean(results['mmoe']['used'], 1)} of {args.experts}; specialisation (mean over "
              f"used experts of the top class's share; 0.1 = none, 1 = one class each): "
              f"{mean(results['mmoe']['specialisation'], 3)}")
        print(f"plot (seed {args.seed}): {args.plot}")
    return results


if __name__ == "__main__":
    main()
