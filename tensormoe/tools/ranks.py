"""Parameter matching: the ranks of each factorization that fit a parameter budget.

A budget is a number of trainable parameters, given as

* an ``int``: that many parameters;
* ``"linear"``: the parameters of the ``in_dim x out_dim`` linear layer the MMoE
  replaces, ``(in_dim + 1) * out_dim`` with a bias, ``in_dim * out_dim`` without;
* a ``float`` in ``(0, 1]``: that fraction of the dense weight tensor
  ``W[N_1, ..., N_H, in_dim (+1), out_dim]``, rounded down.

**The rule.**  For each factorization the ranks follow a one-parameter family
``r = 1, 2, ...`` whose parameter count never decreases with ``r``; the match
is the *largest* ``r`` whose layer has at most ``budget`` parameters — as close
to the budget as the family allows, never above it.  Counts come from
:mod:`tensormoe.layers.accounting` (factors, Tucker core, the bias row, and the gates
``in_dim x N_h`` unless ``count_gates=False``).  The families:

* **CP**: the rank ``R``.  In closed form,
  ``R = floor((budget - G) / (N_1 + ... + N_H + I' + O))`` with ``I' = in_dim + 1``
  with a bias and ``G = in_dim * (N_1 + ... + N_H)`` the gates — the reference
  implementation's rule, rounded down instead of up so the budget holds.
* **Tucker**: one rank ``r`` for every mode, clipped to each mode's size
  (``R_k = min(r, dims[k])``).  Past ``r = max(dims)`` nothing changes.
* **TT / TR, uniform** (default): every bond has rank ``r`` (TT: the inner
  bonds; its boundary ranks are 1).
* **TT / TR, per bond** (``bond_rank=k``): every bond is ``k`` except the bond
  between the input and the output cores, which is solved for — the reference's
  rule for TR (``r_1 = r_2 = 4``, solve ``r_3``).  That bond carries the rank of
  every expert's ``I x O`` matrix, which is where most parameters pay off.

Ranks above the largest useful ones (a TT bond above the product of the mode
sizes on either side, a CP rank above the tensor's rank) are not clipped: they
are what the budget buys, redundant or not.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from ..layers import make_layer, parse_expert_dims
from ..layers.accounting import Cost, factorization_cost, gate_params, linear_params, make_factorization
from ..network.factorizations import FACTORIZATIONS, Factorization, check_positive_int

__all__ = ["KINDS", "Match", "match_rank", "match_ranks", "minimum_params", "resolve_budget"]

#: Factorizations in the order tables list them.
KINDS = ("cp", "tucker", "tt", "tr")
"""The factorizations rank matching knows, in table order.

