"""Train an MMoE classifier on several processes with torch.distributed: DDP, FSDP2 or rank parallelism.

Launch with torchrun (gloo on CPU; NCCL with --device cuda, one GPU per process):

    torchrun --standalone --nproc-per-node 2 examples/distributed_torch.py                 # DDP on digits
    torchrun --standalone --nproc-per-node 2 examples/distributed_torch.py --scheme fsdp
    torchrun --standalone --nproc-per-node 2 examples/distributed_torch.py --scheme rank --router top2
    torchrun --standalone --nproc-per-node 2 examples/distributed_torch.py --synthetic --steps 30   # timing

Model: ``x -> MMoE -> GELU -> linear head``.  The MMoE (``--format``, 32
experts, CP rank 32 by default) is the hidden layer; ``--router top2`` routes
each row to 2 experts and adds the auxiliary losses.

Schemes:

* ``ddp``: every process holds the whole model and a slice of every batch;
  ``DistributedDataParallel`` all-reduces the gradients.  The top-2 load
  statistics are counted over every process's rows
  (:func:`tensormoe.distributed.torch.global_load`).
* ``fsdp``: the same, with the parameters sharded by FSDP2 (``fully_shard``).
* ``rank``: every process sees the whole batch and holds a slice of the MMoE's
  factors on its default rank (:class:`tensormoe.distributed.torch.RankParallel`);
  the head is replicated.

Data: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes; nothing is
downloaded), or ``--synthetic`` random rows of ``--in-dim`` features for timing.

Output (rank 0): a tqdm progress bar, the test accuracy (digits), the median
step time after warm-up, and the bytes each scheme communicates per step
(:attr:`tensormoe.accounting.Cost.data_parallel_bytes` and
``rank_parallel_bytes``); ``--json PATH`` writes them to a file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import tensormoe
from tensormoe.distributed.torch import RankParallel, global_load
from tensormoe.routing import aux_loss
from tensormoe.torch import wrap


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scheme", choices=["ddp", "fsdp", "rank"], default="ddp")
    parser.add_argument("--format", choices=["cp", "tucker", "tt", "tr"], default="cp")
    parser.add_argument("--rank", type=int, default=32, help="the factorization's rank (every bond for TT/TR)")
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--router", choices=["dense", "top2"], default="dense")
    parser.add_argument("--batch", type=int, default=128, help="rows per step, all processes together")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the digits")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: --epochs)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median step time")
    parser.add_argument("--synthetic", action="store_true", help="random data (timing) instead of the digits")
    parser.add_argument("--in-dim", type=int, default=64, help="features of the synthetic rows")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process")
    parser.add_argument("--json", default=None, help="write the results (rank 0) to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def load_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training and test rows (float32) and labels; the same on every process."""
    if args.synthetic:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(args.batch * 8, args.in_dim)).astype(np.float32)
        y = rng.integers(0, 10, size=len(x))
        return x, y, x[: args.batch], y[: args.batch]
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    mean, std = x_train.mean(0), x_train.std(0) + 1.0
    return (((x_train - mean) / std).astype(np.float32), y_train, ((x_test - mean) / std).astype(np.float32), y_test)


def mmoe_layer(args: argparse.Namespace, in_dim: int) -> tensormoe.MMoE:
    """The hidden layer (functional); every process builds the same one (same seed)."""
    ranks = args.rank
    if args.format == "tucker":
        ranks = [min(args.rank, args.experts), args.rank, args.rank]
    router = "top2" if args.router == "top2" else None
    return tensormoe.layers.make_layer(args.format, in_dim, args.hidden, [args.experts], ranks, router=router, seed=0)


class Routed(nn.Module):
    """A :mod:`tensormoe.torch` module whose forward also returns the routing (its statistics and losses).

    FSDP2 gathers a sharded module's parameters when that module is called, so
    the call that reads them must be this module's forward.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor):
        return self.module.layer.apply(dict(self.module.params), x, return_routing=True, backend="pytorch")


class Classifier(nn.Module):
    """``head(gelu(mmoe(x)))``; forward returns the logits and the MMoE's routing (for the auxiliary losses)."""

    def __init__(self, mmoe: nn.Module, hidden: int) -> None:
        super().__init__()
        self.mmoe = mmoe
        torch.manual_seed(0)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor):
        h, routing = self.mmoe(x, return_routing=True) if isinstance(self.mmoe, RankParallel) else self.mmoe(x)
        return self.head(nn.functional.gelu(h)), routing


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        raise SystemExit(f"--batch={args.batch} must be a multiple of the {world} processes")

    x_train, y_train, x_test, y_test = load_data(args)
    layer = mmoe_layer(args, x_train.shape[1])
    module = wrap(layer, device=device)
    if args.scheme == "rank":
        from torch.distributed.device_mesh import init_device_mesh

        model = Classifier(RankParallel(module, init_device_mesh(args.device, (world,))), args.hidden).to(device)
    else:
        model = Classifier(Routed(module), args.hidden).to(device)
        if args.scheme == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model.mmoe)
            fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    # every process walks the same shuffled global batches; data parallelism takes its slice of each
    per_epoch = len(x_train) // args.batch
    total = args.steps if args.steps is not None else args.epochs * per_epoch
    rows = slice(rank * args.batch // world, (rank + 1) * args.batch // world) if args.scheme != "rank" else slice(None)
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(x_train)) for _ in range(total // per_epoch + 1)])
    progress = None
    if rank == 0 and not args.quiet:
        from tqdm import tqdm

        progress = tqdm(total=total, desc=f"{args.scheme} x{world}", unit="step")
    times = []
    for step in range(total):
        index = order[step * args.batch:(step + 1) * args.batch][rows]
        x = torch.from_numpy(x_train[index]).to(device)
        y = torch.from_numpy(y_train[index]).to(device)
        start = time.perf_counter()
        logits, routing = model(x)
        loss = nn.functional.cross_entropy(logits, y)
        if args.router == "top2":
            loss = loss + aux_loss(routing if args.scheme == "rank" else global_load(routing))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if progress is not None:
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    if progress is not None:
        progress.close()

    with torch.no_grad():  # every process evaluates the whole test set
        logits, _ = model(torch.from_numpy(x_test).to(device))
    accuracy = float((logits.argmax(-1).cpu().numpy() == y_test).mean())
    cost = layer.cost(args.batch)
    result = {
        "scheme": args.scheme,
        "workers": world,
        "threads": torch.get_num_threads(),
        "format": args.format,
        "router": args.router,
        "batch": args.batch,
        "steps": total,
        "step_ms": 1e3 * statistics.median(times[args.warmup:] or times),
        "accuracy": accuracy,
        "data_parallel_bytes": cost.data_parallel_bytes,
        "rank_parallel_bytes": cost.rank_parallel_bytes,
        "params": layer.n_params,
    }
    if rank == 0:
        print(f"{args.scheme} on {world} process(es), {result['threads']} thread(s) each: median step "
              f"{result['step_ms']:.2f} ms, test accuracy {accuracy:.3f}" + (" (synthetic labels)" if args.synthetic else ""))
        print(f"bytes all-reduced per step for the MMoE layer: data parallel {cost.data_parallel_bytes:,}, "
              f"rank parallel {cost.rank_parallel_bytes:,} (at {args.batch} rows)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
