"""The result of routing one expert level, and how tokens are grouped for it.

A router returns a :class:`Routing` (a ``NamedTuple``, so a JAX pytree as well)
holding the combine weights and the auxiliary outputs used to train routers:

* ``load_balancing_loss`` -- the GShard / Switch form ``N * sum_e f_e * P_e``,
  ``f_e`` the fraction of token-to-expert assignments going to expert ``e``,
  ``P_e`` its mean router probability; ``1`` when both are uniform;
* ``z_loss`` -- the router z-loss of ST-MoE, ``mean(logsumexp(logits) ** 2)``;
* ``load`` (``f``), ``importance`` (``P``) and ``dropped`` (fraction of tokens
  that no expert processes) as per-expert statistics.

Groups.  Expert choice and Soft MoE act on a *group* of tokens: for inputs
``[..., T, I]`` of three or more axes the group is the second-to-last axis (the
tokens of one sequence or image); for a matrix ``[B, I]`` it is the whole batch
(:func:`group_shape`).  Routers route grouped inputs ``[G, T, I]``; the per-token
fields are then given the input's leading axes back.

Padding tokens given by a ``mask`` (true or one for real tokens) get zero weights
and are left out of all losses and statistics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from .._array import backend_of
from ..frameworks import Ops, get_ops

__all__ = ["Routing", "group_shape"]


class Routing(NamedTuple):
    """The routing of one expert level: combine weights and auxiliary outputs.

    Leading axes follow the routed input ``x[..., I]``.  Which fields are set
    depends on the router: ``indices`` is set by sparse (top-k) routers,
    ``dispatch`` by Soft MoE; the statistics are set by :meth:`Router.__call__`,
    :meth:`tensormoe.layers.MMoE.route` and ``apply(..., return_routing=True)``.

    Attributes
    ----------
    weights : array
        Combine weights: ``[..., N]`` for dense routers and expert choice,
        ``[..., k]`` for top-k (the weight of each selected expert), ``[..., S]``
        over the slots for Soft MoE.
    indices : integer array ``[..., k]`` or None
        The selected expert of each weight (top-k); ``None`` when dense.
    dispatch : array ``[..., S]`` or None
        Soft MoE only: how much of each token every slot reads (a softmax over
        the tokens of the group, per slot).
    probs : array ``[..., N]`` or None
        The router's probability of each expert per token.
    logits : array or None
        The router logits (after normalisation and training noise).
    load : array ``[N]`` or None
        ``f_e``: fraction of the token-to-expert assignments given to each expert
        (sums to one).
    importance : array ``[N]`` or None
        ``P_e``: mean router probability of each expert (sums to one).
    dropped : scalar array or None
        Fraction of tokens that no expert processes.
    load_balancing_loss : scalar array or None
        ``N * sum(load * importance)``.
    z_loss : scalar array or None
        ``mean(logsumexp(logits) ** 2)``.

    Examples
    --------
    A sparse routing written by hand, two experts per row out of five:

    >>> import numpy as np
    >>> r = Routing(weights=np.array([[0.75, 0.25]]), indices=np.array([[3, 0]]))
    >>> r.is_sparse, r.to_dense(5).tolist()
    (True, [[0.25, 0.0, 0.0, 0.75, 0.0]])
    """

    weights: Any
    indices: Any = None
    dispatch: Any = None
    probs: Any = None
    logits: Any = None
    load: Any = None
    importance: Any = None
    dropped: Any = None
    load_balancing_loss: Any = None
    z_loss: Any = None

    @property
    def is_sparse(self) -> bool:
        """Whether the routing selects experts by index (top-k).

        Examples
        --------
        >>> import numpy as np
        >>> Routing(np.ones((2, 1)), np.zeros((2, 1), int)).is_sparse, Routing(np.ones((2, 3))).is_sparse
        (True, False)
        """
        return self.indices is not None

    @property
    def is_soft(self) -> bool:
        """Whether this is a Soft MoE slot routing (``dispatch`` is set).

        Examples
        --------
        >>> import numpy as np
        >>> Routing(np.full((3, 2), 0.5), dispatch=np.full((3, 2), 1 / 3)).is_soft
        True
        """
        return self.dispatch is not None

    def to_dense(self, n_experts: int) -> Any:
        """The combine weights as dense coefficients ``[..., n_experts]`` (zeros where not selected).

        Raises for a Soft MoE routing, whose combine weights are over slots, not experts.

        Examples
        --------
        >>> import numpy as np
        >>> Routing(weights=np.array([[1.0]]), indices=np.array([[1]])).to_dense(3).tolist()
        [[0.0, 1.0, 0.0]]
        """
        if self.is_soft:
            raise ValueError("a Soft MoE routing combines slots, not experts: it has no dense per-token coefficients")
        if not self.is_sparse:
            return self.weights
        ops = get_ops(backend_of(self.weights))
        return ops.scatter_add_last(self.indices, self.weights, n_experts)


def group_shape(lead: Sequence[int]) -> tuple[int, int]:
    """``(G, T)``: groups and tokens per group for inputs with leading axes ``lead``.

    Three or more axes ``[..., T, I]``: the second-to-last axis is the group; a
    matrix ``[B, I]`` is one group of ``B`` tokens; a vector one group of one.

    Examples
    --------
    >>> group_shape((4, 7)), group_shape((32,)), group_shape(())
    ((4, 7), (1, 32), (1, 1))
    """
    lead = tuple(lead)
    if not lead:
        return 1, 1
    return math.prod(lead[:-1]), lead[-1]


def _logsumexp(ops: Ops, z: Any) -> Any:
    xp = ops.xp
    m = xp.max(z, axis=-1, keepdims=True)
    return m + xp.log(xp.sum(xp.exp(z - m), axis=-1, keepdims=True))


def with_statistics(ops: Ops, routing: Routing, mask: Any, n_experts: int) -> Routing:
    """Fill in the load statistics and auxiliary losses of a grouped routing (internal).

    Masked tokens (``mask == 0``) are excluded from every mean.
    """
    xp = ops.xp
    probs = xp.reshape(routing.probs, (-1, n_experts))
    rows = probs.shape[0]

    def ones(shape: tuple[int, ...]) -> Any:
        return xp.ones(shape, dtype=probs.dtype, device=ops.device(probs))

    def total(a: Any, axis: int = -1) -> Any:
        return xp.sum(a, axis=axis, keepdims=True)

    valid = xp.reshape(mask, (rows, 1)) if mask is not None else ones((rows, 1))
    n_valid = xp.clip(total(valid, axis=0), min=1.0)  # [1, 1]
    importance = total(probs * valid, axis=0) / n_valid  # [1, N]
    if routing.is_sparse:
        k = routing.indices.shape[-1]
        indices = xp.reshape(routing.indices, (1, rows * k))
        counts = ops.scatter_add_last(indices, xp.reshape(valid * ones((rows, k)), (1, rows * k)), n_experts)
        served = valid
    elif routing.is_soft:
        counts = ones((1, n_experts))  # every expert processes its own slots
        served = valid
    else:
        weights = xp.reshape(routing.weights, (rows, n_experts))
        support = xp.astype(weights > 0, probs.dtype)
        counts = total(support * valid, axis=0)
        served = xp.astype(total(support) > 0, probs.dtype) * valid
    load = counts / xp.clip(total(counts), min=1.0)
    logits = xp.reshape(routing.logits, (rows, routing.logits.shape[-1]))
    lse = _logsumexp(ops, logits)
    scalar = ()
    return routing._replace(
        load=xp.reshape(load, (n_experts,)),
        importance=xp.reshape(importance, (n_experts,)),
        dropped=xp.reshape(total(valid - served, axis=0) / n_valid, scalar),
        load_balancing_loss=xp.reshape(total(load * importance) * n_experts, scalar),
        z_loss=xp.reshape(total(lse * lse * valid, axis=0) / n_valid, scalar),
    )


_PER_TOKEN = ("weights", "indices", "dispatch", "probs", "logits")


def ungroup(ops: Ops, routing: Routing, lead: Sequence[int]) -> Routing:
    """Give the per-token fields of a grouped routing ``[G, T, ...]`` the leading axes ``lead``."""
    lead = tuple(lead)
    return routing._replace(**{
        name: ops.xp.reshape(value, (*lead, value.shape[-1]))
        for name in _PER_TOKEN if (value := getattr(routing, name)) is not None
    })


def regroup(ops: Ops, routing: Routing, g: int, t: int) -> Routing:
    """Reshape the per-token fields of a routing to ``[G, T, ...]`` (inverse of :func:`ungroup`)."""
    return routing._replace(**{
        name: ops.xp.reshape(value, (g, t, value.shape[-1]))
        for name in _PER_TOKEN if (value := getattr(routing, name)) is not None
    })
