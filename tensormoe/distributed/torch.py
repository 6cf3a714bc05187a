"""PyTorch: rank-parallel modules on DTensor, and whole-batch routing statistics under data parallelism.

Data parallelism: the :mod:`tensormoe.torch` modules work unchanged under
``DistributedDataParallel`` and FSDP2's ``fully_shard``.  Their gradients equal
those of one process on the concatenated batch when the loss is a mean over
equal per-worker batches; top-k routing's load-balancing loss is the exception,
since it multiplies two batch means.  :func:`global_load` makes it exact:
the expert loads are counted over every worker's tokens.

Rank parallelism: :class:`RankParallel` holds a module's parameters as DTensors,
the factors that carry the split rank ``Shard``-ed on its axis over a 1-D
``DeviceMesh`` (:func:`rank_sharding`), the rest ``Replicate``-d.  Its forward
routes on every worker, runs the smaller-rank layer
(:func:`tensormoe.distributed.local_layer`) on the local slices and sums the
shares with one ``all_reduce`` of ``y[B, O]``.  Backward all-reduces the
coefficients' gradient (``[B, N_h]`` per level, ``[B, k]`` for top-k), the
gradients of the replicated factors (those without the split rank: none for
CP), and the input's gradient when the input needs one.

Importing this module imports PyTorch.

Examples
--------
A one-process group (``gloo``) runs every example here; with ``torchrun`` the
same code runs on every worker:

>>> import torch, torch.distributed as dist
>>> from torch.distributed.device_mesh import init_device_mesh
>>> from tensormoe.torch import CPMMoE
>>> from tensormoe.distributed.torch import RankParallel
>>> if not dist.is_initialized(): dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
>>> module = CPMMoE(8, 4, [6], rank=4)
>>> parallel = RankParallel(module, init_device_mesh("cpu", (1,)))
>>> x = torch.randn(3, 8)
>>> torch.allclose(parallel(x), module(x), atol=1e-6)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from ..routing import Routing
from ..torch import MMoE as _Module
from ..torch import wrap
from . import local_layer, rank_axes, rank_index_size, with_rank

__all__ = ["RankParallel", "global_load", "rank_sharding"]

_BACKEND = "pytorch"


class _CopyToRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (the workers' shares of it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverRanks(torch.autograd.Function):
    """Forward sums the workers' shares over the group; backward is the identity (every worker holds the sum)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _check_module(module: Any) -> _Module:
    if not isinstance(module, _Module):
        raise TypeError(f"module must be a tensormoe.torch module (CPMMoE, ...); got {type(module).__name__}")
    return module


def _mesh_dim(mesh: Any, axis: str | None) -> int:
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh; got {type(mesh).__name__}")
    names = tuple(mesh.mesh_dim_names or ())
    if axis is None:
        if mesh.ndim != 1:
            raise ValueError(f"mesh has {mesh.ndim} dimensions {names}: name the one to split the rank over (axis=...)")
        return 0
    if axis not in names:
        raise ValueError(f"axis={axis!r} is not a dimension name of the mesh; expected one of {names}")
    return names.index(axis)


