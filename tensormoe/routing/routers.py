"""Routers: which experts each input uses, after the mixture-of-experts literature.

A router maps inputs ``x[..., I]`` to the coefficients of one expert level.  In
the unified view of Liu, Blondel, Riquelme & Puigcerver ("Routers in Vision
Mixture of Experts", 2024) every router produces *dispatch* weights (what each
expert reads) and *combine* weights (how its output is mixed back); they differ
in which of them are sparse and who chooses:

* :class:`DenseRouter` -- every token weighs all ``N`` experts with softmax,
  1.5-entmax or sparsemax of its logits (the MMoE default: 1.5-entmax); dense
  weights ``[..., N]``.
* :class:`TopKRouter` -- token choice: each token keeps its ``k`` best experts
  (Shazeer et al. 2017 noisy top-k; Switch ``k=1``; GShard ``k=2``); sparse
  weights ``[..., k]`` with their expert ``indices``.
* :class:`ExpertChoiceRouter` -- each expert takes its ``c`` best tokens of the
  group, ``c = capacity_factor * T / N`` (Zhou et al. 2022); dense weights.
* :class:`SoftRouter` -- Soft MoE (Puigcerver et al. 2024): each slot reads a
  softmax mixture of the group's tokens, each token a softmax mixture of the
  slots; ``dispatch`` and combine weights ``[..., S]``.

Every router returns a :class:`~tensormoe.routing.Routing` with the auxiliary
outputs used to train routers (load balancing loss, z-loss, per-expert load);
groups, masks and the statistics are described in :mod:`tensormoe.routing.routing`.

All routers are written once against :mod:`tensormoe.frameworks`, so every backend
selects the same experts (ties go to the lower index everywhere).
"""

from __future__ import annotations

import copy
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..frameworks import Ops, get_ops
from ..validation import (
    check_array,
    check_choice,
    check_mask,
    check_params,
    check_positive_int,
    check_positive_real,
)
from . import gates as _gates
from .levels import draw_noise
from .routing import Routing, group_shape, ungroup, with_statistics

__all__ = [
    "ROUTERS",
    "DenseRouter",
    "ExpertChoiceRouter",
    "ProductKeyRouter",
    "Router",
    "SoftRouter",
    "TopKRouter",
    "get_router",
    "resolve_routers",
]


def _softplus(ops: Ops, x: Any) -> Any:
    """``log(1 + exp(x))`` without overflow."""
    xp = ops.xp
    return xp.clip(x, min=0.0) + xp.log1p(xp.exp(-xp.abs(x)))


