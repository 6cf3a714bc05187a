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
from ..validation import check_array, check_choice, check_mask, check_params
from . import gates as _gates
from .levels import draw_noise
from .routing import Routing, group_shape, ungroup, with_statistics

__all__ = [
    "ROUTERS",
    "DenseRouter",
    "ExpertChoiceRouter",
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

    def route(self, ops: Ops, params: Mapping[str, Any], x: Any, mask: Any = None, noise: Any = None) -> Routing:
        """Route a grouped input ``x[G, T, I]``, without statistics (the layers' entry point).

        ``mask`` is ``None`` or a float array ``[G, T]`` of ones (tokens) and zeros
        (padding); ``noise`` is ``None`` or standard normal draws ``[G, T, N]``.
        Subclasses implement this; :meth:`__call__` adds checks and statistics.

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
            Draw the router noise (noisy top-k); needs ``rng``.
        rng : int, numpy.random.Generator, torch.Generator or JAX key, optional
            Source of the training noise.  An integer seed or a NumPy generator
            draws in NumPy, so every backend gets the same noise.

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
        noise = None
        if training and self.noisy:
            (noise,), _ = draw_noise(ops, [self], [n], g, t, rng, like=x)
        grouped = ops.xp.reshape(x, (g, t, in_dim))
        routing = with_statistics(ops, self.route(ops, params, grouped, grouped_mask, noise), grouped_mask, n)
        return ungroup(ops, routing, lead)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not (k == "rank" and v is None))
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

    def route(self, ops: Ops, params: Mapping[str, Any], x: Any, mask: Any = None, noise: Any = None) -> Routing:
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

    Examples
    --------
    >>> import numpy as np
    >>> router = TopKRouter(k=1, noise=None)
    >>> r = router({"gate": np.eye(3)}, np.array([[0.0, 2.0, 1.0], [5.0, 0.0, 0.0]]))
    >>> r.indices.tolist(), r.load.tolist()
    ([[1], [0]], [0.5, 0.5, 0.0])
    """

    def __init__(self, k: int = 1, noise: str | float | None = "learned", renormalize: bool | None = None,
                 norm: str | None = None, rank: int | None = None) -> None:
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
        self.name = f"top{self.k}"

    init_logit_std = 1e-2

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

    def route(self, ops: Ops, params: Mapping[str, Any], x: Any, mask: Any = None, noise: Any = None) -> Routing:
        logits = self.logits(ops, params, x)
        if noise is not None:
            std = _softplus(ops, self.project(params, "gate_noise", x)) if self.noise == "learned" else self.noise
            logits = logits + noise * std
        probs = _gates.softmax(logits, ops=ops)
        _, indices = ops.top_k(logits, self.k)
        weights = ops.xp.take_along_axis(probs, indices, axis=-1)
        if self.renormalize:
            weights = weights / ops.xp.sum(weights, axis=-1, keepdims=True)
        if mask is not None:
            weights = weights * mask[..., None]
        return Routing(weights=weights, indices=indices, probs=probs, logits=logits)


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

    def route(self, ops: Ops, params: Mapping[str, Any], x: Any, mask: Any = None, noise: Any = None) -> Routing:
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

    def route(self, ops: Ops, params: Mapping[str, Any], x: Any, mask: Any = None, noise: Any = None) -> Routing:
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


# -- names ---------------------------------------------------------------------------

ROUTERS = ("entmax15", "softmax", "sparsemax", "top1", "top2", "top<k>", "expert_choice", "soft")
"""Router names accepted by :func:`get_router` (``"top<k>"`` for any ``k``).

Examples
--------
>>> [get_router(name).name for name in ("top2", "expert_choice", "soft")]
['top2', 'expert_choice', 'soft']
"""


def get_router(spec: str | Router, gate_norm: str | None = "layernorm", rank: int | None = None) -> Router:
    """A :class:`Router` from a name, or ``spec`` itself if it is one.

    Names: ``"entmax15"``, ``"softmax"``, ``"sparsemax"`` (:class:`DenseRouter`
    with ``norm=gate_norm``); ``"top<k>"`` such as ``"top1"``, ``"top2"``
    (:class:`TopKRouter`, learned noise); ``"expert_choice"``
    (:class:`ExpertChoiceRouter`, capacity factor 2); ``"soft"``
    (:class:`SoftRouter`, one slot per expert).  ``rank`` is the rank of the
    low-rank gate projections of a router built from a name (default: full
    matrices); a Router given as ``spec`` keeps its own.

    Examples
    --------
    >>> get_router("top3")
    TopKRouter(k=3, noise='learned', renormalize=True, norm=None, name='top3')
    >>> get_router("softmax", gate_norm=None, rank=8)
    DenseRouter(activation='softmax', norm=None, rank=8, name='softmax')
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
    if spec == "expert_choice":
        return ExpertChoiceRouter(rank=rank)
    if spec == "soft":
        return SoftRouter(rank=rank)
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
    router: Any, expert_dims: Sequence[int], gate: str, gate_norm: str | None, gate_rank: int | None = None
) -> tuple[Router, ...]:
    """One router per level from a layer's ``router=`` argument.

    ``None``: a :class:`DenseRouter` with the layer's ``gate`` and ``gate_norm``
    on every level; a name or a Router: the same router on every level; a
    sequence: one per level.  ``gate_rank`` is given to every router (Router
    objects without a rank are copied with it; one with another rank is an error).

    Examples
    --------
    >>> [r.name for r in resolve_routers(["top2", "softmax"], [4, 3], "entmax15", None)]
    ['top2', 'softmax']
    >>> resolve_routers(None, [4], "entmax15", "layernorm", gate_rank=2)
    (DenseRouter(activation='entmax15', norm='layernorm', rank=2, name='entmax15'),)
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
    for r, n in zip(routers, expert_dims):
        r.check(n)
    return tuple(routers)


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
