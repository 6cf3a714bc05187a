"""The ``tensormoe`` command line: ``tensormoe ranks ...`` explores factorization ranks.

``tensormoe ranks --in 768 --out 768 --experts 64 --budget linear`` prints, for
each factorization, the ranks that fit the budget (:mod:`tensormoe.tools.ranks`) and
what they cost (:mod:`tensormoe.layers.accounting`): parameters and forward FLOPs next
to a linear layer's and a dense MMoE layer's, and the largest intermediate.

``--sweep`` measures the relative reconstruction error of a tensor against rank
(:func:`tensormoe.tools.compress.from_dense`): a tensor from ``--tensor FILE.npy``
(shape ``[N_1, ..., N_H, I(+1), O]``) or a synthetic CP tensor of rank
``--synthetic R`` plus ``--noise`` relative Gaussian noise.  ``--plot FILE.png``
draws parameters, FLOPs (and the error) against rank with matplotlib.  While
the sweep and the plot run, tqdm progress bars show on stderr when it is a
terminal (``--quiet`` turns them off).

Runs on NumPy only: the command imports neither PyTorch nor JAX.  Bad arguments
get a one-line message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._version import __version__
from ..backend import backend_context
from ..layers import accounting
from ..network.contraction import check_optimizer
from .compress import from_dense
from .ranks import match_rank, minimum_params, resolve_budget

__all__ = ["main"]

_KINDS = ("cp", "tucker", "tt", "tr")


class _UsageError(Exception):
    """A bad argument: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own errors, in one line
        raise _UsageError(f"{message} (see {self.prog} --help)")


# -- argument types -----------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def _budget(text: str) -> int | float | str:
    if text.strip().lower() == "linear":
        return "linear"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'linear', a number of parameters, or a fraction in (0, 1] of the dense tensor; got {text!r}"
        ) from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"a decimal budget is a fraction of the dense tensor and must lie in (0, 1]; got {text!r} "
            "(give an integer for a number of parameters)"
        )
    return value


