"""The report of a run: the tables (plain or Markdown), the targets' summary, the run's metadata and the plot."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

import tensormoe
from config import (TARGET_BACKWARD, TARGET_FORWARD, TARGET_GATE, TARGET_LIMIT, TARGET_MEMORY, TARGET_MILLION,
                    TARGET_UNPLANNED)
from harness import ROOT


def _ms(t: dict | None) -> str:
    """A timing as ``median / min`` milliseconds."""
    return "-" if t is None else f"{t['median_ms']:.3g} / {t['min_ms']:.3g}"


def _x(r: dict | None, key: str = "min") -> str:
    """A ratio as ``1.23x``."""
    return "-" if r is None or r.get(key) is None else f"{r[key]:.2f}x"


def _met(v: Any) -> str:
    """A target's verdict: ``yes``, ``NO``, or blank where the row has no target."""
    return "" if v is None else ("yes" if v else "NO")


def _yes(v: bool | None) -> str:
    """A fact: ``yes``, ``no``, or ``-`` where it does not apply."""
    return "-" if v is None else ("yes" if v else "no")


def _bytes(n: float | None) -> str:
    """A byte count in binary units."""
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _bwd(r: dict) -> tuple[str, str, str]:
    """The forward+backward cells of a limit row."""
    b = r.get("backward")
    if not b:
        return "-", "-", ""
    return _ms(b["planned"]), _ms(b["limit"]), f"{_x(b['ratio'])} {_met(b['met'])}"


