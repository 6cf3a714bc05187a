"""What a layer is, as data: its expert levels and the structure its forward needs."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..network.factorizations import Factorization
from ..routing import DenseRouter
from ..validation import as_list, check_positive_int, describe, is_int

__all__ = ["LayerSpec", "parse_expert_dims"]


def parse_expert_dims(expert_dims: Any, hierarchy: Any = None) -> tuple[int, ...]:
    """The experts per level ``(N_1, ..., N_H)`` from a layer's ``expert_dims`` (and ``hierarchy``) arguments.

    An integer is one level, or ``hierarchy`` levels of that size; a sequence
    lists the levels (``hierarchy``, if given, must equal its length).

    Examples
    --------
    >>> parse_expert_dims(8), parse_expert_dims(8, hierarchy=2), parse_expert_dims([4, 3])
    ((8,), (8, 8), (4, 3))
    >>> parse_expert_dims([4, 0])
    Traceback (most recent call last):
    ...
    ValueError: expert_dims[1] must be a positive integer; got 0
    """
    if is_int(expert_dims):
        levels = 1 if hierarchy is None else check_positive_int(hierarchy, "hierarchy")
        dims = [expert_dims] * levels
    elif as_list(expert_dims) is not None:
        dims = as_list(expert_dims)
        if not dims:
            raise ValueError("expert_dims must list at least one expert level; got []")
        if hierarchy is not None and check_positive_int(hierarchy, "hierarchy") != len(dims):
            raise ValueError(
                f"hierarchy={hierarchy!r} does not match expert_dims={dims!r}: expected "
                f"hierarchy == len(expert_dims) == {len(dims)} (or omit hierarchy)"
            )
    else:
        raise TypeError(
            f"expert_dims must be a positive integer or a list of them (one per level); got {describe(expert_dims)}"
        )
    return tuple(check_positive_int(n, f"expert_dims[{k}]") for k, n in enumerate(dims))


@dataclasses.dataclass(frozen=True, eq=False)
class LayerSpec:
    """The structure of a layer that its forward functions need (checked by the layer that builds it).

    Attributes
    ----------
    in_dim, out_dim : int
        Input and output features.
    expert_dims : tuple of int
        Experts per level.
    bias : bool
        Whether the input is extended by a one (a per-expert bias).
    routers : tuple of Router
        One router per level.
    factorization : Factorization
        The weight tensor's format, dims ``(*expert_dims, in_dim + bias, out_dim)`` and ranks.
    optimize : str
        opt_einsum's path optimizer.
    dense_routing : bool
        Whether every level routes densely (derived from ``routers``).

    Examples
    --------
    >>> import tensormoe
    >>> spec = tensormoe.CPMMoE(4, 3, [5], rank=2).spec
    >>> spec.expert_dims, spec.factorization.dims, spec.dense_routing
    ((5,), (5, 5, 3), True)
    """

    in_dim: int
    out_dim: int
    expert_dims: tuple[int, ...]
    bias: bool
    routers: tuple[Any, ...]
    factorization: Factorization
    optimize: str = "auto"
    #: whether every level routes densely (the MMoE's own gating): the forward then needs no grouping
    dense_routing: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        # fixed by the routers: computed once, read on every call
        object.__setattr__(self, "dense_routing", all(type(r) is DenseRouter for r in self.routers))