def rank_sharding(
    module: Any, mesh: DeviceMesh, axis: str | None = None, rank_index: int | None = None
) -> dict[str, tuple[Placement, ...]]:
    """The DTensor placements of every parameter: ``Shard`` on the split rank's axis, else ``Replicate``.

    One placement per mesh dimension: ``Shard(a)`` on the dimension ``axis`` for
    the factors carrying the rank (``a`` their rank axis), ``Replicate()``
    everywhere else.  ``distribute_tensor(p, mesh, placements[name])`` places
    parameter ``name``.

    Parameters
    ----------
    module : tensormoe.torch.MMoE
    mesh : torch.distributed.device_mesh.DeviceMesh
    axis : str, optional
        Name of the mesh dimension to split over (default: the mesh's only one).
    rank_index : int, optional
        Which rank to split (default :func:`tensormoe.distributed.default_rank_index`).

    Raises
    ------
    ValueError
        If the mesh dimension's size does not divide the rank.

    Examples
    --------
    >>> import torch.distributed as dist
    >>> if not dist.is_initialized(): dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> from torch.distributed.device_mesh import init_device_mesh
    >>> from tensormoe.torch import TuckerMMoE
    >>> placements = rank_sharding(TuckerMMoE(8, 4, [6], ranks=2), init_device_mesh("cpu", (1,)))
    >>> placements["core"], placements["factor_0"]
    ((Shard(dim=2),), (Replicate(),))
    """
    dim = _mesh_dim(mesh, axis)
    local_layer(_check_module(module), mesh.size(dim), rank_index)  # the split must divide the rank
    axes = rank_axes(module, rank_index)
    placements = {}
    for name in module.params:
        entry: list[Placement] = [Replicate()] * mesh.ndim
        if name in axes:
            entry[dim] = Shard(axes[name])
        placements[name] = tuple(entry)
    return placements


