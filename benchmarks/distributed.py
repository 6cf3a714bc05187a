"""Step times of data- and rank-parallel training on 1, 2 and 4 CPU workers, side by side; bytes per step.

    python benchmarks/distributed.py                  # the guide's tables (several minutes)
    python benchmarks/distributed.py --rounds 1 --steps 10 --plot ''   # a quick look

PyTorch: ``examples/distributed_torch.py --synthetic`` launched by torchrun with
1, 2 and 4 processes for each scheme (``ddp``, ``fsdp``, ``rank``), the launches
interleaved round by round so that a slow spell of the machine slows every
configuration alike; each run reports its median step time after warm-up.
Threads: ``--threads`` per worker (default 1, so that the rows compare worker
counts, and no OpenMP pool spins on a core another worker needs); more workers
than cores oversubscribe the machine.

JAX: ``examples/distributed_jax.py --synthetic --devices 1 2 4`` in one process
(XLA host devices share the process's thread pool), steps interleaved.

Bytes: the layer's :class:`tensormoe.accounting.Cost` at several batch sizes,
data parallel against rank parallel, and where they cross; ``--plot`` draws
them.  The machine's load (``os.getloadavg``) is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PLOT = os.path.join(ROOT, "docs", "guides", "scaling-out-bytes.png")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--schemes", nargs="+", default=["ddp", "fsdp", "rank"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--in-dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--skip-jax", action="store_true")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--plot", default=DEFAULT_PLOT, help="PNG of bytes per step against rows ('' for none)")
    return parser.parse_args(argv)


def model_args(args: argparse.Namespace) -> list[str]:
    return ["--synthetic", "--quiet", "--steps", str(args.steps), "--batch", str(args.batch), "--in-dim",
            str(args.in_dim), "--hidden", str(args.hidden), "--experts", str(args.experts), "--rank", str(args.rank)]


def torch_run(args: argparse.Namespace, scheme: str, workers: int, out: str) -> dict:
    threads = args.threads
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               os.path.join(ROOT, "examples", "distributed_torch.py"), "--scheme", scheme, "--threads", str(threads),
               "--json", out, *model_args(args)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    subprocess.run(command, env=env, check=True, timeout=900, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def jax_runs(args: argparse.Namespace, scheme: str, out: str) -> list[dict]:
    command = [sys.executable, os.path.join(ROOT, "examples", "distributed_jax.py"), "--scheme", scheme,
               "--host-devices", str(max(args.workers)), "--devices", *map(str, args.workers), "--json", out,
               *model_args(args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    subprocess.run(command, env=env, check=True, timeout=900, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def bytes_table(args: argparse.Namespace) -> list[tuple]:
    """``(format, rows, data-parallel bytes, rank-parallel bytes, crossover rows)`` for the benchmark's layer."""
    from tensormoe.accounting import cost

    ranks = {"cp": args.rank, "tucker": [args.rank] * 3, "tt": args.rank, "tr": args.rank}
    table = []
    for kind, rank in ranks.items():
        for rows in (64, 512, 4096):
            c = cost(kind, args.in_dim, args.hidden, [args.experts], rank, batch_size=rows)
            table.append((kind, rows, c.data_parallel_bytes, c.rank_parallel_bytes, c.parallel_crossover_batch))
    return table


def plot_bytes(args: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tensormoe.accounting import cost

    rows = np.unique(np.geomspace(8, 8192, 40).astype(int))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ranks = {"cp": args.rank, "tucker": [args.rank] * 3, "tt": args.rank, "tr": args.rank}
    names = {"cp": "CP", "tucker": "Tucker", "tt": "TT", "tr": "TR"}
    for (kind, rank), color in zip(ranks.items(), ["C0", "C1", "C2", "C3"]):
        costs = [cost(kind, args.in_dim, args.hidden, [args.experts], rank, batch_size=int(b)) for b in rows]
        ax.plot(rows, [c.data_parallel_bytes / 2**20 for c in costs], color=color, linestyle="--",
                label=f"{names[kind]} data parallel")
        ax.plot(rows, [c.rank_parallel_bytes / 2**20 for c in costs], color=color, label=f"{names[kind]} rank parallel")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows per step (all workers together)")
    ax.set_ylabel("bytes all-reduced per step (MiB)")
    ax.set_title(f"MMoE {args.in_dim}->{args.hidden}, {args.experts} experts, rank {args.rank}, float32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    print(f"load average before: {os.getloadavg()}, {os.cpu_count()} cores")
    print(f"layer: CP {args.in_dim}->{args.hidden}, {args.experts} experts, rank {args.rank}; {args.batch} rows per "
          f"step, {args.steps} steps per run, median after 3 warm-up steps\n")
    if not args.skip_torch:
        times: dict[tuple[str, int], list[float]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for workers in args.workers:
                    for scheme in args.schemes:
                        result = torch_run(args, scheme, workers, os.path.join(tmp, "out.json"))
                        times.setdefault((scheme, workers), []).append(result["step_ms"])
                        threads = result["threads"]
                        print(f"  round {r}: torch {scheme} x{workers} ({threads} thread(s) each): "
                              f"{result['step_ms']:.1f} ms", flush=True)
        print("\nPyTorch, median step time (ms) over the runs' medians:\n")
        print("| workers x threads | " + " | ".join(args.schemes) + " |")
        print("| --- |" + " --- |" * len(args.schemes))
        for workers in args.workers:
            cells = [f"{statistics.median(times[(s, workers)]):.1f}" for s in args.schemes]
            print(f"| {workers} x {args.threads} | " + " | ".join(cells) + " |")
    if not args.skip_jax:
        rows = {}
        with tempfile.TemporaryDirectory() as tmp:
            for scheme in ("data", "rank"):
                for result in jax_runs(args, scheme, os.path.join(tmp, "out.json")):
                    rows[(scheme, result["devices"])] = result["step_ms"]
        print("\nJAX, median step time (ms), one process, host devices interleaved:\n")
        print("| devices | data | rank |")
        print("| --- | --- | --- |")
        for n in args.workers:
            print(f"| {n} | {rows[('data', n)]:.1f} | {rows[('rank', n)]:.1f} |")
    print("\nBytes all-reduced per step (float32), data parallel vs rank parallel:\n")
    print("| format | rows | data parallel | rank parallel | crossover rows |")
    print("| --- | --- | --- | --- | --- |")
    for kind, rows_, dp, rp, cross in bytes_table(args):
        print(f"| {kind} | {rows_} | {dp:,} | {rp:,} | {cross:.0f} |")
    if args.plot:
        plot_bytes(args, args.plot)
        print(f"\nplot: {args.plot}")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