def tables(res: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """Every section as (title, headers, rows) of strings."""
    out = []
    out.append(("Matrix-product rate (x @ W, float32): the FLOP time of the tables below",
                ["backend", "shape", "ms median / min", "GFLOP/s"],
                [[r["backend"], "x".join(map(str, r["shape"])), _ms(r), f"{r['gflops_per_s']:.1f}"]
                 for r in res.get("matmul_rate", [])]))
    out.append(("1. Planned forward vs the limit (fastest exact gate without tensormoe + framework LayerNorm + hand "
                "chain); times ms median / min",
                ["backend", "layer", "B", "planned", "limit (its gate)", "planned/limit", "met",
                 "same gates: planned/that", "planned / FLOP time", "fwd+bwd planned", "fwd+bwd limit",
                 "fwd+bwd planned/limit, met"],
                [[r["backend"], r["kind"], str(r["batch"]), _ms(r["planned"]),
                  f"{_ms(r['limit'])} ({r['limit_gate']})", f"{_x(r['ratio'])} ({_x(r['ratio'], 'median')})",
                  _met(r["met"]), _x(r["same_gates_ratio"]), f"{r['vs_flops']:.2f}x", *_bwd(r)]
                 for r in res["limit"]]))
    rows = []
    for r in res["unplanned"]:
        unpl = _ms(r["unplanned"]) if r["unplanned"] is not None else f">{r['timeout_s']:.0f} s (timed out)"
        speed = _x(r["speedup"]) if r["speedup"]["min"] is not None else f">{1e3 * r['timeout_s'] / r['planned']['min_ms']:.0f}x"
        jit = f"{_ms(r['unplanned_jit'])} ({_x(r['speedup_jit'])})" if "unplanned_jit" in r else ""
        c = r.get("contraction")
        alone = f"{_ms(c['planned'])} vs {_ms(c['unplanned'])} ({_x(c['speedup'])})" if c else ""
        rows.append([r["backend"], r["kind"], str(r["batch"]), _ms(r["planned"]), unpl, speed, jit, alone])
    out.append(("2. Planned vs unplanned einsum with defaults (same gates); speed-up = unplanned/planned (min)",
                ["backend", "layer", "B", "planned", "unplanned", "speed-up", "unplanned jit (speed-up)",
                 "contraction alone: planned vs unplanned (speed-up)"],
                rows))
    out.append(("2b. The contraction alone per call at small batch: cached plan vs the framework's einsum (ms median / min)",
                ["backend", "layer", "ranks", "B", "planned", "unplanned einsum", "speed-up (min)", "target", "met"],
                [[r["backend"], r["kind"], str(r["ranks"]), str(r["batch"]), _ms(r["planned"]), _ms(r["unplanned"]),
                  _x(r["speedup"]), r["target"] or "", _met(r["met"])] for r in res.get("overhead", [])]))
    out.append(("3. Planned CP vs the dense reference through W (dense_forward)",
                ["backend", "experts", "B", "dense W", "planned", "dense", "dense/planned"],
                [[r["backend"], str(r["experts"]), str(r["batch"]), _bytes(r["dense_w_bytes"]),
                  _ms(r.get("planned")), _ms(r.get("dense")) if "dense" in r else r.get("skipped", ""),
                  _x(r.get("ratio"))] for r in res["dense"]]))
    out.append(("4. Layer vs parameter-matched linear (x @ W[I, params/I]) and I x O linear; forward x @ W, "
                "forward+backward x @ W + b (nn.Linear); ratios layer/linear (min)",
                ["backend", "layer", "B", "params", "fwd layer", "fwd matched", "fwd IxO", "fwd /matched", "fwd /IxO",
                 "fwd+bwd layer", "fwd+bwd /matched", "fwd+bwd /IxO", "target", "met"],
                [[r["backend"], r["kind"], str(r["batch"]), f"{r['params']:,}", _ms(r["forward"]["layer"]),
                  _ms(r["forward"]["matched"]), _ms(r["forward"]["linear"]), _x(r["forward_vs_matched"]),
                  _x(r["forward_vs_linear"]), _ms(r.get("backward", {}).get("layer")), _x(r.get("backward_vs_matched")),
                  _x(r.get("backward_vs_linear")), r.get("target") or "", _met(r.get("met"))] for r in res["linear"]]))
    rows = []
    for r in res["million"]:
        f, m = r["flops"], r["memory"]
        rows.append([
            r["backend"], f"{r['expert_dims']} = {r['experts']:,}", str(r["rank"]), str(r["batch"]),
            _ms(r["times"]["planned"]), f"{_ms(r['times']['limit'])} ({r['limit_gate']})", _x(r["vs_limit"]),
            _met(r["met"]), _x(r["same_gates_ratio"]), _ms(r["times"]["linear"]),
            f"{_x(r['vs_linear'])} {_met(r.get('linear_met'))}",
            f"{f['total_over_linear']:.1f}x linear, {100 * f['gate_share']:.0f}% in gates",
            (f"{_x(r['gate_rank']['vs_linear'])} (r={r['gate_rank']['gate_rank']})" if "gate_rank" in r else "n/a"),
            f"{_bytes(m['bytes'])} ({m['over_bound']:.2f}x bound {_bytes(m['bound_bytes'])}) {_met(m['met'])}"
            if m["bytes"] is not None else "-",
            _bytes(r["dense_w_bytes"]),
        ])
    out.append(("5. Million-expert CP layer vs its limit and the I x O linear layer",
                ["backend", "experts", "R", "B", "planned", "limit (its gate)", "planned/limit", "<= 1.25 met",
                 "same gates: planned/that", "linear", f"planned/linear (<= {TARGET_MILLION}, PyTorch)", "FLOPs",
                 "gate_rank: /linear", "forward peak memory (vs bound), met", "dense W"],
                rows))
    out.append(("6. Scaling of the CP forward (planned, gates included) and its limit; FLOP time = FLOPs / matmul rate",
                ["backend", "axis", "expert_dims", "R", "B", "planned ms median / min", "limit ms (its gate)",
                 "planned/limit", "planned / FLOP time", "limit / FLOP time", "GFLOP"],
                [[r["backend"], r["axis"], str(r["expert_dims"]), str(r["rank"]), str(r["batch"]), _ms(r),
                  f"{_ms(r.get('limit'))} ({r.get('limit_gate')})" if "limit" in r else "-", _x(r.get("ratio")),
                  f"{r['vs_flops']:.2f}x", f"{r['limit_vs_flops']:.2f}x" if "limit_vs_flops" in r else "-",
                  f"{r['gflops']:.3g}"] for r in res["scaling"]]))
    out.append(("Gate activations on normalised logits: tensormoe (method) and the limit's candidates [name]; "
                "ms median / min",
                ["backend", "logits", "gate", "time", "/ softmax (min)", "target", "met"],
                [[r["backend"], "x".join(map(str, r["shape"])), r["gate"], _ms(r), _x(r["vs_softmax"]),
                  r["target"] or "", _met(r["met"])] for r in res["gates"]]))
    out.append(("Peers at matched parameters (PyTorch): forward (no_grad) and forward+backward; ratios / nn.Linear I x O",
                ["backend", "model", "params", "B", "fwd", "fwd / linear", "fwd+bwd", "fwd+bwd / linear",
                 "target", "met"],
                [[r["backend"], r["model"], f"{r['params']:,}", str(r["batch"]), _ms(r["forward"]),
                  _x(r["forward_vs_linear"]), _ms(r["backward"]), _x(r["backward_vs_linear"]),
                  (f"{r['target']} ({_x(r['ours_vs'])})" if r["target"] else ""), _met(r["met"])]
                 for r in res.get("peers", [])]))
    out.append(("torch.compile(fullgraph=True) of the modules against eager",
                ["backend", "layer", "B", "compiler", "compile s", "eager", "compiled", "compiled/eager",
                 "kernel in graph", "einsum in graph", "met"],
                [[r["backend"], r["kind"], str(r["batch"]), r["compiler"], f"{r['compile_s']:.1f}", _ms(r["eager"]),
                  _ms(r["compiled"]), _x(r["ratio"]), _yes(r["kernel_in_graph"]), _yes(r["einsum_in_graph"]),
                  _met(r["met"])] for r in res.get("compile", [])]))
    out.append(("First calls (ms): a new layer plans once; a new batch size (B+1, ..., fastest of five) reuses its plan",
                ["backend", "layer", "B", "new layer", "again (min of 5)", "new batch size", "steady (min of 5)",
                 "extra of a new batch size", "met"],
                [[r["backend"], r["kind"], str(r["batch"]), *(f"{r['ms'][k]:.1f}" for k in
                  ("new layer", "again", "new batch size", "steady")), f"{r['new_batch_extra_ms']:.1f}",
                  _met(r["met"])] for r in res.get("firstcall", [])]))
    return out


def format_table(title: str, headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    """A table as aligned plain text or as Markdown."""
    if markdown:
        lines = [f"#### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h) for k, h in enumerate(headers)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines) + "\n"


def _count(v: float, _: Any = None) -> str:
    """A readable tick label for a count: 1, 64, 1k (1024), 16k, 1M (2**20)."""
    for unit, size in (("M", 2**20), ("k", 2**10)):
        if v >= size and v % size == 0:
            return f"{int(v) // size}{unit}"
    return f"{v:g}"


def plot(res: dict, path: Path) -> None:
    """Forward time against the experts (one and two levels), the batch and the rank: tensormoe and its limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

    m = res["meta"]["sizes"]
    panels = (
        ("experts", "experts", "experts N (all levels together)",
         f"CP, I = O = {m['I']}, R = {m['scaling_rank']}, B = {m['scaling_batch']}"),
        ("batch", "batch", "batch B (rows)", f"CP, N = {m['scaling_batch_n']}, R = {m['scaling_batch_rank']}"),
        ("rank", "rank", "CP rank R", f"CP, N = {m['scaling_rank_n']}, B = {m['scaling_batch']}"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    backends = list(dict.fromkeys(r["backend"] for r in res["scaling"]))
    colors = {b: f"C{k}" for k, b in enumerate(backends)}
    for ax, (axis, xkey, xlabel, title) in zip(axes, panels):
        pts = [r for r in res["scaling"] if r["axis"] == axis]
        ticks = sorted({r[xkey] for r in pts})
        for backend in backends:
            for levels, marker in ((1, "o"), (2, "s")):
                series = sorted((r for r in pts if r["backend"] == backend and r["levels"] == levels),
                                key=lambda r: r[xkey])
                if not series:
                    continue
                name = backend if axis != "experts" else f"{backend}, {'one level' if levels == 1 else 'two levels'}"
                xs = [r[xkey] for r in series]
                ax.loglog(xs, [r["min_ms"] for r in series], marker=marker, linestyle="-", color=colors[backend],
                          label=f"{name}: tensormoe")
                if all("limit" in r for r in series):
                    ax.loglog(xs, [r["limit"]["min_ms"] for r in series], marker=marker, linestyle="--",
                              mfc="white", color=colors[backend], label=f"{name}: limit")
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(_count))
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("forward time (ms, minimum of samples)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"tensormoe forward (gates included) and its limit, {res['meta'].get('cpu', '')}, "
                 f"{res['meta'].get('cpu_count')} cores"
                 + (f", torch threads {res['meta']['torch_threads']}" if "torch_threads" in res["meta"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(res: dict) -> list[str]:
    """One line per target: met or not, from the rows that state it."""
    lines = []

    def count(label: str, flags: list) -> None:
        flags = [f for f in flags if f is not None]
        if flags:
            lines.append(f"target {label}: {sum(flags)}/{len(flags)} met")

    count(f"planned/limit <= {TARGET_LIMIT}, forward (every backend, format, batch)", [r["met"] for r in res["limit"]])
    count(f"planned/limit <= {TARGET_LIMIT}, forward+backward",
          [r["backward"]["met"] for r in res["limit"] if "backward" in r])
    count(f">= {TARGET_UNPLANNED}x faster than unplanned torch.einsum, small batch (contraction per call)",
          [r["met"] for r in res["overhead"]])
    count(f"million-expert planned/limit <= {TARGET_LIMIT}", [r["met"] for r in res["million"]])
    count(f"million-expert planned / x @ W <= {TARGET_MILLION} (PyTorch)", [r.get("linear_met") for r in res["million"]])
    count(f"peak memory O(B*(I+O+R+sum N)+params) (<= {TARGET_MEMORY}x)",
          [r["memory"]["met"] for r in res["million"]])
    count(f"default CP forward <= {TARGET_FORWARD}x x @ W and forward+backward <= {TARGET_BACKWARD}x linear "
          "(PyTorch)", [r.get("met") for r in res["linear"]])
    count(f"entmax15 <= {TARGET_GATE}x torch.softmax", [r["met"] for r in res["gates"]])
    count("peers at matched parameters, B = max (faster than lucidrains' MoE, within 1.5x of PEER)",
          [r["met"] for r in res.get("peers", [])])
    count("torch.compile(fullgraph=True) faster than eager", [r["met"] for r in res.get("compile", [])])
    count("torch.compile graph holds the kernel and no einsum",
          [r["kernel_in_graph"] and not r["einsum_in_graph"] for r in res.get("compile", [])
           if r["kernel_in_graph"] is not None])
    count("first call at a new batch size: < 20 ms of plan search and timing", [r["met"] for r in res.get("firstcall", [])])
    return lines


def meta(args: argparse.Namespace, cfg: dict, backends: list[str]) -> dict[str, Any]:
    """The machine, the library versions, the git commit, the thread count and the sizes of this run."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "quick": args.quick, "backends": backends, "device": args.device, "sizes": cfg,
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "numpy": np.__version__, "tensormoe": getattr(tensormoe, "__version__", None),
    }
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    for mod in ("tensorly", "opt_einsum"):
        info[mod] = __import__(mod).__version__
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=str(ROOT)).stdout.strip()
    except OSError:
        info["git_commit"] = None
    if "pytorch" in backends:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name(0) if args.device == "cuda" else None)
    if "jax" in backends:
        import jax

        info.update(jax=jax.__version__, jax_devices=[str(d) for d in jax.devices()])
    return info