class RankParallel(nn.Module):
    """A :mod:`tensormoe.torch` module split on one rank over a 1-D device mesh.

    Every worker builds the same module (same seed) and wraps it; parameters
    become DTensors placed by :func:`rank_sharding` (rank 0's values are
    scattered, so the workers agree).  Train it like any module: the
    optimizer steps the DTensors, ``torch.distributed.checkpoint`` saves and
    loads them, :meth:`full_module` gathers a plain module.

    Parameters
    ----------
    module : tensormoe.torch.MMoE
        The layer to split (its parameters are copied).
    mesh : torch.distributed.device_mesh.DeviceMesh
        A 1-D mesh of the workers sharing the layer (for a larger mesh, pass
        ``mesh[name]``).
    rank_index : int, optional
        Which rank to split (default :func:`tensormoe.distributed.default_rank_index`).

    Attributes
    ----------
    params : torch.nn.ParameterDict
        The parameters as DTensors, keyed as the module's.
    local : tensormoe.MMoE
        The functional layer each worker runs on its slices.

    Examples
    --------
    >>> import torch, torch.distributed as dist
    >>> if not dist.is_initialized(): dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> from torch.distributed.device_mesh import init_device_mesh
    >>> from tensormoe.torch import TTMMoE
    >>> module = TTMMoE(8, 4, [6], ranks=2, router="top2")
    >>> parallel = RankParallel(module, init_device_mesh("cpu", (dist.get_world_size(),)))
    >>> y, (routing,) = parallel(torch.randn(3, 8), return_routing=True)
    >>> y.shape, routing.indices.shape, type(parallel.params["factor_2"]).__name__
    (torch.Size([3, 4]), torch.Size([3, 2]), 'DTensor')
    """

    def __init__(self, module: Any, mesh: DeviceMesh, rank_index: int | None = None) -> None:
        super().__init__()
        module = _check_module(module)
        if not isinstance(mesh, DeviceMesh) or mesh.ndim != 1:
            raise ValueError(
                f"mesh must be a 1-D DeviceMesh; got {mesh!r} (for a larger mesh pass the sub-mesh mesh[name])"
            )
        self.mesh = mesh
        self.rank_index = module.factorization.check_rank_index(rank_index)
        self.parts = mesh.size()
        self.local = local_layer(module, self.parts, self.rank_index)
        placements = rank_sharding(module, mesh, None, self.rank_index)
        with torch.no_grad():
            self.params = nn.ParameterDict({
                name: nn.Parameter(distribute_tensor(value.detach(), mesh, placements[name]))
                for name, value in module.params.items()
            })
        self._split = frozenset(rank_axes(module, self.rank_index))
        self._factors = frozenset(module.factorization.param_shapes())

    @property
    def group(self) -> Any:
        """The process group the rank is split over (the mesh's).

        Examples
        --------
        >>> import torch.distributed as dist
        >>> if not dist.is_initialized(): dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> from tensormoe.torch import CPMMoE
        >>> parallel = RankParallel(CPMMoE(8, 4, [6], rank=4), init_device_mesh("cpu", (dist.get_world_size(),)))
        >>> dist.get_world_size(parallel.group) == parallel.parts
        True
        """
        return self.mesh.get_group()

    def _local_params(self) -> dict[str, torch.Tensor]:
        group = self.group
        params = {}
        for name, value in self.params.items():
            local = value.to_local() if isinstance(value, DTensor) else value
            if name in self._factors and name not in self._split:
                # a replicated factor inside the split network: each worker holds a share of its gradient
                local = _CopyToRanks.apply(local, group)
            params[name] = local
        return params

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        training: bool = False,
        rng: Any = None,
        return_routing: bool = False,
    ) -> Any:
        """The layer's output ``y[..., out_dim]`` (and the routing), summed over the workers' shares.

        Arguments as :meth:`tensormoe.layers.MMoE.apply`.  ``x`` (and ``rng`` for
        training noise) must be the same on every worker.

        Examples
        --------
        >>> import torch, torch.distributed as dist
        >>> if not dist.is_initialized(): dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> from tensormoe.torch import TRMMoE
        >>> module = TRMMoE(8, 4, [6], ranks=2)
        >>> parallel = RankParallel(module, init_device_mesh("cpu", (dist.get_world_size(),)))
        >>> x = torch.randn(2, 5, 8)
        >>> torch.allclose(parallel(x), module(x), atol=1e-6)
        True
        """
        group = self.group
        params = self._local_params()
        routing = self.local.route(params, x, mask=mask, training=training, rng=rng, backend=_BACKEND)
        carried = tuple(
            Routing(
                weights=_CopyToRanks.apply(r.weights, group),
                indices=r.indices,
                dispatch=None if r.dispatch is None else _CopyToRanks.apply(r.dispatch, group),
            )
            for r in routing
        )
        rows = _CopyToRanks.apply(x, group) if x.requires_grad else x
        y = _SumOverRanks.apply(self.local.apply(params, rows, routing=carried, backend=_BACKEND), group)
        return (y, routing) if return_routing else y

    def full_module(self) -> _Module:
        """A plain :mod:`tensormoe.torch` module with the whole (gathered) parameters, on every worker.

        Examples
        --------
        >>> import torch, torch.distributed as dist
        >>> if not dist.is_initialized(): dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> from tensormoe.torch import CPMMoE
        >>> module = CPMMoE(8, 4, [6], rank=4)
        >>> full = RankParallel(module, init_device_mesh("cpu", (dist.get_world_size(),))).full_module()
        >>> all(torch.equal(full.params[n], module.params[n]) for n in module.params)
        True
        """
        size = rank_index_size(self.local, self.rank_index) * self.parts
        module = wrap(with_rank(self.local, self.rank_index, size))
        device = next(iter(self.params.values())).device
        with torch.no_grad():
            state = {
                f"params.{name}": value.full_tensor() if isinstance(value, DTensor) else value
                for name, value in self.params.items()
            }
        module.load_state_dict(state)
        return module.to(device)

    def extra_repr(self) -> str:
        """The split: which rank, over how many workers.

        Examples
        --------
        >>> import torch.distributed as dist
        >>> if not dist.is_initialized(): dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> from torch.distributed.device_mesh import init_device_mesh
        >>> from tensormoe.torch import CPMMoE
        >>> RankParallel(CPMMoE(8, 4, [6], rank=4), init_device_mesh("cpu", (1,))).extra_repr()
        "CPMMoE(in_dim=8, out_dim=4, expert_dims=[6], rank=4, bias=True, gate='entmax15'), rank_index=0 split over 1 worker(s)"
        """
        full = repr(with_rank(self.local, self.rank_index, rank_index_size(self.local, self.rank_index) * self.parts))
        return f"{full}, rank_index={self.rank_index} split over {self.parts} worker(s)"


