"""Measure CP, Tucker, TT and TR side by side at the ranks that fit one parameter budget.

For each factorization: the largest ranks whose layer (gates included) fits the
budget (``tensormoe.match_rank``), its parameters and planned FLOPs, and the
median time of a forward pass next to a linear layer of the same in/out size
(``x @ W + b``).  All layers and the linear layer are called in turn, round robin,
so that a slow spell of a shared machine slows every candidate alike.  The table
is Markdown, ready for the docs' "Choosing a factorization and rank" page.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import numpy as np

import tensormoe
from tensormoe.ops import get_ops
from tensormoe.ranks import KINDS, match_rank

EXAMPLES = """\
examples:
  python examples/choose_factorization.py                            # 768 -> 768, 64 experts, a linear layer's budget
  TENSORMOE_BACKEND=pytorch python examples/choose_factorization.py
  python examples/choose_factorization.py --experts 32 32 --budget 2000000 --kinds cp,tr

outputs: the table (Markdown) goes to standard output; nothing is written.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def _budget(text: str) -> int | str:
    if text == "linear":
        return text
    return _positive_int(text)


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if not kinds or set(kinds) - set(KINDS):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(KINDS)}; got {text!r}")
    return kinds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--in", dest="in_dim", type=_positive_int, default=768, help="input features I (default 768)")
    p.add_argument("--out", dest="out_dim", type=_positive_int, default=768, help="output features O (default 768)")
    p.add_argument("--experts", type=_positive_int, nargs="+", default=[64], help="experts per level (default 64)")
    p.add_argument("--budget", type=_budget, default="linear",
                   help="parameters of each layer: 'linear' (an I x O linear layer's, the default) or a number")
    p.add_argument("--batch", type=_positive_int, default=64, help="batch size (default 64)")
    p.add_argument("--repeats", type=_positive_int, default=30,
                   help="timed rounds; each round calls every layer once (default 30)")
    p.add_argument("--kinds", type=_kinds, default=list(KINDS), help="factorizations to compare (default cp,tucker,tt,tr)")
    return p


def _wait(y: Any) -> Any:
    if hasattr(y, "block_until_ready"):
        y.block_until_ready()
    return y


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Match, build and time each factorization on the current backend; print the table and return its rows."""
    parse = parser()
    args = parse.parse_args(argv)
    ops = get_ops()
    rng = np.random.default_rng(0)
    x = ops.asarray(rng.normal(size=(args.batch, args.in_dim)), "float32")
    weight = ops.asarray(rng.normal(size=(args.in_dim, args.out_dim)) / np.sqrt(args.in_dim), "float32")
    bias = ops.asarray(np.zeros(args.out_dim), "float32")
    calls, rows = {"linear": lambda: x @ weight + bias}, []
    for kind in args.kinds:
        try:
            match = match_rank(kind, args.in_dim, args.out_dim, args.experts, args.budget)
        except ValueError as err:
            parse.error(f"argument --budget: {err}")
        layer = match.layer(seed=0)
        params = dict(layer.params)
        for h, n in enumerate(layer.expert_dims):  # random gates: every input its own mixture of experts
            params[f"gate_{h}"] = ops.asarray(rng.normal(size=(args.in_dim, n)) / np.sqrt(args.in_dim), "float32")
        calls[kind] = lambda layer=layer, params=params: layer.apply(params, x)
        rows.append({"kind": kind, "ranks": match.ranks, "params": layer.n_params,
                     "flops": layer.cost(args.batch).flops / args.batch})
    for call in calls.values():  # plans and compiles outside the timed rounds
        _wait(call())
        _wait(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            _wait(call())
            times[name].append(time.perf_counter() - start)
    linear_s = statistics.median(times["linear"])
    linear_params = (args.in_dim + 1) * args.out_dim
    print(f"backend {tensormoe.get_backend()}, MMoE {args.in_dim} -> {args.out_dim}, experts {args.experts}, "
          f"budget {args.budget}, batch {args.batch}; median of {args.repeats} round-robin calls; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| factorization | ranks | parameters | x linear | FLOPs / row | forward ms | x linear time |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        row["ms"] = statistics.median(times[row["kind"]]) * 1e3
        row["x_linear"] = row["ms"] / (linear_s * 1e3)
        print(f"| {row['kind']} | {row['ranks']} | {row['params']:,} | {row['params'] / linear_params:.2f} "
              f"| {row['flops']:,.0f} | {row['ms']:.2f} | {row['x_linear']:.1f} |")
    print(f"| linear | - | {linear_params:,} | 1.00 | {2 * args.in_dim * args.out_dim:,} | {linear_s * 1e3:.2f} | 1.0 |")
    return rows


if __name__ == "__main__":
    main()
