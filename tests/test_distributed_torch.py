"""Data and rank parallelism on PyTorch: 2 processes (gloo on loopback) against one process on the whole batch.

One ``torchrun`` launch (``distributed_torch_worker.py``) trains every case of
``distributed_cases`` (CP, Tucker, TT, TR; dense gate and top-2 routing with
its auxiliary losses; every parameter random) for ``STEPS`` SGD steps under
DDP, FSDP2 and :class:`~tensormoe.distributed.torch.RankParallel`, and
round-trips the sharded models through ``torch.distributed.checkpoint``.  The
tests here compare with the same training run in this process on the
concatenated batch.  Float64 throughout: the tolerance is ``1e-12`` (measured
differences are ~1e-15; a wrong reduction or a wrong share is off by O(0.1)).
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from distributed_cases import (
    CASES,
    EXPERTS,
    IN_DIM,
    OUT_DIM,
    ROWS,
    functional_layer,
    launch,
    torch_reference,
)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_torch_worker.py")
TOLERANCE = 1e-12  # float64, 3 steps of SGD with momentum on 8 rows
IDS = [f"{fmt}-{router}" for fmt, router in CASES]


def run_workers(out, nproc: int, device: str, timeout: float) -> dict[str, np.ndarray]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               WORKER, str(out), "--device", device]
    env = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}

    def references():  # computed while the workers run
        for case in CASES:
            reference(*case)

    return launch(command, out, timeout, env, meanwhile=references)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The 2-process run on CPU (about 20 s on 2 busy cores; killed after 300 s)."""
    return run_workers(tmp_path_factory.mktemp("torch_distributed"), 2, "cpu", timeout=300)


@functools.cache
def reference(fmt: str, router: str) -> tuple[list[float], dict[str, np.ndarray]]:
    """One process, the whole batch of every step."""
    return torch_reference(fmt, router)


def check_equal(results, scheme: str, fmt: str, router: str, tolerance: float = TOLERANCE) -> None:
    losses, params = reference(fmt, router)
    key = f"{scheme}/{fmt}/{router}"
    np.testing.assert_allclose(results[f"{key}/losses"], losses, rtol=0, atol=tolerance, err_msg=f"{key} losses")
    initial = functional_layer(fmt, router).params
    for name, value in params.items():
        got = results[f"{key}/params/{name}"]
        np.testing.assert_allclose(got, value, rtol=0, atol=tolerance, err_msg=f"{key} {name}")
    # the steps moved the parameters (the comparison is not between two untouched copies)
    assert max(np.abs(params[n] - initial[n]).max() for n in params) > 0.05


@pytest.mark.parametrize("scheme", ["ddp", "fsdp"])
@pytest.mark.parametrize(("fmt", "router"), CASES, ids=IDS)
def test_data_parallel_equals_one_process_on_the_whole_batch(results, scheme, fmt, router):
    check_equal(results, scheme, fmt, router)


@pytest.mark.parametrize(("fmt", "router"), CASES, ids=IDS)
def test_rank_parallel_equals_one_process(results, fmt, router):
    check_equal(results, "rank", fmt, router)
    assert results[f"rank/{fmt}/{router}/full_module_diff"] == 0


@pytest.mark.parametrize("scheme", ["fsdp", "rank"])
@pytest.mark.parametrize(("fmt", "router"), CASES, ids=IDS)
def test_sharded_checkpoint_round_trips(results, scheme, fmt, router):
    key = f"checkpoint/{scheme}/{fmt}/{router}"
    assert results[f"{key}/load_diff"] == 0, "loaded parameters differ from the saved ones"
    assert results[f"{key}/step_diff"] == 0, "a step after loading differs (optimizer state not restored)"
    assert results[f"{key}/moved"] > 0


@pytest.mark.parametrize(("fmt", "router"), CASES, ids=IDS)
def test_bytes_per_step_match_the_accounting(results, fmt, router):
    layer = functional_layer(fmt, router)
    cost = layer.cost(ROWS)
    itemsize = 8
    # data parallel: DDP's buckets hold every gradient once per step
    assert results[f"ddp/{fmt}/{router}/bytes"] == cost.data_parallel_bytes == layer.n_params * itemsize
    # rank parallel: exactly one all-reduce forward, y[B, O]
    assert results[f"rank/{fmt}/{router}/forward_calls"].tolist() == [ROWS * OUT_DIM * itemsize]
    backward = results[f"rank/{fmt}/{router}/backward_bytes"]
    if router == "dense":
        assert ROWS * OUT_DIM * itemsize + backward == cost.rank_parallel_bytes
    else:  # top-2 sends the gradient of the 2 selected weights per row instead of N coefficients
        assert ROWS * OUT_DIM * itemsize + backward == cost.rank_parallel_bytes - ROWS * (EXPERTS - 2) * itemsize


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_nccl_on_two_gpus(tmp_path):
    """The same run with NCCL on 2 GPUs (skipped without them)."""
    gpu = run_workers(tmp_path, 2, "cuda", timeout=300)
    for fmt, router in CASES:
        for scheme in ("ddp", "fsdp", "rank"):
            check_equal(gpu, scheme, fmt, router, tolerance=1e-10)


# ----------------------------------------------------------------------- one process: arguments and errors
@pytest.fixture(scope="module")
def one_process_group():
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (1,), mesh_dim_names=("rank",))


def test_rank_sharding_places_the_split_factors(one_process_group):
    from torch.distributed.tensor import Replicate, Shard

    from tensormoe.distributed.torch import rank_sharding
    from tensormoe.torch import TRMMoE

    placements = rank_sharding(TRMMoE(IN_DIM, OUT_DIM, [EXPERTS], ranks=[2, 3, 4, 2]), one_process_group, "rank", 0)
    assert placements == {"factor_0": (Shard(0),), "factor_1": (Replicate(),), "factor_2": (Shard(2),),
                          "gate_0": (Replicate(),)}


def test_errors_name_the_argument(one_process_group):
    from tensormoe.distributed.torch import RankParallel, global_load, rank_sharding
    from tensormoe.torch import CPMMoE, TTMMoE

    with pytest.raises(TypeError, match="module must be a tensormoe.torch module"):
        rank_sharding(functional_layer("cp", "dense"), one_process_group)
    with pytest.raises(ValueError, match="axis='data' is not a dimension name"):
        rank_sharding(CPMMoE(4, 3, [5], rank=2), one_process_group, "data")
    with pytest.raises(ValueError, match="rank_index=0 .* size a TT boundary rank"):
        from tensormoe.distributed import local_layer

        local_layer(TTMMoE(4, 3, [5], ranks=2), 2, rank_index=0)
    with pytest.raises(ValueError, match="mesh must be a 1-D DeviceMesh"):
        RankParallel(CPMMoE(4, 3, [5], rank=2), "cpu")
    module = CPMMoE(4, 3, [5], rank=2, router="top2")
    plain = module.layer.apply(dict(module.params), torch.ones(2, 4), backend="pytorch", return_routing=True)[1]
    stripped = [r._replace(importance=None) for r in plain]
    with pytest.raises(ValueError, match=r"routings\[0\] carries no statistics"):
        global_load(stripped)
