"""The tensormoe benchmark suite: every layer against its limit, side by side, on every installed backend.

    python benchmarks/run.py                      # default sizes, every installed backend
    python benchmarks/run.py --quick              # tiny shapes, every section once (CI)
    python benchmarks/run.py --backends pytorch --device cuda --markdown

Each section (``sections/``; the list is in ``sections/__init__.py``) prints a table; all the numbers
go to one JSON file, ``benchmarks/results/<timestamp>.json`` by default, with a PNG of the scaling
plot next to it.  How the suite times is in ``harness.py``, the sizes and targets in ``config.py``,
the tables and the plot in ``report.py``; the limit (no tensormoe code) in ``chains.py`` and
``limit_gates.py``.  See ``docs/guides/performance.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import tensormoe  # noqa: E402

import report  # noqa: E402
from config import sizes  # noqa: E402
from harness import Backend, serve, set_torch_threads  # noqa: E402
from sections import SECTIONS, WORKERS  # noqa: E402
from sections.limit import LIMITS  # noqa: E402

RESULT_KEYS = ("matmul_rate", "limit", "unplanned", "overhead", "dense", "linear", "million", "scaling", "gates",
               "peers", "compile", "firstcall")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="tensormoe benchmark suite (issue 6)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats, every section (CI)")
    parser.add_argument("--compiled-gates", action="store_true",
                        help="also try a torch.compile'd Newton gate for the PyTorch limit (compiles for seconds)")
    parser.add_argument("--backends", default=None, help="comma-separated (default: every installed backend)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="PyTorch device (JAX: its default)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--repeats", type=int, default=None, help="samples per timing (default 25; --quick 3)")
    parser.add_argument("--row-budget", type=float, default=3.0,
                        help="seconds of sampling per row; past it a row stops at 3 samples (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--out", default=None, help="result JSON path (default benchmarks/results/<timestamp>.json)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    for b in args.backends.split(",") if args.backends else []:
        if b.strip() and b.strip() not in ("numpy", "pytorch", "jax"):
            parser.error(f"--backends: {b.strip()!r} is not a backend; expected some of numpy, pytorch, jax")
    for s in args.sections.split(","):
        if s.strip() and s.strip() not in SECTIONS:
            parser.error(f"--sections: {s.strip()!r} is not a section; expected some of {list(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        serve(WORKERS[args.worker], json.loads(args.spec))
        return 0

    started = time.perf_counter()
    installed = tensormoe.available_backends()
    backends = installed if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    skipped = [b for b in backends if b not in installed]
    backends = [b for b in backends if b in installed]
    if "pytorch" in backends:
        import torch

        set_torch_threads(args.threads)
        if args.device == "cuda" and not torch.cuda.is_available():
            print("pytorch: --device cuda but no CUDA device here; skipping the pytorch backend")
            skipped.append("pytorch-cuda")
            backends.remove("pytorch")
    elif args.device == "cuda":
        print("--device cuda applies to pytorch only")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    cfg = sizes(args.quick)
    if args.repeats is not None:
        cfg["repeats"] = args.repeats
    cfg["threads"] = args.threads
    cfg["row_budget_s"] = args.row_budget
    cfg["compiled_gates"] = args.compiled_gates
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = Path(args.out) if args.out else HERE / "results" / f"{stamp}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    res: dict[str, Any] = {"meta": report.meta(args, cfg, backends), "skipped_backends": skipped, "verified": [],
                           **{k: [] for k in RESULT_KEYS}, "section_seconds": {}}
    for name in backends:
        with tensormoe.backend_context(name):
            be = Backend(name, args.device if name == "pytorch" else "cpu")
            for s in sections:
                t0 = time.perf_counter()
                SECTIONS[s](be, cfg, res)
                res["section_seconds"][f"{be.label}:{s}"] = round(time.perf_counter() - t0, 2)
                print(f"[{time.perf_counter() - started:6.1f} s] {be.label}: {s} done", file=sys.stderr, flush=True)
    res["limit_gates"] = LIMITS.records
    if res["scaling"]:
        png = out_path.with_suffix(".png")
        report.plot(res, png)
        res["plot"] = str(png)
    res["summary"] = report.summary(res)
    res["wall_seconds"] = round(time.perf_counter() - started, 2)
    out_path.write_text(json.dumps(res, indent=1, default=str))
    m = res["meta"]
    print(f"tensormoe benchmarks: {', '.join(backends) or 'no backend left to run'} on {m['cpu']} ({m['cpu_count']} cores"
          + (f", torch threads {m['torch_threads']}" if "torch_threads" in m else "") + ")"
          + ("  [--quick]" if args.quick else "") + "\n")
    for title, headers, rows in report.tables(res):
        if rows:
            print(report.format_table(title, headers, rows, args.markdown))
    for line in res["summary"]:
        print(line)
    print(f"\nwall time {res['wall_seconds']:.1f} s; results: {out_path}" + (f", plot: {res['plot']}" if "plot" in res else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
