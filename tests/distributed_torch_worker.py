"""Worker of tests/test_distributed_torch.py: ``torchrun --standalone --nproc-per-node 2 THIS OUT [--device cuda]``.

Every case of ``distributed_cases`` is trained under DDP, FSDP2 (``fully_shard``)
and rank parallelism (:class:`tensormoe.distributed.torch.RankParallel`); rank 0
writes ``OUT/results.npz`` with the losses and whole final parameters of each,
the bytes each scheme all-reduced, and the differences after a
``torch.distributed.checkpoint`` save and load.  The pytest process compares
them with its own one-process runs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from distributed_cases import CASES, ROWS, STEPS, batch, functional_layer, torch_loss, torch_model, torch_train

from tensormoe.distributed.torch import RankParallel, global_load
from tensormoe.torch import wrap


class RankModel(torch.nn.Module):
    """The case's layer split on its default rank; forward returns ``(y, routing)``."""

    def __init__(self, fmt: str, router: str, mesh, device: str) -> None:
        super().__init__()
        self.mmoe = RankParallel(wrap(functional_layer(fmt, router), device=device), mesh)

    def forward(self, x):
        return self.mmoe(x, return_routing=True)


def whole(params) -> dict[str, np.ndarray]:
    """Whole parameters as NumPy (DTensors gathered)."""
    out = {}
    for name, p in params.items():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = p.detach().cpu().numpy().copy()  # not a view of a parameter that a later step changes
    return out


class AllReduceBytes:
    """Counts the bytes passed to ``dist.all_reduce`` while active (RankParallel calls it through ``dist``)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self._real = dist.all_reduce

    def __enter__(self):
        def counting(tensor, *args, **kwargs):
            self.calls.append(tensor.numel() * tensor.element_size())
            return self._real(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._real


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = args.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    mesh = init_device_mesh(device, (world,))

    def mean(value):
        dist.all_reduce(value)
        return value / world

    results: dict[str, np.ndarray] = {}
    kept = {}
    for fmt, router in CASES:
        key = f"{fmt}/{router}"
        # -- DDP, counting the gradient bytes of the first step
        step_bytes: list[int] = []

        def counting_hook(state, bucket, step_bytes=step_bytes):
            step_bytes.append(bucket.buffer().numel() * bucket.buffer().element_size())
            return allreduce_hook(None, bucket)

        ddp = DistributedDataParallel(torch_model(fmt, router).to(device))
        ddp.register_comm_hook(None, counting_hook)
        losses, _ = torch_train(ddp, fmt, router, rows, sync=global_load, reduce_loss=mean, device=device)
        results[f"ddp/{key}/losses"] = np.array(losses)
        results[f"ddp/{key}/bytes"] = np.array(sum(step_bytes) // STEPS)
        results.update({f"ddp/{key}/params/{n}": v for n, v in whole(ddp.module.mmoe.params).items()})

        # -- FSDP2
        fsdp = torch_model(fmt, router).to(device)
        fully_shard(fsdp)
        losses, opt = torch_train(fsdp, fmt, router, rows, sync=global_load, reduce_loss=mean, device=device)
        results[f"fsdp/{key}/losses"] = np.array(losses)
        results.update({f"fsdp/{key}/params/{n}": v for n, v in whole(fsdp.mmoe.params).items()})
        kept[f"fsdp/{key}"] = (fsdp, opt)

        # -- rank parallel: every worker the whole batch
        split = RankModel(fmt, router, mesh, device)
        losses, opt = torch_train(split, fmt, router, device=device)
        results[f"rank/{key}/losses"] = np.array(losses)
        results.update({f"rank/{key}/params/{n}": v for n, v in whole(split.mmoe.params).items()})
        gathered = split.mmoe.full_module().params
        results[f"rank/{key}/full_module_diff"] = np.array(
            max(float((gathered[n] - split.mmoe.params[n].full_tensor()).detach().abs().max()) for n in gathered)
        )
        kept[f"rank/{key}"] = (split, opt)

        # -- the bytes rank parallelism all-reduces in one step, forward and backward
        fresh = RankModel(fmt, router, mesh, device)
        x, t = (torch.from_numpy(a).to(device) for a in batch(0))
        with AllReduceBytes() as forward:
            y, routing = fresh(x)
        loss = torch_loss(y, routing, t, router)
        with AllReduceBytes() as backward:
            loss.backward()
        results[f"rank/{key}/forward_calls"] = np.array(forward.calls)
        results[f"rank/{key}/backward_bytes"] = np.array(sum(backward.calls))

    # -- checkpoint: save every sharded model and optimizer, load into fresh ones, compare, step both once more
    state = {
        name: {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        for name, (model, opt) in kept.items()
    }
    dcp.save(state, checkpoint_id=os.path.join(args.out, "checkpoint"))
    for name, (model, opt) in kept.items():
        scheme, fmt, router = name.split("/")
        if scheme == "fsdp":
            fresh = torch_model(fmt, router).to(device)
            fully_shard(fresh)
        else:
            fresh = RankModel(fmt, router, mesh, device)
        fresh_opt = torch.optim.SGD(fresh.parameters(), lr=opt.param_groups[0]["lr"], momentum=opt.param_groups[0]["momentum"])
        target = {name: {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}}
        dcp.load(target, checkpoint_id=os.path.join(args.out, "checkpoint"))
        set_model_state_dict(fresh, target[name]["model"])
        set_optimizer_state_dict(fresh, fresh_opt, target[name]["optim"])
        loaded = whole(fresh.mmoe.params)
        saved = whole(model.mmoe.params)
        results[f"checkpoint/{name}/load_diff"] = np.array(max(np.abs(loaded[n] - saved[n]).max() for n in saved))
        stepped = []
        for m, o in ((model, opt), (fresh, fresh_opt)):
            x, t = (torch.from_numpy(a).to(device) for a in batch(STEPS))
            if scheme == "fsdp":
                x, t = x[rows], t[rows]
            y, routing = m(x)
            loss = torch_loss(y, routing, t, router, global_load if scheme == "fsdp" else None)
            o.zero_grad()
            loss.backward()
            o.step()
            stepped.append(whole(m.mmoe.params))
        results[f"checkpoint/{name}/step_diff"] = np.array(
            max(np.abs(stepped[0][n] - stepped[1][n]).max() for n in saved)
        )
        results[f"checkpoint/{name}/moved"] = np.array(max(np.abs(stepped[0][n] - saved[n]).max() for n in saved))

    if rank == 0:
        np.savez(os.path.join(args.out, "results.npz"), world=np.array(world), **results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
