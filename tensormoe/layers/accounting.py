"""What a layer costs: parameters, forward FLOPs, peak memory, and the same for a linear layer.

Every number here is derived from the objects that run the layer, never from a
hand formula that could drift from them:

* parameter counts come from :meth:`Factorization.param_shapes` (factors and
  Tucker core) and the gate shapes of the dense router
  (:meth:`tensormoe.routing.Router.param_shapes`): ``[in_dim, N_h]``, or with
  ``gate_rank=r`` the two factors ``[in_dim, r]`` and ``[r, N_h]``;
* the FLOPs and the largest intermediate of the forward contraction come from
  the opt_einsum plan the layer runs (:func:`tensormoe.network.contraction.get_plan`),
  where a multiply-add counts two and an elementwise product one;
* the gates' matrix products ``x @ G_h`` (``(x @ G_down_h) @ G_up_h`` when
  low-rank: ``2 B r (in_dim + N_h)``) are planned the same way and counted
  **separately** (``gate_flops``); their normalisation and activation
  (``O(B N_h log N_h)`` for the sort in entmax) are not counted;
* a plain ``in_dim x out_dim`` linear layer is counted the way the MMoE layer
  counts its bias: the input is extended by a one, so ``y = [x, 1] @ [W; b]``.

Communication per training step, for choosing how to spread a layer over
workers (:mod:`tensormoe.distributed`), counted as all-reduce payloads in bytes
of the parameter dtype:

* data parallel (rows split): the gradient of every parameter, once per step,
  whatever the batch (``data_parallel_bytes``);
* rank parallel (one rank of the factorization split, rows replicated): the
  partial output ``y[B, O]`` forward; backward the coefficients' gradient
  ``[B, N_h]`` of every level and the gradient of the factors that do not carry
  the split rank (``rank_parallel_bytes``, as
  :class:`tensormoe.distributed.torch.RankParallel` sends them).

With ``P`` workers a ring all-reduce sends ``2 (P - 1) / P`` times the payload
from each worker, for both schemes alike.

With a bias, the input mode of ``W`` has ``in_dim + 1`` entries; the row
``W[..., in_dim, :]`` is the per-expert bias.  ``bias_params`` says how many of
the factor parameters hold that row (they are part of ``factor_params``).

The one-line view::

    >>> from tensormoe.layers.accounting import cost
    >>> c = cost("cp", 768, 768, [64], 256, batch_size=64)
    >>> c.params, c.linear_params
    (459008, 590592)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from ..network.contraction import Plan, get_plan
from ..network.factorizations import FACTORIZATIONS, Factorization, check_positive_int
from ..routing import DenseRouter
from .config import parse_expert_dims

__all__ = [
    "Cost",
    "bias_params",
    "cost",
    "data_parallel_bytes",
    "factorization_cost",
    "forward_plan",
    "gate_flops",
    "gate_params",
    "linear_flops",
    "linear_params",
    "make_factorization",
    "rank_parallel_bytes",
]


@dataclasses.dataclass(frozen=True)
class Cost:
    """Parameters, FLOPs and memory of one MMoE layer, next to a linear layer's.

    Attributes
    ----------
    kind : str
        ``"cp"``, ``"tucker"``, ``"tt"`` or ``"tr"``.
    ranks : int or tuple of int
        The ranks in the format's convention (CP rank; Tucker per-mode ranks;
        TT/TR bond ranks ``r_0 .. r_d``).
    dims : tuple of int
        Mode sizes of ``W``: ``(N_1, ..., N_H, in_dim (+1), out_dim)``.
    batch_size : int
        Rows the FLOPs and intermediates are counted for.
    factor_params : int
        Scalars in the factors (and the Tucker core), the bias row included.
    bias_params : int
        How many of ``factor_params`` hold the bias row ``W[..., in_dim, :]``
        (0 without a bias).
    gate_params : int
        Scalars in the gates ``G_h[in_dim, N_h]``, or their low-rank factors
        (0 when not counted).
    dense_params : int
        Entries of the dense tensor ``W`` the factors stand for.
    forward_flops : int
        FLOPs of the planned factorized contraction for ``batch_size`` rows,
        gates excluded.
    gate_flops : int
        FLOPs of the gates' products ``x @ G_h`` (or ``(x @ G_down_h) @ G_up_h``)
        for ``batch_size`` rows.
    peak_intermediate : int
        Elements of the largest array the planned contraction creates (the
        output included), for ``batch_size`` rows.
    dense_flops : int
        FLOPs of the planned forward through the dense ``W`` (what the
        factorization saves).
    linear_params : int
        Parameters of an ``in_dim x out_dim`` linear layer (with bias if the
        layer has one).
    linear_flops : int
        FLOPs of that linear layer for ``batch_size`` rows.
    path : tuple of tuple of int
        The pairwise contraction order opt_einsum chose.
    itemsize : int
        Bytes per parameter (and activation) of the dtype counted.
    data_parallel_bytes : int
        Bytes all-reduced per step by data parallelism: every parameter's
        gradient (``params * itemsize``), independent of the batch.
    rank_parallel_bytes : int
        Bytes all-reduced per step by rank parallelism on the default rank
        (:func:`tensormoe.distributed.default_rank_index`) for ``batch_size``
        rows: ``y[B, O]`` forward, the dense coefficients' gradients
        ``[B, N_h]`` and the gradients of the factors without the split rank
        backward (a top-k level sends ``[B, k]`` instead of ``[B, N_h]``; a layer
        whose input needs a gradient adds ``[B, in_dim]``).

    Examples
    --------
    >>> c = cost("tr", 16, 8, [32], 4, batch_size=2)
    >>> c.params == c.factor_params + c.gate_params
    True
    >>> c.flops == c.forward_flops + c.gate_flops
    True
    """

    kind: str
    ranks: Any
    dims: tuple[int, ...]
    batch_size: int
    factor_params: int
    bias_params: int
    gate_params: int
    dense_params: int
    forward_flops: int
    gate_flops: int
    peak_intermediate: int
    dense_flops: int
    linear_params: int
    linear_flops: int
    path: tuple[tuple[int, ...], ...] = dataclasses.field(repr=False)
    itemsize: int = 4
    data_parallel_bytes: int = 0
    rank_parallel_bytes: int = 0

    @property
    def params(self) -> int:
        """All trainable scalars: ``factor_params + gate_params``.

        Examples
        --------
        >>> c = cost("cp", 8, 8, [4], 2)
        >>> c.params == c.factor_params + c.gate_params
        True
        """
        return self.factor_params + self.gate_params

    @property
    def flops(self) -> int:
        """All counted FLOPs: ``forward_flops + gate_flops``.

        Examples
        --------
        >>> c = cost("cp", 8, 8, [4], 2)
        >>> c.flops == c.forward_flops + c.gate_flops
        True
        """
        return self.forward_flops + self.gate_flops

    @property
    def params_vs_linear(self) -> float:
        """``params / linear_params``.

        Examples
        --------
        >>> c = cost("cp", 8, 8, [4], 2)
        >>> c.params_vs_linear == c.params / c.linear_params
        True
        """
        return self.params / self.linear_params

    @property
    def params_vs_dense(self) -> float:
        """``params / (dense_params + gate_params)``: against a dense MMoE layer with the same gates.

        Examples
        --------
        >>> c = cost("cp", 8, 8, [4], 2)
        >>> 0 < c.params_vs_dense < 1
        True
        """
        return self.params / (self.dense_params + self.gate_params)

    @property
    def flops_vs_dense(self) -> float:
        """``flops / (dense_flops + gate_flops)``: against a dense MMoE layer with the same gates.

        Examples
        --------
        >>> c = cost("cp", 8, 8, [4], 2)
        >>> c.flops_vs_dense == c.flops / (c.dense_flops + c.gate_flops)
        True
        """
        return self.flops / (self.dense_flops + self.gate_flops)

    @property
    def parallel_crossover_batch(self) -> float:
        """Rows per step below which rank parallelism communicates fewer bytes than data parallelism.

        ``rank_parallel_bytes`` grows linearly with the rows, ``data_parallel_bytes``
        does not: the two meet at this batch size (0 if rank parallelism always
        sends more).

        Examples
        --------
        >>> c = cost("cp", 768, 768, [1024], 256, batch_size=64)
        >>> round(c.parallel_crossover_batch)  # params / (out_dim + N) = 1442048 / 1792
        805
        >>> c.rank_parallel_bytes < c.data_parallel_bytes
        True
        """
        per_row = (self.dims[-1] + sum(self.dims[:-2])) * self.itemsize  # y[O] and every level's N_h
        fixed = self.rank_parallel_bytes - self.batch_size * per_row  # the replicated factors' gradients
        return max(0.0, (self.data_parallel_bytes - fixed) / per_row)

    @property
    def flops_vs_linear(self) -> float:
        """``flops / linear_flops``.

        Examples
        --------
        >>> c = cost("cp", 8, 8, [4], 2)
        >>> c.flops_vs_linear == c.flops / c.linear_flops
        True
        """
        return self.flops / self.linear_flops


def make_factorization(
    kind: str, in_dim: int, out_dim: int, expert_dims: int | Sequence[int], ranks: Any, *, bias: bool = True
) -> Factorization:
    """The :class:`Factorization` of a layer's weight tensor, without building the layer.

    Parameters
    ----------
    kind : {"cp", "tucker", "tt", "tr"}
        The format.
    in_dim, out_dim : int
        Input and output features.
    expert_dims : int or sequence of int
        Experts per level ``[N_1, ..., N_H]``.
    ranks : int or sequence
        Ranks as the layer classes accept them (``rank`` for CP).
    bias : bool
        Whether the input mode carries the bias row (``in_dim + 1`` entries).

    Examples
    --------
    >>> make_factorization("tt", 16, 8, [32, 4], 3).dims
    (32, 4, 17, 8)
    """
    if kind not in FACTORIZATIONS:
        raise ValueError(f"kind={kind!r} is not a factorization; expected one of {sorted(FACTORIZATIONS)}")
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be True or False; got {bias!r}")
    experts = parse_expert_dims(expert_dims)
    dims = (
        *experts,
        check_positive_int(in_dim, "in_dim") + int(bias),
        check_positive_int(out_dim, "out_dim"),
    )
    return FACTORIZATIONS[kind](dims, ranks, len(experts))


def _ranks(factorization: Factorization) -> Any:
    ranks = factorization.describe_ranks()
    return tuple(ranks) if isinstance(ranks, list) else ranks


def forward_plan(
    factorization: Factorization,
    batch_size: int = 1,
    *,
    backend: str = "numpy",
    dtype: str = "float32",
    optimize: str = "auto",
) -> Plan:
    """The planned forward contraction of ``factorization`` for ``batch_size`` rows.

    The operands are those of :meth:`Factorization.forward_equation`: one
    coefficient matrix ``[B, N_h]`` per level, the (bias-extended) input
    ``[B, dims[-2]]``, then the parameters.  The same plan the layer runs.

    Examples
    --------
    >>> f = make_factorization("cp", 768, 768, [64], 256)
    >>> forward_plan(f, 64).flops
    52477952
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    h = factorization.n_expert_modes
    shapes = [(batch_size, n) for n in factorization.dims[: h + 1]]
    shapes += list(factorization.param_shapes().values())
    return get_plan(factorization.forward_equation(), *shapes, backend=backend, dtype=dtype, optimize=optimize)