def _check_rank(rank: Any) -> int | None:
    if rank is None:
        return None
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool):
        raise TypeError(f"rank must be a positive integer (the gate projections' rank) or None; "
                        f"got {rank!r} of type {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"rank must be a positive integer (the gate projections' rank) or None; got {rank!r}")
    return int(rank)


def _check_norm(norm: Any) -> Any:
    return check_choice(norm, "norm", list(_gates.NORMS))


#: what a token whose every slot was dropped outputs (:class:`TopKRouter`)
OVERFLOWS = ("zero", "pass-through")
#: the second-expert policies of top-2 routing (:class:`TopKRouter`)
SECOND_POLICIES = ("all", "none", "threshold", "random")
#: the weights of the pairs a :class:`ProductKeyRouter` selects
PRODUCT_KEY_SCORES = ("softmax", "relu")


def _per_mode(value: Any, argument: str, check: Any) -> tuple[Any, Any]:
    """``(training, eval)`` from one value for both modes or a pair, each checked by ``check(value, argument)``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{argument} must be one value or a pair (training, eval); got {value!r}")
        return check(value[0], f"{argument}[0]"), check(value[1], f"{argument}[1]")
    value = check(value, argument)
    return value, value


def _within_capacity(ops: Ops, indices: Any, asked: Any, cap: int, n_experts: int) -> Any:
    """``[G, T, k]`` booleans: the asked slots that find a place among their expert's ``cap``.

    Slot-major order (every token's slot 0, then every slot 1, ...), tokens in
    position order: each slot's place is its rank among the slots asking for the
    same expert, from a stable sort by expert (slots not asked sort last).
    """
    xp = ops.xp
    g, t, k = indices.shape
    keys = xp.where(asked, indices, xp.full_like(indices, n_experts))
    keys = xp.reshape(xp.permute_dims(keys, (0, 2, 1)), (g, k * t))  # slot-major
    rank = xp.argsort(xp.argsort(keys, axis=-1, stable=True), axis=-1)  # position of each slot in the sorted order
    counts = ops.scatter_add_last(keys, xp.ones_like(keys), n_experts + 1)
    starts = xp.cumulative_sum(counts, axis=-1) - counts
    place = rank - xp.take_along_axis(starts, keys, axis=-1)
    kept = (keys < n_experts) & (place < cap)
    return xp.permute_dims(xp.reshape(kept, (g, k, t)), (0, 2, 1))


class Router:
    """A router of one expert level (abstract).

    Subclasses implement :meth:`route`; parameters are declared by
    :meth:`param_shapes` (a layer stores them as ``{name}_{level}``, e.g.
    ``gate_0``) and drawn by :meth:`init`.

    Examples
    --------
    >>> router = get_router("top2")
    >>> router.param_shapes(in_dim=4, n_experts=8)
    {'gate': (4, 8), 'gate_noise': (4, 8)}
    """

    name: str = ""
    #: whether the router mixes tokens into slots (Soft MoE) instead of routing them
    soft: bool = False
    #: whether the router selects the experts of two levels together (:class:`ProductKeyRouter`)
    joint: bool = False
    #: std of the initial gate logits for inputs of unit variance; 0 starts the gate at
    #: zero (every expert equally likely, the MMoE's choice), a small value breaks the
    #: ties that make hard selection (top-k, expert choice) pick the lowest indices
    init_logit_std: float = 0.0
    #: rank of the low-rank gate projections (``None``: full ``[in_dim, M]`` matrices);
    #: set by the ``rank=`` argument of every router
    rank: int | None = None

    def _projections(self, in_dim: int, n_experts: int) -> dict[str, int]:
        """Columns ``M`` of every projection ``x @ P[in_dim, M]`` of the router, by name."""
        return {"gate": n_experts}

    def low_rank(self, in_dim: int, columns: int) -> bool:
        """Whether a projection ``[in_dim, columns]`` is stored as a low-rank product.

        True when the router has a ``rank`` below ``min(in_dim, columns)``; at or
        above it a product ``[in_dim, r] @ [r, columns]`` can express every
        ``[in_dim, columns]`` matrix, so the full matrix is kept: it is the same
        function class with fewer parameters and FLOPs.

        Examples
        --------
        >>> DenseRouter(rank=8).low_rank(64, 32), DenseRouter(rank=8).low_rank(64, 4), DenseRouter().low_rank(64, 32)
        (True, False, False)
        """
        return self.rank is not None and self.rank < min(in_dim, columns)

    def param_shapes(self, in_dim: int, n_experts: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the router's parameters, by name, for ``in_dim`` features and ``n_experts`` experts.

        Every projection ``P`` (``gate``; ``gate_noise`` of noisy top-k) is one
        matrix ``[in_dim, M]``, or, for a router with ``rank=r`` below
        ``min(in_dim, M)``, two factors ``P_down[in_dim, r]`` and ``P_up[r, M]``
        (:meth:`low_rank`).

        Examples
        --------
        >>> DenseRouter().param_shapes(4, 3), SoftRouter(slots_per_expert=2).param_shapes(4, 3)
        ({'gate': (4, 3)}, {'gate': (4, 6)})
        >>> DenseRouter(rank=2).param_shapes(8, 5)
        {'gate_down': (8, 2), 'gate_up': (2, 5)}
        """
        shapes: dict[str, tuple[int, ...]] = {}
        for name, columns in self._projections(in_dim, n_experts).items():
            if self.low_rank(in_dim, columns):
                shapes[f"{name}_down"] = (in_dim, self.rank)
                shapes[f"{name}_up"] = (self.rank, columns)
            else:
                shapes[name] = (in_dim, columns)
        return shapes

    def project(self, params: Mapping[str, Any], name: str, x: Any) -> Any:
        """``x @ params[name]``, or ``(x @ params[name_down]) @ params[name_up]`` for a low-rank projection.

        Which form is used follows the parameters given (their names come from
        :meth:`param_shapes`), so it is fixed when a function is traced.

        Examples
        --------
        >>> import numpy as np
        >>> down, up = np.ones((3, 1)), np.array([[1.0, 2.0]])
        >>> DenseRouter(rank=1).project({"gate_down": down, "gate_up": up}, "gate", np.eye(3)[:1])
        array([[1., 2.]])
        """
        if name in params:
            return x @ params[name]
        return (x @ params[f"{name}_down"]) @ params[f"{name}_up"]

    def init(self, in_dim: int, n_experts: int, rng: np.random.Generator | int | None = None) -> dict[str, np.ndarray]:
        """Float64 parameters: the gate ``N(0, (init_logit_std / sqrt(in_dim))**2)``, all others zero.

        A low-rank projection starts with the down factor ``N(0, 1 / in_dim)`` (so
        ``x @ P_down`` has unit variance for unit inputs) and the up factor
        ``N(0, (init_logit_std / sqrt(r))**2)`` for the gate, zero otherwise: its
        product starts like the full matrix would (zero logits for the dense
        routers), and the gradient reaches both factors (two zero factors would
        get none).

        Examples
        --------
        >>> float(abs(DenseRouter().init(4, 3)["gate"]).max()), bool(TopKRouter().init(4, 3, rng=0)["gate"].std() > 0)
        (0.0, True)
        >>> p = DenseRouter(rank=2).init(8, 5, rng=0)
        >>> bool(p["gate_down"].std() > 0), float(abs(p["gate_up"]).max())
        (True, 0.0)
        """
        rng = np.random.default_rng(0 if rng is None else rng)
        out = {}
        for name, shape in self.param_shapes(in_dim, n_experts).items():
            if name == "gate" and self.init_logit_std > 0:
                out[name] = rng.normal(0.0, self.init_logit_std / math.sqrt(in_dim), size=shape)
            elif name.endswith("_down"):
                out[name] = rng.normal(0.0, 1.0 / math.sqrt(in_dim), size=shape)
            elif name == "gate_up" and self.init_logit_std > 0:
                out[name] = rng.normal(0.0, self.init_logit_std / math.sqrt(shape[0]), size=shape)
            else:
                out[name] = np.zeros(shape)
        return out

    def check(self, n_experts: int) -> None:
        """Raise if the router cannot route ``n_experts`` experts.

        Examples
        --------
        >>> TopKRouter(k=2).check(8)
        >>> TopKRouter(k=2).check(1)
        Traceback (most recent call last):
        ...
        ValueError: k=2 exceeds the 1 experts of the level; expected k <= 1
        """

    def draws_uniform(self, training: bool) -> bool:
        """Whether the router needs one uniform draw per token in this mode (the ``"random"`` second-expert policy).

        Examples
        --------
        >>> TopKRouter(k=2, second_policy=("random", "all")).draws_uniform(True), DenseRouter().draws_uniform(True)
        (True, False)
        """
        return False

    @property
    def noisy(self) -> bool:
        """Whether the router draws noise in training mode.

        Examples
        --------
        >>> TopKRouter().noisy, TopKRouter(noise=None).noisy, DenseRouter().noisy
        (True, False, False)
        """
        return False

    def slots(self, n_experts: int) -> int | None:
        """Number of slots per group (Soft MoE), or ``None`` for routers that route tokens.

        Examples
        --------
        >>> SoftRouter(slots_per_expert=2).slots(3), TopKRouter().slots(3) is None
        (6, True)
        """
        return None

    def logits(self, ops: Ops, params: Mapping[str, Any], x: Any) -> Any:
        """``x @ gate`` (``(x @ gate_down) @ gate_up`` when low-rank), normalised when the router has a ``norm``.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> DenseRouter(norm=None).logits(get_ops("numpy"), {"gate": np.eye(2)}, np.array([[1.0, 2.0]]))
        array([[1., 2.]])
        """
        return _gates.normalise(getattr(self, "norm", None), self.project(params, "gate", x), ops)

    def route(self, ops: Ops, params: Mapping[str, Any], x: Any, mask: Any = None, noise: Any = None, *,
              uniform: Any = None, training: bool = False) -> Routing:
        """Route a grouped input ``x[G, T, I]``, without statistics (the layers' entry point).

        ``mask`` is ``None`` or a float array ``[G, T]`` of ones (tokens) and zeros
        (padding); ``noise`` is ``None`` or standard normal draws ``[G, T, N]``;
        ``uniform`` is ``None`` or uniform draws ``[G, T]`` (:meth:`draws_uniform`);
        ``training`` picks the training or the eval setting of routers that have
        both.  Subclasses implement this; :meth:`__call__` adds checks and statistics.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> r = TopKRouter(k=1).route(get_ops("numpy"), {"gate": np.eye(3)}, np.eye(3)[None])
        >>> r.indices[0, :, 0].tolist()
        [0, 1, 2]
        """
        raise NotImplementedError

    def __call__(
        self,
        params: Mapping[str, Any],
        x: Any,
        *,
        mask: Any = None,
        training: bool = False,
        rng: Any = None,
    ) -> Routing:
        """Route ``x[..., I]`` on the current backend, with the auxiliary outputs.

        Parameters
        ----------
        params : mapping of str to array
            The router's parameters, named as in :meth:`param_shapes`.
        x : array ``[..., I]``
        mask : array ``[...]`` of bool or 0/1, optional
            True (one) for real tokens, false (zero) for padding.
        training : bool
            Training mode: draw the router noise (noisy top-k; needs ``rng``) and
            use the training settings of routers that have two.
        rng : int, numpy.random.Generator, torch.Generator or JAX key, optional
            Source of the training noise and of the ``"random"`` second-expert
            policy's draws.  An integer seed or a NumPy generator draws in NumPy,
            so every backend gets the same numbers.

        Examples
        --------
        >>> import numpy as np
        >>> router = TopKRouter(k=2)
        >>> params = {k: np.eye(4, 6) for k in router.param_shapes(4, 6)}
        >>> r = router(params, np.array([[0.0, 3.0, 1.0, 2.0]]))
        >>> r.indices.tolist(), float(r.weights.sum())
        ([[1, 3]], 1.0)
        """
        ops = get_ops()
        x = check_array(x, ops, "x")
        in_dim = x.shape[-1]
        n = _n_experts_from(self, params, in_dim)
        self.check(n)
        check_params(params, self.param_shapes(in_dim, n), exact=False, backend=ops.name)
        lead = tuple(x.shape[:-1])
        g, t = group_shape(lead)
        grouped_mask = None if mask is None else ops.xp.reshape(check_mask(mask, ops, lead, x), (g, t))
        (draws,), _ = draw_noise(ops, [self], [n], g, t, rng, like=x, training=training)
        grouped = ops.xp.reshape(x, (g, t, in_dim))
        routing = self.route(ops, params, grouped, grouped_mask, draws.normal, uniform=draws.uniform,
                             training=training)
        return ungroup(ops, with_statistics(ops, routing, grouped_mask, n), lead)

    #: attributes left out of the repr when they hold these values
    _defaults: dict[str, Any] = {"rank": None}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                           if not (k in self._defaults and v == self._defaults[k]))
        return f"{type(self).__name__}({fields})"


class DenseRouter(Router):
    """Every token weighs every expert: ``activation(norm(x @ gate))``.

    The MMoE's own gating (Oldfield et al. 2024); with ``"entmax15"`` or
    ``"sparsemax"`` many coefficients are exactly zero, but the contraction still
    runs over all ``N`` experts.

    Parameters
    ----------
    activation : {"entmax15", "softmax", "sparsemax"}
        The map from logits to the simplex (:mod:`tensormoe.routing.gates`).
    norm : {"layernorm", None}
        Normalisation of the logits first.
    rank : int, optional
        Rank of a low-rank gate ``gate_down[I, r] @ gate_up[r, N]`` (default: one
        full ``[I, N]`` matrix); see :meth:`Router.low_rank`.

    Examples
    --------
    >>> import numpy as np
    >>> r = DenseRouter("softmax", norm=None)({"gate": np.zeros((3, 4))}, np.ones((2, 3)))
    >>> r.weights.tolist()[0], float(r.load_balancing_loss)
    ([0.25, 0.25, 0.25, 0.25], 1.0)
    """

    def __init__(self, activation: str = "entmax15", norm: str | None = "layernorm", rank: int | None = None) -> None:
        if activation not in _gates.ACTIVATIONS:
            raise ValueError(
                f"activation={activation!r} is not a gate activation; expected one of {sorted(_gates.ACTIVATIONS)}"
            )
        self.activation = activation
        self.norm = _check_norm(norm)
        self.rank = _check_rank(rank)
        self.name = activation

    def route(self, ops: Ops, params: Mapping[str, Any], x: Any, mask: Any = None, noise: Any = None, *,
              uniform: Any = None, training: bool = False) -> Routing:
        logits = self.logits(ops, params, x)
        weights = _gates.activate(self.activation, logits, ops)
        if mask is not None:
            weights = weights * mask[..., None]
        return Routing(weights=weights, probs=weights, logits=logits)


class TopKRouter(Router):
    """Token choice: each token keeps its ``k`` most likely experts (noisy top-k gating).

    ``logits = x @ gate (+ noise * softplus(x @ gate_noise) in training)``; the
    ``k`` largest are kept, weighted by their softmax probabilities.  The layer
    then contracts only those ``k`` rows of the expert factors.  The gate starts
    near zero (logit std ``0.01`` for unit inputs) and the noise weights at zero
    (noise std ``softplus(0) = 0.69``), as Shazeer et al. did.

    Parameters
    ----------
    k : int
        Experts per token (1: Switch Transformer; 2: GShard).
    noise : "learned", float or None
        Training noise on the logits: ``"learned"`` (default) is Shazeer et al.'s
        tunable Gaussian noise with std ``softplus(x @ gate_noise)`` (an extra
        parameter ``gate_noise``); a float is a fixed std; ``None`` or ``0`` none.
        Noise is drawn only in training mode, from an explicit ``rng``.
    renormalize : bool, optional
        Rescale the kept probabilities to sum to one (Shazeer, GShard, Mixtral).
        Default: ``k > 1``.  With ``k = 1`` the weight stays the expert's
        probability, as in Switch, so the router still receives gradients.
    norm : {None, "layernorm"}
        Normalisation of the logits (default none, as in the papers).
    rank : int, optional
        Rank of low-rank projections ``P_down[I, r] @ P_up[r, N]`` for the gate
        and the learned noise (default: full ``[I, N]`` matrices).
    capacity_factor : float, (float, float) or None
        Places of each expert in a group of ``T`` tokens:
        ``C = max(min_capacity, min(T, floor(T * capacity_factor / N)))``
        (:meth:`capacity`), shared by all ``k`` slots (there is no factor ``k``:
        for ``k`` places per token on average, multiply the factor by ``k``).  A
        pair is ``(training, eval)``.  Default ``None``: no capacity, nothing is
        dropped.  Slots take places slot by slot (every token's first choice,
        then every second choice, ...), tokens in position order; a slot that
        finds its expert full is dropped (weight 0, no renormalisation).
    min_capacity : int
        The least capacity ``C`` (4, as in the ``mixture-of-experts`` package).
    overflow : {"zero", "pass-through"}
        The output of a token whose every slot was dropped: zero, or its input
        (Switch's residual, which needs ``in_dim == out_dim``; the layer adds it).
    second_policy : {"all", "none", "threshold", "random"} or a pair of them
        ``k = 2`` only (GShard): whether a token uses its second expert.
        ``"all"`` always (default), ``"none"`` never, ``"threshold"`` when its
        weight ``w2`` (renormalised, as the first) exceeds ``second_threshold``,
        ``"random"`` when a uniform draw ``u < w2 / second_threshold``, so with
        probability ``min(1, w2 / second_threshold)``; ``"random"`` needs ``rng=``
        in whichever mode uses it.  A pair is ``(training, eval)``.  The first
        weight is not renormalised when the second slot goes.
    second_threshold : float or (float, float)
        The threshold of the ``"threshold"`` and ``"random"`` policies (0.2).

    Examples
    --------
    >>> import numpy as np
    >>> router = TopKRouter(k=1, noise=None)
    >>> r = router({"gate": np.eye(3)}, np.array([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]]))
    >>> r.indices.tolist(), r.load.tolist()
    ([[1], [0]], [0.5, 0.5, 0.0])

    One place per expert: the third token wants expert 0 too, which is full.

    >>> capped = TopKRouter(k=1, noise=None, capacity_factor=1.0, min_capacity=1)
    >>> r = capped({"gate": np.eye(2)}, np.array([[3.0, 0.0], [0.0, 3.0], [2.0, 0.0]]))
    >>> r.kept[:, 0].tolist(), float(r.dropped_tokens), float(r.over_capacity)
    ([1.0, 1.0, 0.0], 1.0, 1.0)
    """

    def __init__(self, k: int = 1, noise: str | float | None = "learned", renormalize: bool | None = None,
                 norm: str | None = None, rank: int | None = None, *, capacity_factor: Any = None,
                 min_capacity: int = 4, overflow: str = "zero", second_policy: Any = "all",
                 second_threshold: Any = 0.2) -> None:
        if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer (experts per token); got {k!r}")
        self.k = int(k)
        if noise is not None and noise != "learned":
            if not isinstance(noise, numbers.Real) or isinstance(noise, bool) or not noise >= 0 or not math.isfinite(noise):
                raise ValueError(f"noise must be 'learned', a non-negative float std, or None; got {noise!r}")
            noise = float(noise) or None
        self.noise = noise
        if renormalize is not None and not isinstance(renormalize, bool):
            raise TypeError(f"renormalize must be True, False or None; got {renormalize!r}")
        self.renormalize = self.k > 1 if renormalize is None else renormalize
        self.norm = _check_norm(norm)
        self.rank = _check_rank(rank)
        self.capacity_factor = None if capacity_factor is None else _per_mode(
            capacity_factor, "capacity_factor", lambda v, a: check_positive_real(v, a))
        self.min_capacity = check_positive_int(min_capacity, "min_capacity")
        self.overflow = check_choice(overflow, "overflow", OVERFLOWS)
        self.second_policy = _per_mode(second_policy, "second_policy",
                                       lambda v, a: check_choice(v, a, SECOND_POLICIES))
        self.second_threshold = _per_mode(second_threshold, "second_threshold",
                                          lambda v, a: check_positive_real(v, a, allow_zero=True))
        if self.k != 2 and self.second_policy != ("all", "all"):
            raise ValueError(f"second_policy={second_policy!r} needs k=2 (a second expert to keep or drop); "
                             f"got k={self.k}: use second_policy='all' or k=2")
        self.name = f"top{self.k}"

    init_logit_std = 1e-2
    _defaults = {**Router._defaults, "capacity_factor": None, "min_capacity": 4, "overflow": "zero",
                 "second_policy": ("all", "all"), "second_threshold": (0.2, 0.2)}

    @property
    def drops(self) -> bool:
        """Whether the router can leave selected slots unused (a capacity or a second-expert policy).

        Its routings then carry ``kept``, ``dropped_tokens`` and ``over_capacity``.

        Examples
        --------
        >>> TopKRouter(k=2).drops, TopKRouter(k=2, second_policy="none").drops, TopKRouter(capacity_factor=1.0).drops
        (False, True, True)
        """
        return self.capacity_factor is not None or self.second_policy != ("all", "all")

    def capacity(self, n_tokens: int, n_experts: int, training: bool = False) -> int | None:
        """Places of each expert in a group of ``n_tokens``; ``None`` without a capacity factor.

        ``max(min_capacity, min(T, floor(T * capacity_factor / N)))`` with the
        factor of the mode (``training`` or eval), evaluated as the
        ``mixture-of-experts`` package does.

        Examples
        --------
        >>> router = TopKRouter(k=2, capacity_factor=(1.25, 2.0))
        >>> router.capacity(1024, 16, training=True), router.capacity(1024, 16), router.capacity(8, 16)
        (80, 128, 4)
        """
        if self.capacity_factor is None:
            return None
        factor = self.capacity_factor[0 if training else 1]
        return max(self.min_capacity, min(n_tokens, math.floor((n_tokens * factor) / n_experts)))

    def draws_uniform(self, training: bool) -> bool:
        return self.second_policy[0 if training else 1] == "random"

    def _projections(self, in_dim: int, n_experts: int) -> dict[str, int]:
        out = {"gate": n_experts}
        if self.noise == "learned":
            out["gate_noise"] = n_experts
        return out

    def check(self, n_experts: int) -> None:
        if self.k > n_experts:
            raise ValueError(f"k={self.k} exceeds the {n_experts} experts of the level; expected k <= {n_experts}")

    @property
    def noisy(self) -> bool:
        return self.noise is not None

    def route(self, ops: Ops, params: Mapping[str, Any], x: Any, mask: Any = None, noise: Any = None, *,
              uniform: Any = None, training: bool = False) -> Routing:
        logits = self.logits(ops, params, x)
        if noise is not None:
            std = _softplus(ops, self.project(params, "gate_noise", x)) if self.noise == "learned" else self.noise
            logits = logits + noise * std
        probs = _gates.softmax(logits, ops=ops)
        _, indices = ops.top_k(logits, self.k)
        xp = ops.xp
        weights = xp.take_along_axis(probs, indices, axis=-1)
        if self.renormalize:
            weights = weights / xp.sum(weights, axis=-1, keepdims=True)
        if not self.drops:
            if mask is not None:
                weights = weights * mask[..., None]
            return Routing(weights=weights, indices=indices, probs=probs, logits=logits)
        asked = self._asked(ops, weights, mask, uniform, training)
        cap = self.capacity(x.shape[1], probs.shape[-1], training)
        kept = asked if cap is None else _within_capacity(ops, indices, asked, cap, probs.shape[-1])
        over = xp.sum(xp.astype(asked, weights.dtype) - xp.astype(kept, weights.dtype))
        kept = xp.astype(kept, weights.dtype)
        return Routing(weights=weights * kept, indices=indices, probs=probs, logits=logits, kept=kept,
                       over_capacity=over)

    def _asked(self, ops: Ops, weights: Any, mask: Any, uniform: Any, training: bool) -> Any:
        """``[G, T, k]`` booleans: the slots that a real token uses after the second-expert policy."""
        xp = ops.xp
        asked = xp.ones(weights.shape, dtype=xp.bool, device=ops.device(weights))
        policy = self.second_policy[0 if training else 1]
        threshold = self.second_threshold[0 if training else 1]
        if policy != "all":
            second = weights[..., 1]
            if policy == "none":
                keep = xp.zeros(second.shape, dtype=xp.bool, device=ops.device(weights))
            elif policy == "threshold":
                keep = second > threshold
            else:
                if uniform is None:
                    raise ValueError(f"second_policy={policy!r} draws a uniform number per token and needs rng=; got "
                                     "None (an integer seed, a numpy.random.Generator, a torch.Generator or a JAX key)")
                keep = uniform < second / max(threshold, 1e-9)
            asked = xp.stack([asked[..., 0], keep], axis=-1)
        if mask is not None:
            asked = asked & (mask[..., None] > 0)
        return asked


class ExpertChoiceRouter(Router):
    """Expert choice: each expert takes the ``c`` tokens of the group it scores highest.

    Token-to-expert scores are the softmax of ``x @ gate`` over experts; expert
    ``e`` takes the top ``c = ceil(capacity_factor * T / N)`` tokens of its
    column (Zhou et al. 2022), weighted by their scores.  Loads are balanced by
    construction; a token may be taken by several experts or by none
    (``Routing.dropped``).  The weights are dense ``[..., N]`` (zero where not
    chosen), so the contraction runs over all ``N`` experts.

    Parameters
    ----------
    capacity_factor : float
        Average number of experts per token (default 2, as in the paper).
    norm : {None, "layernorm"}
        Normalisation of the logits.
    rank : int, optional
        Rank of a low-rank gate ``gate_down[I, r] @ gate_up[r, N]`` (default: full).

    Examples
    --------
    >>> import numpy as np
    >>> router = ExpertChoiceRouter(capacity_factor=1.0)
    >>> x = np.array([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    >>> r = router({"gate": np.eye(2)}, x)
    >>> (r.weights > 0).astype(int).tolist()
    [[1, 0], [1, 0], [0, 1], [0, 1]]
    """

    def __init__(self, capacity_factor: float = 2.0, norm: str | None = None, rank: int | None = None) -> None:
        if (not isinstance(capacity_factor, numbers.Real) or isinstance(capacity_factor, bool)
                or not capacity_factor > 0 or not math.isfinite(capacity_factor)):
            raise ValueError(f"capacity_factor must be a positive number; got {capacity_factor!r}")
        self.capacity_factor = float(capacity_factor)
        self.norm = _check_norm(norm)
        self.rank = _check_rank(rank)
        self.name = "expert_choice"

    init_logit_std = 1e-2

    def capacity(self, n_tokens: int, n_experts: int) -> int:
        """Tokens per expert in a group of ``n_tokens``: ``ceil(capacity_factor * T / N)``, within ``[1, T]``.

        Examples
        --------
        >>> ExpertChoiceRouter(2.0).capacity(64, 16)
        8
        """
        return min(n_tokens, max(1, math.ceil(self.capacity_factor * n_tokens / n_experts - 1e-9)))

    def route(self, ops: Ops, params: Mapping[str, Any], x: Any, mask: Any = None, noise: Any = None, *,
              uniform: Any = None, training: bool = False) -> Routing:
        logits = self.logits(ops, params, x)
        probs = _gates.softmax(logits, ops=ops)
        n_tokens, n_experts = probs.shape[-2], probs.shape[-1]
        xp = ops.xp
        scores = probs if mask is None else xp.where(mask[..., None] > 0, probs, probs - 2)
        _, tokens = ops.top_k(xp.matrix_transpose(scores), self.capacity(n_tokens, n_experts))  # [G, N, c]
        chosen = xp.take_along_axis(xp.matrix_transpose(probs), tokens, axis=-1)
        weights = xp.matrix_transpose(ops.scatter_add_last(tokens, chosen, n_tokens))
        if mask is not None:
            weights = weights * mask[..., None]
        return Routing(weights=weights, probs=probs, logits=logits)


class SoftRouter(Router):
    """Soft MoE: experts process slots, soft mixtures of the group's tokens.

    With logits ``z = x @ gate`` over ``S = N * slots_per_expert`` slots, each
    slot reads ``sum_t dispatch[t, s] x_t`` (``dispatch``: softmax of ``z`` over
    the tokens of the group), expert ``s // slots_per_expert`` transforms it, and
    each token's output is ``sum_s combine[t, s] y_s`` (``combine``: softmax over
    the slots) (Puigcerver et al. 2024).  Nothing is dropped and loads are equal
    by construction.  In a hierarchical layer the other levels route the slots.

    Parameters
    ----------
    slots_per_expert : int
        Slots ``p`` of each expert.
    rank : int, optional
        Rank of a low-rank slot projection ``gate_down[I, r] @ gate_up[r, S]``
        (default: full ``[I, S]``).

    Examples
    --------
    >>> import numpy as np
    >>> r = SoftRouter()({"gate": np.zeros((3, 2))}, np.ones((5, 3)))
    >>> r.dispatch.shape, r.dispatch.sum(0).tolist(), r.weights.sum(-1).tolist()
    ((5, 2), [1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    """

    def __init__(self, slots_per_expert: int = 1, rank: int | None = None) -> None:
        if not isinstance(slots_per_expert, numbers.Integral) or isinstance(slots_per_expert, bool) or slots_per_expert < 1:
            raise ValueError(f"slots_per_expert must be a positive integer; got {slots_per_expert!r}")
        self.slots_per_expert = int(slots_per_expert)
        self.rank = _check_rank(rank)
        self.name = "soft"

    soft = True
    init_logit_std = 1e-2

    def _projections(self, in_dim: int, n_experts: int) -> dict[str, int]:
        return {"gate": n_experts * self.slots_per_expert}

    def slots(self, n_experts: int) -> int:
        return n_experts * self.slots_per_expert

    def route(self, ops: Ops, params: Mapping[str, Any], x: Any, mask: Any = None, noise: Any = None, *,
              uniform: Any = None, training: bool = False) -> Routing:
        logits = self.project(params, "gate", x)  # [G, T, S]
        combine = _gates.softmax(logits, ops=ops)
        xp = ops.xp
        by_slot = xp.matrix_transpose(logits)  # [G, S, T]
        if mask is None:
            e = xp.exp(by_slot - xp.max(by_slot, axis=-1, keepdims=True))
        else:
            valid = mask[:, None, :]
            # shift by the largest logit of a real token: sum(e) >= 1 whenever the group has one,
            # and padding (whatever its logits) neither overflows nor counts
            lowest = -xp.max(-by_slot, axis=-1, keepdims=True)
            top = xp.max(xp.where(valid > 0, by_slot, lowest), axis=-1, keepdims=True)
            e = xp.exp(-xp.clip(top - by_slot, min=0.0)) * valid
            combine = combine * mask[..., None]
        dispatch = xp.matrix_transpose(e / xp.clip(xp.sum(e, axis=-1, keepdims=True), min=1.0))
        g, t, s = combine.shape
        probs = xp.sum(xp.reshape(combine, (g, t, s // self.slots_per_expert, self.slots_per_expert)), axis=-1)
        return Routing(weights=combine, dispatch=dispatch, probs=probs, logits=logits)


class ProductKeyRouter(Router):
    """Product-key retrieval over two expert levels ``[n, n]``: a joint top-k of ``N = n * n`` experts.

    The PKM / PEER router (Lample et al. 2019; He 2024).  Expert ``e = i * n + j``
    is the pair of sub-key ``i`` of level 0 and sub-key ``j`` of level 1 (the
    major and minor modes of ``W[n, n, I, O]``), scored ``s_0[i] + s_1[j]`` with
    ``s_l[i] = (x @ query_l)[head] . keys_l[head, i]``.  Per token and head:

    1. each level's ``k_half`` best sub-keys (ties: the lower index), put back in
       index order;
    2. the ``k_half ** 2`` candidate sums, whose flattened order is then the
       expert order;
    3. their ``k`` largest (ties: the lower expert), weighted by ``softmax`` over
       the ``k`` sums, or by ``relu`` of each sum.

    This equals the top-``k`` of all ``N`` sums (the pairs of the global top-k
    are among the candidates as ``k <= k_half``) at a cost of ``2 n`` sub-key
    scores per head, not ``n * n``.  ``heads`` retrievals with their own queries
    and sub-keys run side by side; their ``heads * k`` slots (head-major) all
    feed the same contraction, so their outputs add up.  Both levels' routings
    hold the same weights; level 0's indices are the ``i``, level 1's the ``j``
    of each slot, and each level's ``to_dense`` is that level's marginal.

    Parameters
    ----------
    k : int
        Experts per token and head.
    heads : int
        Independent retrievals whose outputs are summed (PEER's heads).
    key_dim : int, optional
        Width of the queries and sub-keys (default ``in_dim // 2``, as PEER).
    k_half : int, optional
        Sub-keys kept per level before the joint top-k; ``k <= k_half <= n``
        (default ``k``).
    score : {"softmax", "relu"}
        The weights of the ``k`` selected pairs of a head: softmax over their sums
        (PKM) or ``relu`` of each (PEER-pytorch's default, with ``k = 1``).
    query_norm : None
        Normalisation of the queries.  Only ``None`` for now: batch-normalised
        queries (PKM) need running statistics, and tensormoe's layers hold no
        state besides their parameters yet.
    rank : int, optional
        Rank of low-rank query projections ``query_down[I, r] @ query_up[r, heads * key_dim]``.

    Notes
    -----
    Parameters per level ``l`` (a layer stores them as ``query_l`` and
    ``keys_l``): ``query [I, heads * key_dim]``, column ``head * key_dim + c``,
    drawn ``N(0, 1 / I)``; ``keys [heads, n, key_dim]``, drawn ``N(0, 0.02**2)``
    as in PEER.  From PEER-pytorch: ``query_0 = to_queries.weight[:h*d].T``,
    ``query_1 = to_queries.weight[h*d:].T``, ``keys_l = keys[:, :, l]``.  The
    statistics (``load``, ``importance``) of each level are those of its marginal;
    nothing is ever dropped.

    Examples
    --------
    >>> import numpy as np
    >>> router = ProductKeyRouter(k=2, key_dim=1)
    >>> one = np.ones((1, 1))
    >>> params = [{"query": one, "keys": np.array([1.0, 3.0]).reshape(1, 2, 1)},
    ...           {"query": one, "keys": np.array([2.0, 0.0]).reshape(1, 2, 1)}]
    >>> first, second = router(params, one)
    >>> first.indices.tolist(), second.indices.tolist(), first.weights.round(3).tolist()
    ([[1, 0]], [[0, 0]], [[0.881, 0.119]])

    The pairs ``(1, 0)`` (score 3 + 2) and ``(0, 0)`` (1 + 2, which ties with
    ``(1, 1)``, 3 + 0, and goes to the lower expert ``0 < 3``).
    """

    #: routes two levels at once (:meth:`route_joint`)
    joint = True
    _defaults = {**Router._defaults, "key_dim": None, "query_norm": None}

    def __init__(self, k: int = 16, heads: int = 1, key_dim: int | None = None, k_half: int | None = None,
                 score: str = "softmax", query_norm: str | None = None, rank: int | None = None) -> None:
        self.k = check_positive_int(k, "k")
        self.heads = check_positive_int(heads, "heads")
        self.key_dim = None if key_dim is None else check_positive_int(key_dim, "key_dim")
        self.k_half = self.k if k_half is None else check_positive_int(k_half, "k_half")
        if self.k_half < self.k:
            raise ValueError(f"k_half={self.k_half} must be at least k={self.k} (the candidates must hold the "
                             "joint top-k); expected k <= k_half <= n")
        self.score = check_choice(score, "score", PRODUCT_KEY_SCORES)
        if query_norm is not None:
            raise ValueError(f"query_norm={query_norm!r} is not available yet: batch-normalised queries need running "
                             "statistics, and tensormoe's layers hold no state besides their parameters; expected None")
        self.query_norm = None
        self.rank = _check_rank(rank)
        self.name = "product_keys"

    def width(self, in_dim: int) -> int:
        """``key_dim``, or its default ``max(1, in_dim // 2)``.

        Examples
        --------
        >>> ProductKeyRouter().width(256), ProductKeyRouter(key_dim=8).width(256)
        (128, 8)
        """
        return self.key_dim if self.key_dim is not None else max(1, in_dim // 2)

    def _projections(self, in_dim: int, n_experts: int) -> dict[str, int]:
        return {"query": self.heads * self.width(in_dim)}

    def param_shapes(self, in_dim: int, n_experts: int) -> dict[str, tuple[int, ...]]:
        """One level's parameters: the query projection and the sub-keys ``[heads, n, key_dim]``.

        Examples
        --------
        >>> ProductKeyRouter(k=2, heads=3).param_shapes(8, 5)
        {'query': (8, 12), 'keys': (3, 5, 4)}
        """
        return {**super().param_shapes(in_dim, n_experts), "keys": (self.heads, n_experts, self.width(in_dim))}

    def init(self, in_dim: int, n_experts: int, rng: np.random.Generator | int | None = None) -> dict[str, np.ndarray]:
        """Float64 parameters of one level: queries ``N(0, 1 / in_dim)``, sub-keys ``N(0, 0.02**2)``.

        A low-rank query starts with ``query_down`` ``N(0, 1 / in_dim)`` and
        ``query_up`` ``N(0, 1 / r)``.

        Examples
        --------
        >>> p = ProductKeyRouter(k=2).init(8, 5, rng=0)
        >>> sorted(p), bool(0.01 < p["keys"].std() < 0.04)
        (['keys', 'query'], True)
        """
        rng = np.random.default_rng(0 if rng is None else rng)
        out = {}
        for name, shape in self.param_shapes(in_dim, n_experts).items():
            std = 0.02 if name == "keys" else 1.0 / math.sqrt(shape[0])
            out[name] = rng.normal(0.0, std, size=shape)
        return out

    def check(self, n_experts: int) -> None:
        if not self.k <= self.k_half <= n_experts:
            raise ValueError(f"k={self.k} and k_half={self.k_half} need k <= k_half <= n, the {n_experts} sub-keys "
                             f"of a level; expected k_half <= {n_experts}")

    def check_levels(self, expert_dims: Sequence[int]) -> None:
        """Raise unless ``expert_dims`` is two equal levels ``[n, n]`` that fit ``k`` and ``k_half``.

        Examples
        --------
        >>> ProductKeyRouter(k=2).check_levels([4, 3])
        Traceback (most recent call last):
        ...
        ValueError: a ProductKeyRouter routes two expert levels of equal size [n, n]; got expert_dims=[4, 3]
        """
        dims = list(expert_dims)
        if len(dims) != 2 or dims[0] != dims[1]:
            raise ValueError(f"a ProductKeyRouter routes two expert levels of equal size [n, n]; got expert_dims={dims}")
        self.check(dims[0])

    def route(self, ops: Ops, params: Mapping[str, Any], x: Any, mask: Any = None, noise: Any = None, *,
              uniform: Any = None, training: bool = False) -> Routing:
        raise TypeError("a ProductKeyRouter selects two levels together: call route_joint (or the router itself)")

    def scores(self, ops: Ops, params: Mapping[str, Any], x: Any) -> Any:
        """Sub-key scores ``[..., heads, n]`` of one level for inputs ``x[..., I]``.

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> p = {"query": np.eye(2), "keys": np.array([[[1.0], [2.0]], [[0.0], [-1.0]]])}
        >>> ProductKeyRouter(k=1, heads=2, key_dim=1).scores(get_ops("numpy"), p, np.array([[3.0, 5.0]])).tolist()
        [[[3.0, 6.0], [0.0, -5.0]]]
        """
        xp = ops.xp
        s = self._head_scores(ops, params, x)  # [h, R, n]
        return xp.reshape(xp.permute_dims(s, (1, 0, 2)), (*x.shape[:-1], *s.shape[::2]))

    def _head_scores(self, ops: Ops, params: Mapping[str, Any], x: Any) -> Any:
        """Scores ``[heads, R, n]`` of the rows of ``x`` (heads first: the batched product's own layout)."""
        xp = ops.xp
        keys = params["keys"]
        heads, _, width = keys.shape
        q = xp.reshape(self.project(params, "query", x), (-1, heads, width))  # [R, h, d]
        return xp.matmul(xp.permute_dims(q, (1, 0, 2)), xp.matrix_transpose(keys))

    def route_joint(self, ops: Ops, params: Sequence[Mapping[str, Any]], x: Any, mask: Any = None, *,
                    training: bool = False, statistics: bool = True) -> tuple[Routing, Routing]:
        """Route a grouped input ``x[G, T, I]`` over both levels: ``(level 0, level 1)`` without statistics.

        ``params`` holds each level's parameters; ``mask`` is as in :meth:`Router.route`.
        ``statistics=False`` leaves out ``probs`` and ``logits`` (a softmax over
        every sub-key, and the scores, which only the statistics read).

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> router = ProductKeyRouter(k=1, key_dim=1)
        >>> p = [{"query": np.ones((1, 1)), "keys": np.array([[[0.0], [1.0]]])}] * 2
        >>> first, second = router.route_joint(get_ops("numpy"), p, np.ones((1, 1, 1)))
        >>> first.indices.tolist(), second.indices.tolist(), first.weights.tolist()
        ([[[1]]], [[[1]]], [[[1.0]]])
        """
        xp = ops.xp
        lead = tuple(x.shape[:-1])
        s0, s1 = (self._head_scores(ops, p, x) for p in params)  # [h, R, n]: top-k along the last axis
        kh = self.k_half

        def best(s: Any) -> tuple[Any, Any]:
            _, index = ops.top_k(s, kh)
            index = xp.sort(index, axis=-1)  # back in index order: the candidates then run in expert order
            return index, xp.take_along_axis(s, index, axis=-1)

        i, c0 = best(s0)
        j, c1 = best(s1)
        heads, rows = c0.shape[:2]
        sums = xp.reshape(c0[..., :, None] + c1[..., None, :], (heads, rows, kh * kh))
        top, pick = ops.top_k(sums, self.k)
        first = xp.take_along_axis(i, pick // kh, axis=-1)
        second = xp.take_along_axis(j, pick % kh, axis=-1)
        weights = _gates.softmax(top, ops=ops) if self.score == "softmax" else xp.clip(top, min=0.0)

        def slots(a: Any) -> Any:  # [h, R, k] -> [*lead, h * k], head-major
            return xp.reshape(xp.permute_dims(a, (1, 0, 2)), (*lead, heads * self.k))

        weights = slots(weights)
        if mask is not None:
            weights = weights * mask[..., None]
        out = []
        for s, index in ((s0, first), (s1, second)):
            probs = logits = None
            if statistics:
                probs = xp.reshape(xp.mean(_gates.softmax(s, ops=ops), axis=0), (*lead, s.shape[-1]))
                logits = xp.reshape(xp.permute_dims(s, (1, 0, 2)), (*lead, heads * s.shape[-1]))
            out.append(Routing(weights=weights, indices=slots(index), probs=probs, logits=logits))
        return out[0], out[1]

    def __call__(  # type: ignore[override]
        self,
        params: Sequence[Mapping[str, Any]],
        x: Any,
        *,
        mask: Any = None,
        training: bool = False,
        rng: Any = None,
    ) -> tuple[Routing, Routing]:
        """Route ``x[..., I]`` over both levels, with the auxiliary outputs: ``(level 0, level 1)``.

        ``params`` is a pair of mappings, each level's parameters named as in
        :meth:`param_shapes` (what :meth:`init` gives); the rest is as in
        :meth:`Router.__call__` (the router draws nothing).

        Examples
        --------
        >>> import numpy as np
        >>> router = ProductKeyRouter(k=3, heads=2)
        >>> params = [router.init(6, 4, rng=0), router.init(6, 4, rng=1)]
        >>> first, second = router(params, np.random.default_rng(2).normal(size=(5, 6)))
        >>> first.indices.shape, bool(np.allclose(first.weights.sum(-1), 2.0)), float(first.dropped)
        ((5, 6), True, 0.0)
        """
        ops = get_ops()
        x = check_array(x, ops, "x")
        in_dim = x.shape[-1]
        if isinstance(params, Mapping) or not isinstance(params, Sequence) or len(params) != 2:
            raise ValueError("params must be a pair of mappings, the parameters of level 0 and of level 1 (each as "
                             f"ProductKeyRouter.init gives them); got {type(params).__name__}")
        dims = []
        for level, p in enumerate(params):
            keys = p.get("keys") if isinstance(p, Mapping) else None
            if getattr(keys, "ndim", 0) != 3:
                raise ValueError(f"params[{level}] must hold 'keys', an array [heads, n, key_dim]; got "
                                 f"{None if keys is None else list(getattr(keys, 'shape', []))}")
            dims.append(keys.shape[1])
            check_params(p, self.param_shapes(in_dim, keys.shape[1]), exact=False, backend=ops.name)
        self.check_levels(dims)
        lead = tuple(x.shape[:-1])
        g, t = group_shape(lead)
        grouped_mask = None if mask is None else ops.xp.reshape(check_mask(mask, ops, lead, x), (g, t))
        routings = self.route_joint(ops, params, ops.xp.reshape(x, (g, t, in_dim)), grouped_mask, training=training)
        return tuple(ungroup(ops, with_statistics(ops, r, grouped_mask, n), lead)  # type: ignore[return-value]
                     for r, n in zip(routings, dims))


# -- names ---------------------------------------------------------------------------

ROUTERS = ("entmax15", "softmax", "sparsemax", "top1", "top2", "top<k>", "gshard", "expert_choice", "soft",
           "product_keys")
"""Router names accepted by :func:`get_router` (``"top<k>"`` for any ``k``).

Examples
--------
>>> [get_router(name).name for name in ("top2", "expert_choice", "soft", "product_keys")]
['top2', 'expert_choice', 'soft', 'product_keys']
"""


def get_router(spec: str | Router, gate_norm: str | None = "layernorm", rank: int | None = None) -> Router:
    """A :class:`Router` from a name, or ``spec`` itself if it is one.

    Names: ``"entmax15"``, ``"softmax"``, ``"sparsemax"`` (:class:`DenseRouter`
    with ``norm=gate_norm``); ``"top<k>"`` such as ``"top1"``, ``"top2"``
    (:class:`TopKRouter`, learned noise); ``"gshard"`` (top-2 without noise,
    the ``"random"`` second-expert policy with threshold 0.2 and capacity
    factors 1.25 in training and 2 in eval, at least 4 places: the
    ``mixture-of-experts`` package's defaults); ``"expert_choice"``
    (:class:`ExpertChoiceRouter`, capacity factor 2); ``"soft"``
    (:class:`SoftRouter`, one slot per expert); ``"product_keys"``
    (:class:`ProductKeyRouter`, ``k = 16``, one head).  ``rank`` is the rank of
    the low-rank gate projections of a router built from a name (default: full
    matrices); a Router given as ``spec`` keeps its own.

    Examples
    --------
    >>> get_router("top3")
    TopKRouter(k=3, noise='learned', renormalize=True, norm=None, name='top3')
    >>> get_router("softmax", gate_norm=None, rank=8)
    DenseRouter(activation='softmax', norm=None, rank=8, name='softmax')
    >>> get_router("gshard").capacity(1024, 16, training=True)
    80
    """
    if isinstance(spec, Router):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"router must be a router name or a Router; got {spec!r} of type {type(spec).__name__}")
    if spec in _gates.ACTIVATIONS:
        return DenseRouter(spec, norm=gate_norm, rank=rank)
    match = re.fullmatch(r"top([0-9]+)", spec)
    if match:
        return TopKRouter(k=int(match.group(1)), rank=rank)
    if spec == "gshard":
        return TopKRouter(k=2, noise=None, rank=rank, capacity_factor=(1.25, 2.0), min_capacity=4,
                          second_policy="random", second_threshold=0.2)
    if spec == "expert_choice":
        return ExpertChoiceRouter(rank=rank)
    if spec == "soft":
        return SoftRouter(rank=rank)
    if spec == "product_keys":
        return ProductKeyRouter(rank=rank)
    raise ValueError(f"router={spec!r} is not a router name; expected one of {list(ROUTERS)} or a Router instance")


def _with_rank(router: Router, gate_rank: int | None, where: str) -> Router:
    """``router``, or a copy of it with ``rank=gate_rank`` when the layer sets one and the router has none."""
    if gate_rank is None or router.rank == gate_rank:
        return router
    if router.rank is not None:
        raise ValueError(
            f"gate_rank={gate_rank!r} conflicts with {where}, a {type(router).__name__} with rank={router.rank!r}; "
            "expected gate_rank=None (each router keeps its own rank) or the router's rank"
        )
    out = copy.copy(router)
    out.rank = gate_rank
    return out


def resolve_routers(
    router: Any, expert_dims: Sequence[int], gate: str, gate_norm: str | None, gate_rank: int | None = None,
    *, in_dim: int | None = None, out_dim: int | None = None,
) -> tuple[Router, ...]:
    """One router per level from a layer's ``router=`` argument.

    ``None``: a :class:`DenseRouter` with the layer's ``gate`` and ``gate_norm``
    on every level; a name or a Router: the same router on every level (a
    :class:`ProductKeyRouter` spans the two levels ``[n, n]`` of its layer); a
    sequence: one per level.  ``gate_rank`` is given to every router (Router
    objects without a rank are copied with it; one with another rank is an error).
    With ``in_dim`` and ``out_dim`` given, ``overflow="pass-through"`` is checked
    against them (it needs ``in_dim == out_dim``).

    Examples
    --------
    >>> [r.name for r in resolve_routers(["top2", "softmax"], [4, 3], "entmax15", None)]
    ['top2', 'softmax']
    >>> resolve_routers(None, [4], "entmax15", "layernorm", gate_rank=2)
    (DenseRouter(activation='entmax15', norm='layernorm', rank=2, name='entmax15'),)
    >>> resolve_routers(TopKRouter(overflow="pass-through"), [4], "entmax15", None, in_dim=3, out_dim=5)
    Traceback (most recent call last):
    ...
    ValueError: overflow='pass-through' outputs a dropped token's input, which needs in_dim == out_dim; got in_dim=3 and out_dim=5: use overflow='zero'
    """
    levels = len(expert_dims)
    if router is None:
        routers = [DenseRouter(gate, gate_norm, rank=gate_rank)] * levels
    elif isinstance(router, (str, Router)):
        routers = [_with_rank(get_router(router, gate_norm, gate_rank), gate_rank, "router")] * levels
    elif isinstance(router, Sequence):
        if len(router) != levels:
            raise ValueError(
                f"router lists {len(router)} routers but the layer has {levels} expert levels; "
                "give one router per level, or one for all"
            )
        routers = [_with_rank(get_router(r, gate_norm, gate_rank), gate_rank, f"router[{h}]")
                   for h, r in enumerate(router)]
    else:
        raise TypeError(
            f"router must be a router name, a Router, or a list of them (one per level); got {type(router).__name__}"
        )
    soft = [h for h, r in enumerate(routers) if r.soft]
    if len(soft) > 1:
        raise ValueError(f"at most one level can use Soft MoE routing; levels {soft} do")
    joint = [r for r in routers if r.joint]
    if joint:
        if not isinstance(router, (str, Router)):
            raise ValueError(f"a {type(joint[0]).__name__} routes both expert levels together: give it as "
                             "router=..., not in a list of routers")
        joint[0].check_levels(expert_dims)
    for r, n in zip(routers, expert_dims):
        r.check(n)
    _check_overflow(routers, soft, in_dim, out_dim)
    return tuple(routers)


def _check_overflow(routers: Sequence[Router], soft: Sequence[int], in_dim: int | None, out_dim: int | None) -> None:
    """Raise if the levels that drop tokens disagree on ``overflow``, or pass-through cannot apply."""
    modes = {r.overflow for r in routers if getattr(r, "drops", False)}
    if len(modes) > 1:
        raise ValueError(f"the routers of the levels disagree on overflow ({sorted(modes)}): a token no expert "
                         "processes has one output; expected the same overflow on every level")
    if not any(getattr(r, "overflow", "zero") == "pass-through" for r in routers):
        return
    if soft:
        raise ValueError("overflow='pass-through' outputs a dropped token's input, but a Soft MoE level routes slots, "
                         "not tokens; use overflow='zero'")
    if in_dim is not None and out_dim is not None and in_dim != out_dim:
        raise ValueError(f"overflow='pass-through' outputs a dropped token's input, which needs in_dim == out_dim; "
                         f"got in_dim={in_dim} and out_dim={out_dim}: use overflow='zero'")


def _n_experts_from(router: Router, params: Mapping[str, Any], in_dim: int) -> int:
    params = params if isinstance(params, Mapping) else {}
    if "gate" not in params and "gate_up" in params:
        # low-rank gate: the columns are gate_up's, the input rows gate_down's
        up, down = params["gate_up"], params.get("gate_down")
        if getattr(up, "ndim", 0) != 2 or getattr(down, "ndim", 0) != 2:
            raise ValueError("params must hold 'gate_down' [in_dim, rank] and 'gate_up' [rank, n_experts], matrices")
        if down.shape[0] != in_dim:
            raise ValueError(f"x has {in_dim} features but params['gate_down'] has shape {tuple(down.shape)}; "
                             f"expected [{in_dim}, rank]")
        columns = up.shape[1]
    else:
        gate = params.get("gate")
        if gate is None or getattr(gate, "ndim", 0) != 2:
            raise ValueError("params must hold 'gate', a matrix [in_dim, n_experts] (or, for a low-rank router, "
                             "'gate_down' [in_dim, rank] and 'gate_up' [rank, n_experts])")
        if gate.shape[0] != in_dim:
            raise ValueError(f"x has {in_dim} features but params['gate'] has shape {tuple(gate.shape)}; "
                             f"expected [{in_dim}, n_experts]")
        columns = gate.shape[1]
    return columns // router.slots(1) if router.soft else columns