def _counts(r: Routing, n: int, valid: torch.Tensor) -> torch.Tensor:
    """Token-to-expert assignments per expert over the valid rows (as the routing statistics count them)."""
    if r.indices is not None:
        k = r.indices.shape[-1]
        weights = valid[:, None].expand(-1, k).reshape(-1)
        return torch.zeros(n, dtype=valid.dtype, device=valid.device).index_add_(0, r.indices.reshape(-1), weights)
    if r.dispatch is not None:  # Soft MoE: every expert processes its own slots
        return torch.ones(n, dtype=valid.dtype, device=valid.device)
    support = (r.weights.detach().reshape(-1, n) > 0).to(valid.dtype)
    return (support * valid[:, None]).sum(0)


def global_load(
    routings: Routing | Sequence[Routing], group: Any = None, mask: torch.Tensor | None = None
) -> tuple[Routing, ...]:
    """Routings whose load statistics count every worker's tokens (data parallelism).

    The load-balancing loss ``N * sum_e f_e P_e`` multiplies two means over the
    batch, so the mean of the workers' own losses is not the whole batch's.
    Here the expert loads ``f`` are all-reduced (one small all-reduce per level),
    and each worker's losses are rescaled to its share of the tokens, so that
    **the mean over workers of the returned losses, and of their gradients (what
    DDP and FSDP average), equals the loss and gradient of the whole batch**,
    masks and unequal batches included.

    Parameters
    ----------
    routings : Routing or sequence of Routing
        With statistics: from ``layer.apply(..., return_routing=True)`` or
        ``layer.route``.
    group : ProcessGroup, optional
        The data-parallel group (default: the world).
    mask : torch.Tensor, optional
        The padding mask the routing was computed with.

    Returns
    -------
    tuple of Routing
        ``load`` and ``dropped`` of the whole batch; ``importance`` still this
        worker's; ``load_balancing_loss`` and ``z_loss`` this worker's share
        (pass them to :func:`tensormoe.routing.aux_loss`).

    Examples
    --------
    >>> import torch, torch.distributed as dist
    >>> if not dist.is_initialized(): dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> from tensormoe.torch import CPMMoE
    >>> module = CPMMoE(8, 4, [6], rank=4, router="top2")
    >>> y, routing = module.layer.apply(dict(module.params), torch.randn(5, 8), return_routing=True,
    ...                                 backend="pytorch")
    >>> (synced,) = global_load(routing)
    >>> torch.allclose(synced.load_balancing_loss, routing[0].load_balancing_loss)  # one worker: unchanged
    True
    """
    if isinstance(routings, Routing):
        routings = [routings]
    world = dist.get_world_size(group)
    out = []
    for h, r in enumerate(routings):
        if r.load_balancing_loss is None or r.importance is None:
            raise ValueError(
                f"routings[{h}] carries no statistics; get it from layer.apply(..., return_routing=True) or "
                "layer.route(...)"
            )
        n = r.importance.shape[0]
        lead = r.weights.shape[:-1]
        dtype = r.importance.dtype
        if mask is None:
            valid = torch.ones(lead.numel(), dtype=dtype, device=r.weights.device)
        else:
            if tuple(mask.shape) != tuple(lead):
                raise ValueError(f"mask must have the routing's leading shape {list(lead)}; got {list(mask.shape)}")
            valid = mask.reshape(-1).to(dtype)
        tokens = valid.sum()
        unserved = r.dropped.detach() * tokens.clamp_min(1)  # dropped is a fraction of max(tokens, 1)
        totals = torch.cat([_counts(r, n, valid), tokens[None], unserved[None]])
        dist.all_reduce(totals, group=group)
        counts, all_tokens, all_unserved = totals[:n], totals[n], totals[n + 1]
        load = counts / counts.sum().clamp_min(1)
        share = world * tokens / all_tokens.clamp_min(1)
        out.append(r._replace(
            load=load,
            dropped=all_unserved / all_tokens.clamp_min(1),
            load_balancing_loss=n * (load * r.importance).sum() * share,
            z_loss=r.z_loss * share,
        ))
    return tuple(out)