Examples
--------
>>> KINDS
('cp', 'tucker', 'tt', 'tr')
"""


def resolve_budget(
    budget: float | str, in_dim: int, out_dim: int, expert_dims: int | Sequence[int], *, bias: bool = True
) -> int:
    """The parameter count a budget stands for.

    Parameters
    ----------
    budget : int, float or "linear"
        Parameters; ``"linear"`` for a linear layer's; a fraction in ``(0, 1]``
        of the dense tensor's entries.
    in_dim : int
        Input features ``I`` of the layer.
    out_dim : int
        Output features ``O`` of the layer.
    expert_dims : int or sequence of int
        Experts per level ``[N_1, ..., N_H]``.
    bias : bool
        Whether the layer (and the linear layer it is compared with) has a bias.

    Examples
    --------
    >>> resolve_budget("linear", 768, 1000, [64])
    769000
    >>> resolve_budget(0.5, 4, 3, [2])
    15
    """
    if isinstance(budget, bool):
        raise TypeError(f"budget must be an int, a float in (0, 1] or 'linear'; got {budget!r}")
    if isinstance(budget, str):
        if budget.strip().lower() != "linear":
            raise ValueError(f"budget={budget!r} is not understood; expected an int, a float in (0, 1] or 'linear'")
        return linear_params(in_dim, out_dim, bias)
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"budget must be a positive number of parameters; got {budget!r}")
        return int(budget)
    if isinstance(budget, numbers.Real):
        if not 0 < budget <= 1:
            raise ValueError(
                f"budget={budget!r} as a float is a fraction of the dense tensor; expected a value in (0, 1] "
                "(give an int for a number of parameters)"
            )
        dense = math.prod(parse_expert_dims(expert_dims)) * (in_dim + int(bias)) * out_dim
        return max(1, math.floor(float(budget) * dense))
    raise TypeError(
        f"budget must be an int, a float in (0, 1] or 'linear'; got {budget!r} of type {type(budget).__name__}"
    )


@dataclasses.dataclass(frozen=True)
class Match:
    """Ranks of one factorization matched to a parameter budget.

    Attributes
    ----------
    kind : str
        ``"cp"``, ``"tucker"``, ``"tt"`` or ``"tr"``.
    ranks : int or list of int
        As the layer class takes them: the CP ``rank``; Tucker per-mode
        ``ranks``; TT/TR bond ranks ``[r_0, ..., r_d]``.
    rank : int
        The family parameter ``r`` that was solved for (the CP rank, the
        uniform rank, or the input–output bond).
    params : int
        Parameters of the matched layer (gates included if counted).
    budget : int
        The budget in parameters.
    in_dim : int
        Input features ``I`` of the layer.
    out_dim : int
        Output features ``O`` of the layer.
    expert_dims : tuple of int
        Experts per level ``[N_1, ..., N_H]``.
    bias : bool
        Whether the layer has a bias row in its input mode.
    count_gates : bool
        Whether ``params`` counts the gates' ``I x N_h`` weights.
    bond_rank : int or None
        The fixed bond rank of the per-bond TT/TR rule (``None``: uniform).

    Examples
    --------
    >>> m = match_rank("cp", 768, 1000, [64], "linear")
    >>> m.ranks, m.params <= m.budget
    (392, True)
    """

    kind: str
    ranks: Any
    rank: int
    params: int
    budget: int
    in_dim: int
    out_dim: int
    expert_dims: tuple[int, ...]
    bias: bool = True
    count_gates: bool = True
    bond_rank: int | None = None

    def ranks_at(self, rank: int) -> Any:
        """The ranks of the same family at another family parameter ``rank`` (for sweeps).

        Examples
        --------
        >>> m = match_rank("tt", 64, 64, [8], 10_000)
        >>> m.ranks_at(m.rank) == m.ranks, m.ranks_at(2)
        (True, [1, 2, 2, 1])
        """
        dims = make_factorization("cp", self.in_dim, self.out_dim, self.expert_dims, 1, bias=self.bias).dims
        return _family(self.kind, dims, self.bond_rank)[0](check_positive_int(rank, "rank"))

    @property
    def fill(self) -> float:
        """``params / budget``, at most 1.

        Examples
        --------
        >>> 0 < match_rank("cp", 64, 64, [8], 10_000).fill <= 1
        True
        """
        return self.params / self.budget

    def factorization(self) -> Factorization:
        """The matched :class:`Factorization`.

        Examples
        --------
        >>> match_rank("tr", 64, 64, [8], 10_000).factorization().name
        'tr'
        """
        return make_factorization(self.kind, self.in_dim, self.out_dim, self.expert_dims, self.ranks, bias=self.bias)

    def cost(self, batch_size: int = 1, optimize: str = "auto") -> Cost:
        """The matched layer's :class:`~tensormoe.layers.accounting.Cost`.

        Examples
        --------
        >>> match_rank("tt", 64, 64, [8], 10_000).cost(batch_size=4).params <= 10_000
        True
        """
        return factorization_cost(
            self.factorization(), batch_size, bias=self.bias, count_gates=self.count_gates, optimize=optimize
        )

    def layer(self, **kwargs: Any) -> Any:
        """Build the matched layer; ``kwargs`` go to the layer class (``seed``, ``gate``, ...).

        Examples
        --------
        >>> layer = match_rank("tr", 16, 8, [32], 2000, bond_rank=2).layer(seed=1)
        >>> layer.factorization.bonds, layer.n_params
        ((2, 2, 27, 2), 1990)
        """
        if "bias" in kwargs and kwargs["bias"] != self.bias:
            raise ValueError(f"bias={kwargs['bias']!r} contradicts the match, made with bias={self.bias}")
        kwargs["bias"] = self.bias
        return make_layer(self.kind, self.in_dim, self.out_dim, list(self.expert_dims), self.ranks, **kwargs)


def _family(kind: str, dims: tuple[int, ...], bond_rank: int | None) -> tuple[Callable[[int], Any], int | None]:
    """The ranks for family parameter ``r``, and the largest ``r`` worth trying (``None``: no limit)."""
    d = len(dims)
    if kind == "cp":
        return (lambda r: r), None
    if kind == "tucker":
        return (lambda r: [min(r, n) for n in dims]), max(dims)
    ring = kind == "tr"
    if bond_rank is None:
        if ring:
            return (lambda r: [r] * (d + 1)), None
        return (lambda r: [1] + [r] * (d - 1) + [1]), None
    k = check_positive_int(bond_rank, "bond_rank")
    edge = k if ring else 1
    # bonds r_0 .. r_d; bond d-1 sits between the input core (d-2) and the output core (d-1)
    return (lambda r: [edge] + [k] * (d - 2) + [r] + [edge]), None


def minimum_params(
    kind: str,
    in_dim: int,
    out_dim: int,
    expert_dims: int | Sequence[int],
    *,
    bias: bool = True,
    count_gates: bool = True,
    bond_rank: int | None = None,
) -> int:
    """Parameters of the smallest layer of ``kind``'s family (``r = 1``): the least budget that can be met.

    Examples
    --------
    >>> minimum_params("cp", 768, 768, [64]) == (64 + 769 + 768) + 768 * 64
    True
    """
    return _params_of(kind, in_dim, out_dim, expert_dims, bias, count_gates, bond_rank)[0](1)


def _params_of(
    kind: str, in_dim: int, out_dim: int, expert_dims: Any, bias: bool, count_gates: bool, bond_rank: Any
) -> tuple[Callable[[int], int], Callable[[int], Any], int | None, tuple[int, ...]]:
    """Parameter count and ranks as functions of the family parameter, its upper limit, the expert dims."""
    if kind not in FACTORIZATIONS:
        raise ValueError(f"kind={kind!r} is not a factorization; expected one of {sorted(FACTORIZATIONS)}")
    if bond_rank is not None and kind not in ("tt", "tr"):
        raise ValueError(f"bond_rank applies to 'tt' and 'tr' only; got bond_rank={bond_rank!r} with kind={kind!r}")
    if not isinstance(count_gates, bool):
        raise TypeError(f"count_gates must be True or False; got {count_gates!r}")
    experts = parse_expert_dims(expert_dims)
    gates = gate_params(in_dim, experts) if count_gates else 0
    dims = make_factorization("cp", in_dim, out_dim, experts, 1, bias=bias).dims
    ranks_of, top = _family(kind, dims, bond_rank)

    def params(r: int) -> int:
        return make_factorization(kind, in_dim, out_dim, experts, ranks_of(r), bias=bias).n_params() + gates

    return params, ranks_of, top, experts


def match_rank(
    kind: str,
    in_dim: int,
    out_dim: int,
    expert_dims: int | Sequence[int],
    budget: float | str = "linear",
    *,
    bias: bool = True,
    count_gates: bool = True,
    bond_rank: int | None = None,
) -> Match:
    """The largest ranks of ``kind`` whose layer fits in ``budget`` parameters.

    See the module documentation for the rule of each factorization.

    Parameters
    ----------
    kind : {"cp", "tucker", "tt", "tr"}
        The factorization.
    in_dim : int
        Input features ``I`` of the layer.
    out_dim : int
        Output features ``O`` of the layer.
    expert_dims : int or sequence of int
        Experts per level ``[N_1, ..., N_H]``.
    budget : int, float or "linear"
        See :func:`resolve_budget`.
    bias : bool
        The layer has a per-expert bias (the input mode has ``in_dim + 1`` rows).
    count_gates : bool
        Charge the gates' ``in_dim * sum(N_h)`` parameters to the budget.
    bond_rank : int, optional
        TT/TR only: fix every bond but the input–output one at this rank and
        solve for that one (default: one uniform rank on every bond).

    Returns
    -------
    Match

    Raises
    ------
    ValueError
        If even the smallest ranks (all 1, or the fixed bonds) exceed the
        budget; the message names the minimum.

    Examples
    --------
    >>> match_rank("cp", 768, 768, [64], "linear").ranks
    338
    >>> match_rank("tucker", 768, 768, [64], "linear").ranks
    [64, 80, 80]
    >>> match_rank("tr", 768, 1000, [64], "linear", bond_rank=4).ranks
    [4, 4, 101, 4]
    """
    params, ranks_of, top, experts = _params_of(kind, in_dim, out_dim, expert_dims, bias, count_gates, bond_rank)
    total = resolve_budget(budget, in_dim, out_dim, experts, bias=bias)
    smallest = params(1)
    if smallest > total:
        where = f"in_dim={in_dim}, out_dim={out_dim}, expert_dims={list(experts)}"
        gate_note = f", gates included: {gate_params(in_dim, experts):,}" if count_gates else ""
        raise ValueError(
            f"budget={budget!r} ({total:,} parameters) is below the smallest {kind} layer for {where}: ranks "
            f"{ranks_of(1)!r} need {smallest:,} parameters{gate_note}; expected a budget of at least {smallest:,}"
        )
    # largest r with params(r) <= total; params is non-decreasing in r
    lo, hi = 1, top if top is not None else max(1, total)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if params(mid) <= total:
            lo = mid
        else:
            hi = mid - 1
    return Match(
        kind=kind,
        ranks=ranks_of(lo),
        rank=lo,
        params=params(lo),
        budget=total,
        in_dim=in_dim,
        out_dim=out_dim,
        expert_dims=experts,
        bias=bias,
        count_gates=count_gates,
        bond_rank=bond_rank,
    )


def match_ranks(
    in_dim: int,
    out_dim: int,
    expert_dims: int | Sequence[int],
    budget: float | str = "linear",
    *,
    kinds: Sequence[str] = KINDS,
    bias: bool = True,
    count_gates: bool = True,
    bond_rank: int | None = None,
) -> dict[str, Match]:
    """:func:`match_rank` for several factorizations at once.

    ``bond_rank`` applies to TT and TR only.

    Examples
    --------
    >>> matches = match_ranks(768, 768, [64], "linear")
    >>> {kind: m.ranks for kind, m in matches.items()}
    {'cp': 338, 'tucker': [64, 80, 80], 'tt': [1, 25, 25, 1], 'tr': [18, 18, 18, 18]}
    """
    if isinstance(kinds, str) or not isinstance(kinds, Sequence):
        raise TypeError(f"kinds must be a sequence of factorization names; got {kinds!r}")
    return {
        kind: match_rank(
            kind, in_dim, out_dim, expert_dims, budget, bias=bias, count_gates=count_gates,
            bond_rank=bond_rank if kind in ("tt", "tr") else None,
        )
        for kind in kinds
    }