def bias_params(factorization: Factorization) -> int:
    """How many factor parameters hold the bias row of the input mode.

    A parameter that carries the input mode (of size ``in_dim + 1``) holds
    ``size / (in_dim + 1)`` scalars for each of its rows, the bias row included.
    Only meaningful for a factorization built with a bias.

    Examples
    --------
    >>> bias_params(make_factorization("cp", 16, 8, [32], 4))
    4
    >>> bias_params(make_factorization("tr", 16, 8, [32], [2, 3, 5]))
    15
    """
    letter = factorization.mode_symbol(factorization.order - 2)
    size = factorization.dims[-2]
    shapes = factorization.param_shapes()
    network = factorization.network()
    return sum(math.prod(shapes[name]) // size for name, letters in network.items() if letter in letters)


def _gate_shapes(in_dim: int, expert_dims: int | Sequence[int], gate_rank: int | None) -> list[list[tuple[int, int]]]:
    """The gate matrices of every level, in the order ``x`` meets them (the dense router's shapes)."""
    in_dim = check_positive_int(in_dim, "in_dim")
    rank = None if gate_rank is None else check_positive_int(gate_rank, "gate_rank")
    router = DenseRouter(rank=rank)
    return [list(router.param_shapes(in_dim, n).values()) for n in parse_expert_dims(expert_dims)]


def gate_params(in_dim: int, expert_dims: int | Sequence[int], gate_rank: int | None = None) -> int:
    """Scalars in the gates ``G_h[in_dim, N_h]`` of every level.

    With ``gate_rank=r`` a level whose ``r < min(in_dim, N_h)`` holds the factors
    ``[in_dim, r]`` and ``[r, N_h]`` instead (the layers' ``gate_rank``).

    Examples
    --------
    >>> gate_params(768, [64])
    49152
    >>> gate_params(768, [1024, 1024], gate_rank=32) == 2 * 32 * (768 + 1024)
    True
    """
    return sum(math.prod(shape) for level in _gate_shapes(in_dim, expert_dims, gate_rank) for shape in level)


def gate_flops(in_dim: int, expert_dims: int | Sequence[int], batch_size: int = 1, gate_rank: int | None = None) -> int:
    """FLOPs of the gates' products ``x @ G_h`` over every level (planned like the forward).

    With ``gate_rank=r``, low-rank levels cost the two products
    ``(x @ G_down_h) @ G_up_h``: ``2 B r (in_dim + N_h)``.  The normalisation and
    the activation of the logits are not counted.

    Examples
    --------
    >>> gate_flops(768, [64], batch_size=2) == 2 * 2 * 768 * 64
    True
    >>> gate_flops(768, [1024], batch_size=2, gate_rank=32) == 2 * 2 * 32 * (768 + 1024)
    True
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    flops = 0
    for level in _gate_shapes(in_dim, expert_dims, gate_rank):
        rows = (batch_size, level[0][0])
        for shape in level:  # x @ G, or (x @ G_down) @ G_up
            flops += get_plan("bi,in->bn", rows, shape).flops
            rows = (batch_size, shape[1])
    return flops


def linear_params(in_dim: int, out_dim: int, bias: bool = True) -> int:
    """Parameters of an ``in_dim x out_dim`` linear layer: ``in_dim * out_dim`` (+ ``out_dim``).

    Examples
    --------
    >>> linear_params(768, 768)
    590592
    """
    return (check_positive_int(in_dim, "in_dim") + int(bias)) * check_positive_int(out_dim, "out_dim")


def linear_flops(in_dim: int, out_dim: int, batch_size: int = 1, bias: bool = True) -> int:
    """FLOPs of ``[x, 1] @ [W; b]`` for ``batch_size`` rows, planned by opt_einsum.

    The bias is counted as one more input feature, as the MMoE layer counts it.

    Examples
    --------
    >>> linear_flops(768, 768, batch_size=1)
    1181184
    """
    rows = check_positive_int(in_dim, "in_dim") + int(bias)
    out_dim = check_positive_int(out_dim, "out_dim")
    batch_size = check_positive_int(batch_size, "batch_size")
    return get_plan("bi,io->bo", (batch_size, rows), (rows, out_dim)).flops


#: Bytes per element of the dtypes a layer takes.
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def data_parallel_bytes(factorization: Factorization, in_dim: int, *, gate_rank: int | None = None,
                        count_gates: bool = True, dtype: str = "float32") -> int:
    """Bytes of the gradient all-reduce of one data-parallel step: every parameter once.

    Parameters
    ----------
    factorization : Factorization
    in_dim : int
        Input features (the gates' rows).
    gate_rank : int, optional
        The layer's ``gate_rank``.
    count_gates : bool
        Count the gates' gradients.
    dtype : str
        Parameter dtype.

    Examples
    --------
    >>> f = make_factorization("cp", 16, 8, [32], 4)
    >>> data_parallel_bytes(f, 16) == 4 * (f.n_params() + 16 * 32)
    True
    """
    experts = factorization.dims[: factorization.n_expert_modes]
    gates = gate_params(in_dim, experts, gate_rank) if count_gates else 0
    return (factorization.n_params() + gates) * _itemsize(dtype)


def rank_parallel_bytes(factorization: Factorization, batch_size: int = 1, *, dtype: str = "float32") -> int:
    """Bytes all-reduced in one rank-parallel step on the default rank, for ``batch_size`` rows.

    Forward: the partial outputs ``y[B, O]``.  Backward: the coefficients'
    gradients ``[B, N_h]`` of every level, and the gradients of the factors that
    do not carry the split rank (each worker holds a share of them).  See
    :class:`tensormoe.distributed.torch.RankParallel`.

    Examples
    --------
    >>> f = make_factorization("cp", 16, 8, [32], 4)
    >>> rank_parallel_bytes(f, 10) == 4 * 10 * (8 + 32)  # CP: every factor carries the rank
    True
    >>> t = make_factorization("tucker", 16, 8, [32], 4)
    >>> rank_parallel_bytes(t, 10) == 4 * (10 * (8 + 32) + 32 * 4 + 17 * 4)  # + the expert and input factors
    True
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    experts = factorization.dims[: factorization.n_expert_modes]
    split = factorization.rank_axes()
    replicated = sum(math.prod(shape) for name, shape in factorization.param_shapes().items() if name not in split)
    return (batch_size * (factorization.dims[-1] + sum(experts)) + replicated) * _itemsize(dtype)


def _itemsize(dtype: str) -> int:
    if dtype not in _ITEMSIZE:
        raise ValueError(f"dtype={dtype!r} is not a parameter dtype; expected one of {sorted(_ITEMSIZE)}")
    return _ITEMSIZE[dtype]


def factorization_cost(
    factorization: Factorization,
    batch_size: int = 1,
    *,
    bias: bool = True,
    count_gates: bool = True,
    backend: str = "numpy",
    dtype: str = "float32",
    optimize: str = "auto",
    gate_rank: int | None = None,
) -> Cost:
    """The :class:`Cost` of a layer whose weight tensor has ``factorization``.

    Parameters
    ----------
    factorization : Factorization
        Dims ``[N_1, ..., N_H, in_dim (+1), out_dim]`` and ranks.
    batch_size : int
        Rows to count FLOPs and intermediates for.
    bias : bool
        Whether ``factorization.dims[-2]`` includes the bias row.
    count_gates : bool
        Count the gates' parameters and FLOPs (``False``: both are 0, e.g. for
        a layer fed external coefficients).
    backend, dtype, optimize : str
        The plan's key (the same as the layer's); the path and its cost depend
        only on the shapes and the optimizer.
    gate_rank : int, optional
        The layer's ``gate_rank``: count low-rank gates.

    Examples
    --------
    >>> c = factorization_cost(make_factorization("tucker", 16, 8, [32], 4), batch_size=4)
    >>> c.factor_params, c.gate_params, c.dense_params
    (292, 512, 4352)
    """
    if not isinstance(factorization, Factorization):
        raise TypeError(f"factorization must be a Factorization; got {type(factorization).__name__}")
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be True or False; got {bias!r}")
    in_dim = factorization.dims[-2] - int(bias)
    if in_dim < 1:
        raise ValueError(f"bias=True needs an input mode of at least 2 entries; got dims={factorization.dims}")
    out_dim = factorization.dims[-1]
    experts = factorization.dims[: factorization.n_expert_modes]
    plan = forward_plan(factorization, batch_size, backend=backend, dtype=dtype, optimize=optimize)
    dense = get_plan(
        factorization.dense_equation(),
        *[(batch_size, n) for n in factorization.dims[:-1]],
        factorization.dims,
        backend=backend,
        dtype=dtype,
        optimize=optimize,
    )
    return Cost(
        kind=factorization.name,
        ranks=_ranks(factorization),
        dims=tuple(factorization.dims),
        batch_size=batch_size,
        factor_params=factorization.n_params(),
        bias_params=bias_params(factorization) if bias else 0,
        gate_params=gate_params(in_dim, experts, gate_rank) if count_gates else 0,
        dense_params=math.prod(factorization.dims),
        forward_flops=plan.flops,
        gate_flops=gate_flops(in_dim, experts, batch_size, gate_rank) if count_gates else 0,
        peak_intermediate=plan.largest_intermediate,
        dense_flops=dense.flops,
        linear_params=linear_params(in_dim, out_dim, bias),
        linear_flops=linear_flops(in_dim, out_dim, batch_size, bias),
        path=tuple(plan.path),
        itemsize=_itemsize(dtype),
        data_parallel_bytes=data_parallel_bytes(factorization, in_dim, gate_rank=gate_rank, count_gates=count_gates,
                                                dtype=dtype),
        rank_parallel_bytes=rank_parallel_bytes(factorization, batch_size, dtype=dtype),
    )


def cost(
    kind: str,
    in_dim: int,
    out_dim: int,
    expert_dims: int | Sequence[int],
    ranks: Any,
    *,
    batch_size: int = 1,
    bias: bool = True,
    count_gates: bool = True,
    optimize: str = "auto",
    gate_rank: int | None = None,
) -> Cost:
    """The :class:`Cost` of a layer given by its configuration, without building it.

    Equal to ``layer.cost(batch_size)`` of the layer with that configuration.

    Parameters
    ----------
    kind : {"cp", "tucker", "tt", "tr"}
    in_dim, out_dim : int
    expert_dims : int or sequence of int
    ranks : int or sequence
        As the layer classes accept them.
    batch_size : int
    bias : bool
    count_gates : bool
    optimize : str
        opt_einsum path optimizer.
    gate_rank : int, optional
        Rank of low-rank gates (the layers' ``gate_rank``); default full gates.

    Examples
    --------
    >>> c = cost("cp", 768, 768, [1024, 1024], 256, batch_size=64)
    >>> c.factor_params, c.dense_params > 10**11
    (917760, True)
    >>> round(c.forward_flops / c.linear_flops, 2)
    1.55

    Most of the million-expert layer's FLOPs are in its two ``768 x 1024``
    gates; low-rank gates cut them:

    >>> round(c.flops / c.linear_flops, 2), round(cost("cp", 768, 768, [1024, 1024], 256, batch_size=64,
    ...     gate_rank=64).flops / c.linear_flops, 2)
    (4.22, 1.94)
    """
    factorization = make_factorization(kind, in_dim, out_dim, expert_dims, ranks, bias=bias)
    return factorization_cost(
        factorization, batch_size, bias=bias, count_gates=count_gates, optimize=optimize, gate_rank=gate_rank
    )