def _kinds(text: str) -> list[str]:
    kinds = [k.strip().lower() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in _KINDS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(_KINDS)}; got {text!r}")
    return kinds


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers; got {text!r}")
    return sorted(set(values))


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0; got {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number >= 0; got {text!r}")
    return value


_MAIN_EXAMPLES = """\
examples:
  tensormoe ranks --in 768 --out 768 --experts 64          # ranks that fit a 768 x 768 linear layer's parameters
  tensormoe ranks --help                                   # every option of the rank explorer
  python -m tensormoe ranks ...                            # the same, without the console script
"""

_RANKS_EXAMPLES = """\
examples:
  tensormoe ranks --in 768 --out 768 --experts 64 --budget linear
  tensormoe ranks --in 768 --out 768 --experts 32 32 --kinds cp,tr --optimize dp
  tensormoe ranks --in 768 --out 1000 --experts 64 --budget 2000000 --bond-rank 4
  tensormoe ranks --in 64 --out 64 --experts 16 --synthetic 8 --noise 0.05 --plot sweep.png
  tensormoe ranks --tensor W.npy --sweep-ranks 1,2,4,8 --kinds cp,tucker

outputs: the table (and the sweep's table) go to standard output; --plot writes one PNG to
the path given, and nothing else is written.  Progress bars (the sweep's decompositions,
the plot's cost grid) go to standard error when it is a terminal; --quiet turns them off.
Bad arguments: one line on standard error, exit status 2.
"""


def _parser() -> _Parser:
    parser = _Parser(
        prog="tensormoe", description="Tools of tensormoe, the multilinear mixture-of-experts library.",
        epilog=_MAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND", help="the tool to run")
    ranks = commands.add_parser(
        "ranks",
        help="ranks that fit a parameter budget, what they cost, and reconstruction error against rank",
        description=(
            "For each factorization: the largest ranks whose layer fits the budget, its parameters and planned "
            "forward FLOPs next to a linear layer's and a dense MMoE layer's. Optionally a reconstruction-error "
            "sweep over ranks and a plot."
        ),
        epilog=_RANKS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ranks.add_argument("--in", dest="in_dim", type=_positive_int, help="input features I")
    ranks.add_argument("--out", dest="out_dim", type=_positive_int, help="output features O")
    ranks.add_argument(
        "--experts", type=_positive_int, nargs="+", metavar="N", help="experts per level, e.g. --experts 64 or 32 32"
    )
    ranks.add_argument(
        "--budget", type=_budget, default="linear",
        help="'linear' (default: an I x O linear layer with bias), a number of parameters, or a fraction in (0, 1] "
        "of the dense tensor W",
    )
    ranks.add_argument("--batch", type=_positive_int, default=64, help="batch size the FLOPs are planned for (64)")
    ranks.add_argument("--no-bias", action="store_true", help="layers without bias (the input mode has I rows)")
    ranks.add_argument("--no-gates", action="store_true", help="do not charge the gates' I x N_h parameters")
    ranks.add_argument(
        "--bond-rank", type=_positive_int, help="TT/TR: fix every bond but the input-output one at this rank"
    )
    ranks.add_argument(
        "--optimize", default="auto",
        help="opt_einsum path optimizer the FLOPs are planned with (auto, the layers' default; dp, optimal, ...)",
    )
    ranks.add_argument("--kinds", type=_kinds, default=list(_KINDS), help="factorizations to show (cp,tucker,tt,tr)")
    ranks.add_argument("--sweep", action="store_true", help="measure the reconstruction error against rank")
    source = ranks.add_mutually_exclusive_group()
    source.add_argument("--tensor", metavar="FILE.npy", help="the tensor W[N..., I(+1), O] to sweep")
    source.add_argument(
        "--synthetic", type=_positive_int, metavar="R", help="sweep a synthetic CP tensor of rank R plus noise"
    )
    ranks.add_argument("--noise", type=_fraction, default=0.1, help="relative noise of --synthetic (0.1)")
    ranks.add_argument(
        "--sweep-ranks", type=_int_list, metavar="R1,R2,...",
        help="family ranks r to sweep (default: up to 6, from 1 to twice the matched r)",
    )
    ranks.add_argument("--n-iter", type=_positive_int, default=50, help="iterations of CP ALS / Tucker HOOI (50)")
    ranks.add_argument(
        "--max-entries", type=_positive_int, default=20_000_000, help="largest tensor the sweep accepts (2e7)"
    )
    ranks.add_argument("--seed", type=int, default=0, help="seed of the synthetic tensor and decompositions (0)")
    ranks.add_argument(
        "--plot", metavar="FILE.png",
        help="write a PNG (its folder must exist) of parameters and FLOPs against rank, and with a sweep the error "
        "against rank and against parameters",
    )
    ranks.add_argument("--quiet", action="store_true", help="no progress bars on standard error")
    return parser


# -- progress -----------------------------------------------------------------------
def _progress(total: int, desc: str, quiet: bool) -> Any:
    """A tqdm bar on stderr (only when stderr is a terminal), or a silent stand-in without tqdm or with --quiet."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the examples extra; the table needs none of it
        tqdm = None
    if tqdm is None or quiet:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=None)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


# -- formatting -----------------------------------------------------------------------
def _ratio(x: float) -> str:
    return f"{x:.3f}" if x >= 0.01 else f"{x:.2e}"


def _ranks_text(ranks: Any) -> str:
    return f"R={ranks}" if isinstance(ranks, int) else "[" + ", ".join(map(str, ranks)) + "]"


def _table(rows: list[list[str]], right: Sequence[bool]) -> str:
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------
def _load_tensor(args: argparse.Namespace) -> np.ndarray | None:
    if args.tensor is None:
        return None
    try:
        tensor = np.load(args.tensor, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise _UsageError(f"--tensor {args.tensor!r} could not be read as a .npy array: {err}") from None
    if tensor.ndim < 3:
        raise _UsageError(f"--tensor must hold W[N_1, ..., N_H, I(+1), O] (3 or more axes); got shape {tensor.shape}")
    return tensor


def _dims(args: argparse.Namespace, tensor: np.ndarray | None) -> tuple[int, int, list[int]]:
    bias = not args.no_bias
    if tensor is not None:
        found = (tensor.shape[-2] - int(bias), tensor.shape[-1], list(tensor.shape[:-2]))
        given = (args.in_dim, args.out_dim, args.experts)
        for name, have, want in zip(("--in", "--out", "--experts"), found, given):
            if want is not None and want != have:
                raise _UsageError(f"{name} {want} does not match --tensor of shape {tensor.shape} (which gives {have})")
        if found[0] < 1:
            raise _UsageError(f"--tensor of shape {tensor.shape} leaves no input features (use --no-bias?)")
        return found
    given = (("--in", args.in_dim), ("--out", args.out_dim), ("--experts", args.experts))
    missing = [flag for flag, value in given if value is None]
    if missing:
        raise _UsageError(f"missing {', '.join(missing)} (or give --tensor FILE.npy)")
    return args.in_dim, args.out_dim, list(args.experts)


def _synthetic(dims: Sequence[int], rank: int, noise: float, seed: int) -> np.ndarray:
    """A CP tensor of rank ``rank`` with Gaussian factors, plus ``noise`` times its norm of Gaussian noise."""
    import tensorly as tl  # TensorLy loads only for a synthetic tensor

    rng = np.random.default_rng(seed)
    factors = [rng.normal(size=(d, rank)) for d in dims]
    with backend_context("numpy"):
        signal = tl.cp_to_tensor((None, factors))
    perturbation = rng.normal(size=signal.shape)
    perturbation *= noise * np.linalg.norm(signal) / np.linalg.norm(perturbation)
    return signal + perturbation


def _default_sweep(rank: int) -> list[int]:
    """Up to six ranks from 1 to twice the matched ``rank``, roughly evenly spaced on a log scale."""
    values = {max(1, round((2 * rank) ** (k / 5))) for k in range(6)}
    return sorted(values)


def _ranks_command(args: argparse.Namespace, out: Any) -> int:
    if args.sweep and args.tensor is None and args.synthetic is None:
        raise _UsageError("--sweep needs a tensor: --tensor FILE.npy or --synthetic R")
    if (args.tensor is not None or args.synthetic is not None) and not args.sweep:
        args.sweep = True
    tensor = _load_tensor(args)
    in_dim, out_dim, experts = _dims(args, tensor)
    args.in_dim_resolved, args.out_dim_resolved, args.experts_resolved = in_dim, out_dim, experts
    bias, gates = not args.no_bias, not args.no_gates
    dims = (*experts, in_dim + int(bias), out_dim)
    dense_entries = math.prod(dims)
    budget = resolve_budget(args.budget, in_dim, out_dim, experts, bias=bias)
    batch = args.batch
    check_optimizer(args.optimize)
    if args.sweep and dense_entries > args.max_entries:
        raise _UsageError(
            f"the sweep's tensor would have {dense_entries:,} entries (> --max-entries {args.max_entries:,}); "
            "use smaller --in/--out/--experts or raise --max-entries"
        )
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise _UsageError(f"--plot {args.plot!r}: its folder does not exist")

    linear = accounting.linear_params(in_dim, out_dim, bias)
    gate_count = accounting.gate_params(in_dim, experts)
    budget_text = (
        f"linear = {budget:,} parameters ({in_dim} x {out_dim} linear layer{' with bias' if bias else ''})"
        if args.budget == "linear"
        else f"{budget:,} parameters" + (f" ({args.budget:g} of W)" if isinstance(args.budget, float) else "")
    )
    print(
        f"MMoE {in_dim} -> {out_dim}, experts {experts}{', bias' if bias else ''}: "
        f"dense W{list(dims)} = {dense_entries:,} weights",
        file=out,
    )
    print(
        f"budget: {budget_text}; gates ({gate_count:,}) "
        + ("counted" if gates else "not counted (--no-gates)"),
        file=out,
    )
    print(
        f"FLOPs per row of opt_einsum's plan (optimize={args.optimize!r}) for batch {batch} "
        "(multiply-add = 2), gates' x @ G included; "
        "x dense = against a dense MMoE layer",
        file=out,
    )
    header = ["kind", "ranks", "params", "x linear", "x dense", "FLOPs/row", "x linear", "x dense", "peak elems"]
    rows, right = [header], [False, False] + [True] * 7
    matches = {}
    for kind in args.kinds:
        try:
            match = match_rank(
                kind, in_dim, out_dim, experts, budget, bias=bias, count_gates=gates,
                bond_rank=args.bond_rank if kind in ("tt", "tr") else None,
            )
        except ValueError:  # the budget is below this family's smallest layer
            minimum = minimum_params(
                kind, in_dim, out_dim, experts, bias=bias, count_gates=gates,
                bond_rank=args.bond_rank if kind in ("tt", "tr") else None,
            )
            rows.append([kind, "-", f"needs >= {minimum:,}", *["-"] * 6])
            continue
        matches[kind] = match
        c = match.cost(batch, optimize=args.optimize)
        rows.append([
            kind, _ranks_text(match.ranks), f"{c.params:,}", _ratio(c.params_vs_linear), _ratio(c.params_vs_dense),
            f"{c.flops / batch:,.0f}", _ratio(c.flops_vs_linear), _ratio(c.flops_vs_dense), f"{c.peak_intermediate:,}",
        ])
    linear_flops = accounting.linear_flops(in_dim, out_dim, batch, bias)
    rows.append(["linear", "-", f"{linear:,}", "1.000", "-", f"{linear_flops / batch:,.0f}", "1.000", "-", "-"])
    print(_table(rows, right), file=out)

    sweep: dict[str, list[tuple[int, Any, int, float, str, float]]] = {}
    if args.sweep:
        if tensor is None:
            tensor = _synthetic(dims, args.synthetic, args.noise, args.seed)
            what = f"synthetic CP rank {args.synthetic} + {args.noise:g} relative noise"
        else:
            what = args.tensor
        args.sweep_what = what
        print(f"\nreconstruction error of {what} (shape {list(tensor.shape)}):", file=out)
        sweep = _sweep(tensor, matches, args, bias)
        rows = [["kind", "ranks", "params", "rel. error", "method", "seconds"]]
        for kind, points in sweep.items():
            for r, ranks, params, error, method, seconds in points:
                rows.append([kind, _ranks_text(ranks), f"{params:,}", f"{error:.4f}", method, f"{seconds:.2f}"])
        print(_table(rows, [False, False, True, True, False, True]), file=out)
    if args.plot:
        _plot(args.plot, matches, sweep, args, linear, linear_flops / batch, budget)
        print(f"\nplot written to {args.plot}", file=out)
    return 0


def _sweep(tensor: np.ndarray, matches: dict, args: argparse.Namespace, bias: bool) -> dict:
    results: dict[str, list] = {}
    todo = {kind: args.sweep_ranks or _default_sweep(match.rank) for kind, match in matches.items()}
    bar = _progress(sum(map(len, todo.values())), "decompositions", args.quiet)
    for kind, match in matches.items():
        points = []
        for r in todo[kind]:
            ranks = match.ranks_at(r)
            bar.set_postfix_str(f"{kind} {_ranks_text(ranks)}")
            start = time.perf_counter()
            try:
                with backend_context("numpy"):
                    done = from_dense(
                        tensor, kind=kind, ranks=ranks, bias=bias, n_iter_max=args.n_iter, seed=args.seed,
                        dtype="float64",
                    )
            except ValueError as err:  # e.g. a CP rank ALS cannot solve for: report it and go on
                print(f"tensormoe: {kind} at ranks {ranks} skipped: {err}", file=sys.stderr)
                bar.update()
                continue
            seconds = time.perf_counter() - start
            bar.update()
            params = done.layer.n_params if match.count_gates else done.layer.factorization.n_params()
            short = done.method.split(" ")[0].rsplit(".", 1)[-1]
            points.append((r, ranks, params, done.relative_error, short, seconds))
        results[kind] = points
    bar.close()
    return results


def _plot(path: str, matches: dict, sweep: dict, args: argparse.Namespace, linear: int, linear_flops: float,
          budget: int) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        raise _UsageError("--plot needs matplotlib: pip install 'tensormoe[examples]'") from None
    panels = 4 if sweep else 2
    fig = Figure(figsize=(4.2 * panels, 4.3))
    fig.subplots_adjust(left=0.34 / panels, right=0.99, bottom=0.13, top=0.82, wspace=0.32)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    grids = {}
    for kind, match in matches.items():
        top = max([2 * match.rank, *(args.sweep_ranks or [])])
        grids[kind] = sorted({max(1, round(top ** (k / 24))) for k in range(25)})
    bar = _progress(sum(map(len, grids.values())), "plot: costs against rank", args.quiet)
    for kind, match in matches.items():
        grid, costs = grids[kind], []
        bar.set_postfix_str(kind)
        for r in grid:  # each point plans the layer's contraction: a second or so per factorization
            costs.append(dataclasses.replace(match, ranks=match.ranks_at(r), rank=r).cost(args.batch, optimize=args.optimize))
            bar.update()
        axes[0].plot(grid, [c.params for c in costs], label=kind)
        axes[1].plot(grid, [c.flops / args.batch for c in costs], label=kind)
        axes[0].plot([match.rank], [match.params], "o", color=axes[0].lines[-1].get_color())
        if kind in sweep:
            points = sweep[kind]
            axes[2].plot([p[0] for p in points], [p[3] for p in points], "o-", label=kind)
            axes[3].plot([p[2] for p in points], [p[3] for p in points], "o-", label=kind)
    bar.close()
    axes[0].plot([], [], "o", color="0.35", label="matched ranks")
    axes[0].axhline(budget, color="0.4", ls="--", lw=1, label="budget")
    axes[0].axhline(linear, color="0.1", ls=":", lw=1, label="linear layer")
    axes[1].axhline(linear_flops, color="0.1", ls=":", lw=1, label="linear layer")
    panel = [
        ("parameters against rank", "rank r of the family", "parameters (count)", True),
        (f"forward FLOPs against rank (batch {args.batch})", "rank r of the family",
         "FLOPs per input row (multiply-add = 2)", True),
        ("reconstruction error against rank", "rank r of the family", "relative error ||W - W_r|| / ||W||", False),
        ("reconstruction error against parameters", "parameters (count)", "relative error ||W - W_r|| / ||W||", False),
    ]
    for ax, (title, xlabel, ylabel, counts) in zip(axes, panel):
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis, is_count, limits in (
            (ax.xaxis, xlabel.startswith("parameters"), ax.get_xlim()),
            (ax.yaxis, counts, ax.get_ylim()),
        ):
            decades = math.log10(max(limits) / max(min(limits), 1e-300))
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)))
            axis.set_major_formatter(EngFormatter(sep="") if is_count else FuncFormatter(_tick))
            axis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    in_dim, out_dim = args.in_dim_resolved, args.out_dim_resolved
    fig.suptitle(
        f"Ranks of an MMoE layer {in_dim} -> {out_dim} with experts {args.experts_resolved}"
        f"{' and bias' if not args.no_bias else ''}: budget {budget:,} parameters"
        + (f", swept tensor: {args.sweep_what}" if sweep else ""),
        fontsize=11,
    )
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise _UsageError(f"--plot {path!r} could not be written: {err}") from None


def _tick(value: float, _position: Any) -> str:
    return f"{value:g}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tensormoe`` command line; return its exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 2 on bad arguments (reported in one line on stderr).

    Examples
    --------
    >>> main(["ranks", "--in", "16", "--out", "8", "--experts", "4", "--kinds", "cp"])  # doctest: +ELLIPSIS
    MMoE 16 -> 8, experts [4], bias: dense W[4, 17, 8] = 544 weights
    budget: linear = 136 parameters (16 x 8 linear layer with bias); gates (64) counted
    FLOPs per row of opt_einsum's plan (optimize='auto') for batch 64 ...
    kind    ranks  params  x linear  x dense  FLOPs/row  x linear  x dense  peak elems
    cp      R=2       122     0.897    0.201        246     0.904    0.192         512
    linear  -         136     1.000        -        272     1.000        -           -
    0
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.version:
            print(f"tensormoe {__version__}")
            return 0
        if args.command is None:
            raise _UsageError("a command is required: ranks (see tensormoe --help)")
        # the table needs no backend (and so no TensorLy import); the sweep runs on NumPy
        return _ranks_command(args, sys.stdout)
    except _UsageError as err:
        print(f"tensormoe: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as err:  # the library's checks of bad input
        print(f"tensormoe: error: {err}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
