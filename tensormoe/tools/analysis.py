"""Expert specialisation: usage statistics, counterfactual interventions and permanent edits.

The MMoE paper (Oldfield et al., arXiv 2402.12550, NeurIPS 2024) argues three
things about many factorized experts: they *specialise* (an expert processes
mostly one class; its Fig. 2), this is shown by *counterfactual interventions*
(removing an expert at inference removes the accuracy of its class: its figure
of the "mean expert class-level polysemanticity" against the number of
experts), and specialised experts can be *edited* by hand (its CelebA bias
correction).  This module holds the tools to measure and reproduce each, on
every backend (the specialisation guide has the details and a full run):

**Statistics** (:func:`expert_usage`, :class:`ExpertUsage`): from the expert
coefficients of a dataset and its labels, per expert and per level (and per
expert tuple of a hierarchical layer): the mean coefficient, how often it is
active, the mean coefficient per class, the share of its coefficient mass on
its top class, the entropy of its class distribution, and experts ranked for
a class.  One pass over the data; needs labels only.

**Counterfactual specialisation** (:func:`ablation_effects`,
:func:`polysemanticity`): remove one expert at a time and record the change of
every class's accuracy.  An expert is *class-level monosemantic* when its
removal costs accuracy on one class only.  The score is
``1 - max_c p_c`` with ``p`` the expert's accuracy drops (negative changes
clipped to zero) normalised to sum to one: 0 when only one class loses
accuracy, up to ``1 - 1/C`` when all lose alike.  This needs ``N + 1``
evaluations of the labelled set; :meth:`ExpertUsage.top_share` is the
one-pass alternative computed from the routing alone.

**Interventions at inference** (:func:`scale_coefficients`,
:func:`intervened_coefficients`, and for PyTorch modules the context manager
:func:`intervene`): the weights are not touched.  Two places to act, with
different meanings:

* ``mode="after"`` (default): multiply the chosen experts' coefficients *after*
  the gate's normalisation by ``scale`` (``0`` ablates, ``> 1`` amplifies).  The
  other experts keep their coefficients; the removed mass is **not**
  redistributed, so the layer's output loses that expert's share.  This equals
  the permanent edit :func:`scale_expert` exactly (the coefficient and the
  expert's slice enter the forward as one product ``a_n W[n]``).
* ``mode="before"``: set the chosen experts' gate logits to ``-inf`` *before*
  the gate's activation (after the logits' LayerNorm).  entmax, sparsemax and
  softmax then give them exactly zero and **redistribute** their mass over the
  remaining experts (rows still sum to one); a top-k router picks the next best
  experts instead.  Removal only (``scale=0``).

**Permanent edits** in factorized form (:func:`scale_expert`,
:func:`edit_expert`): an expert of level ``h`` owns one slice of one parameter,
the level's expert factor (``factor_h[n]`` for CP and Tucker, the core slice
``factor_h[:, n, :]`` for TT and TR); no other parameter carries the expert
index.  Editing that slice changes the expert and leaves every other expert of
a one-level layer bit-for-bit unchanged.  In a hierarchical layer the slice
``n_h`` is shared by every expert tuple holding ``n_h``: :func:`edit_expert`
measures and reports that leakage.  What a slice can express is limited by the
ranks: an arbitrary new matrix is fitted by least squares, and the report says
how much of the requested change was achieved.

Statistics are accumulated in float64 NumPy whatever the backend of the
coefficients; interventions and edits return arrays of the backend they were
given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import opt_einsum

from ..routing import gates as _gates
from .. import routing as _routers
from ..layers import MMoE, layer_from_config
from .._array import backend_of, dtype_name, to_numpy
from ..frameworks import get_ops
from ..validation import check_index, describe, is_int

__all__ = [
    "MODES",
    "AblationCurve",
    "AblationResult",
    "EditReport",
    "ExpertUsage",
    "ablation_curve",
    "ablation_effects",
    "add_rank_one",
    "class_accuracy",
    "edit_expert",
    "expert_usage",
    "intervene",
    "intervened_coefficients",
    "polysemanticity",
    "scale_coefficients",
    "scale_expert",
]

MODES = ("after", "before")
"""Where an intervention changes the coefficients: the values of ``mode=``.

``"after"`` scales them after the gate's normalisation (nothing is
redistributed); ``"before"`` masks the gate logits before the activation (the
gate redistributes the mass over the remaining experts).

Examples
--------
>>> MODES
('after', 'before')
"""

# joint (expert-tuple) statistics are kept up to this many tuples, and computed in row chunks of this many elements
_MAX_TUPLES = 2**16
_CHUNK = 2**20


# --- helpers --------------------------------------------------------------------------------


def _numpy(x: Any, argument: str) -> np.ndarray:
    """``x`` (an array of any backend, or a nested list) as a NumPy array."""
    if backend_of(x) is not None:
        return to_numpy(x)
    if isinstance(x, (str, bytes, Mapping)) or x is None:
        raise TypeError(f"{argument} must be an array; got {describe(x)}")
    try:
        return np.asarray(x)
    except Exception as error:  # ragged lists and the like
        raise TypeError(f"{argument} must be an array; got {describe(x)}") from error


def _levels(coefficients: Any) -> list[Any]:
    """One level's array, or a sequence of per-level arrays, as a list."""
    if isinstance(coefficients, (list, tuple)):
        if not coefficients:
            raise ValueError("coefficients must hold at least one level's array [..., N_h]; got an empty sequence")
        return list(coefficients)
    return [coefficients]


def _check_real(value: Any, argument: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{argument} must be a finite real number; got {describe(value)}")
    return float(value)


def _check_level(level: Any, expert_dims: Sequence[int], allow_joint: bool = False) -> int | None:
    if level is None and allow_joint:
        return None
    if not is_int(level) or not 0 <= level < len(expert_dims):
        joint = " or None (expert tuples)" if allow_joint else ""
        raise ValueError(
            f"level must be an integer in [0, {len(expert_dims)}){joint} for expert_dims={list(expert_dims)}; "
            f"got {describe(level)}"
        )
    return int(level)


def _check_experts(experts: Any, n: int, argument: str = "experts") -> tuple[int, ...]:
    values = [experts] if is_int(experts) else experts
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{argument} must be an expert index or a sequence of them; got {describe(experts)}")
    out = []
    for k, e in enumerate(values):
        if not is_int(e) or not 0 <= e < n:
            raise ValueError(f"{argument}[{k}]={e!r} is not an expert of the level; expected an integer in [0, {n})")
        out.append(int(e))
    return tuple(out)


def _check_mode(mode: Any, scale: float) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not an intervention mode; expected one of {list(MODES)}")
    if mode == "before" and scale != 0.0:
        raise ValueError(
            f"mode='before' removes experts by masking their gate logits (scale=0); got scale={scale!r}: "
            "use mode='after' to scale coefficients"
        )
    return mode


def _unwrap(layer: Any, params: Mapping[str, Any] | None) -> tuple[MMoE, Mapping[str, Any], str | None]:
    """The functional layer, the parameters to use, and the backend to compute on (None: the current one).

    ``layer`` is a functional :class:`tensormoe.MMoE`, or a PyTorch module or JAX
    pytree layer wrapping one (their ``layer`` attribute); ``params=None`` takes
    the module's own parameters (a functional layer keeps ``None``: its own, on
    the backend in use).
    """
    if isinstance(layer, MMoE):
        return layer, params, None  # None: the layer's own, converted to the backend in use
    core = getattr(layer, "layer", None)
    if isinstance(core, MMoE):
        own = layer.params
        own = dict(own.items()) if hasattr(own, "items") else dict(own)
        params = own if params is None else params
        backend = backend_of(next(iter(params.values()))) if params else None
        return core, params, backend
    raise TypeError(
        "layer must be a tensormoe MMoE layer (tensormoe.CPMMoE, ...) or a tensormoe.torch / tensormoe.jax "
        f"module wrapping one; got {describe(layer)}"
    )


# --- statistics -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _View:
    """Sufficient statistics of one level (or of the expert tuples): sums over rows."""

    mass: np.ndarray  # [N] sum of coefficients
    class_mass: np.ndarray  # [C, N] sum of coefficients over the rows of each class
    active: np.ndarray  # [N] rows with coefficient > threshold
    entropy: float  # sum over rows of the entropy (nats) of the row's normalised coefficients
    entropy_rows: int  # rows with a positive coefficient sum

    def __add__(self, other: _View) -> _View:
        return _View(self.mass + other.mass, self.class_mass + other.class_mass, self.active + other.active,
                     self.entropy + other.entropy, self.entropy_rows + other.entropy_rows)

    def padded(self, n_classes: int) -> _View:
        extra = n_classes - self.class_mass.shape[0]
        if extra <= 0:
            return self
        class_mass = np.concatenate([self.class_mass, np.zeros((extra, self.class_mass.shape[1]))])
        return dataclasses.replace(self, class_mass=class_mass)


def _view(a: np.ndarray, onehot: np.ndarray | None, threshold: float) -> _View:
    total = a.sum(1)
    positive = total > 0
    p = a[positive] / total[positive, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = float(-np.where(p > 0, p * np.log(p), 0.0).sum())
    class_mass = onehot.T @ a if onehot is not None else np.zeros((0, a.shape[1]))
    return _View(a.sum(0), class_mass, (a > threshold).sum(0).astype(np.float64), entropy, int(positive.sum()))


def _joint_view(levels: list[np.ndarray], onehot: np.ndarray | None, threshold: float) -> _View:
    """Statistics of the expert tuples, whose coefficient is the product of the levels' (in row chunks)."""
    n_tuples = math.prod(a.shape[1] for a in levels)
    rows = levels[0].shape[0]
    step = max(1, _CHUNK // n_tuples)
    out = None
    for start in range(0, max(rows, 1), step):
        sl = slice(start, start + step)
        joint = levels[0][sl]
        for a in levels[1:]:
            joint = (joint[:, :, None] * a[sl, None, :]).reshape(joint.shape[0], -1)
        part = _view(joint, None if onehot is None else onehot[sl], threshold)
        out = part if out is None else out + part
    return out


@dataclasses.dataclass(frozen=True)
class ExpertUsage:
    """How a dataset uses the experts: sums over its rows, per level and per expert tuple.

    Build it with :func:`expert_usage`; results of several batches add up
    (``usage_a + usage_b``, or ``sum(...)`` over batches).  Every method takes a
    ``level``: an integer for one level's experts, or ``None`` for the expert
    *tuples* ``(n_1, ..., n_H)`` of a hierarchical layer, whose coefficient is
    the product ``a_1[n_1] ... a_H[n_H]`` (the weight of ``W[n_1, ..., n_H]``
    in the forward), flattened in C order (:meth:`expert_index` maps back).
    With one level, ``None`` is level 0.

    Class statistics need labels; rows labelled ``-1`` (or any negative label)
    are left out of everything.

    Attributes
    ----------
    expert_dims : tuple of int
        Experts per level.
    n_classes : int
        Number of classes (0 without labels).
    rows : int
        Rows (tokens, images) counted.
    class_rows : numpy.ndarray ``[C]``
        Rows of each class.
    threshold : float
        A coefficient above it counts as the expert being active.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    >>> usage = expert_usage(a, labels=np.array([0, 1, 1]))
    >>> usage.mean_coefficient().tolist(), usage.class_mean().tolist()
    ([0.5, 0.5], [[1.0, 0.0], [0.25, 0.75]])
    >>> usage.top_class().tolist(), usage.top_share(balanced=False).round(3).tolist()
    ([0, 1], [0.667, 1.0])
    """

    expert_dims: tuple[int, ...]
    n_classes: int
    rows: int
    class_rows: np.ndarray
    threshold: float
    _views: tuple[_View, ...] = dataclasses.field(repr=False)
    _joint: _View | None = dataclasses.field(repr=False, default=None)

    # -- combining ----------------------------------------------------------------------------
    def __add__(self, other: ExpertUsage) -> ExpertUsage:
        if not isinstance(other, ExpertUsage):
            return NotImplemented
        if other.expert_dims != self.expert_dims or other.threshold != self.threshold:
            raise ValueError(
                f"cannot add usage of experts {list(other.expert_dims)} (threshold {other.threshold}) to usage of "
                f"experts {list(self.expert_dims)} (threshold {self.threshold}); expected the same layer and threshold"
            )
        c = max(self.n_classes, other.n_classes)
        rows_a = np.concatenate([self.class_rows, np.zeros(c - self.n_classes)])
        rows_b = np.concatenate([other.class_rows, np.zeros(c - other.n_classes)])
        views = tuple(a.padded(c) + b.padded(c) for a, b in zip(self._views, other._views))
        joint = None
        if self._joint is not None and other._joint is not None:
            joint = self._joint.padded(c) + other._joint.padded(c)
        return ExpertUsage(self.expert_dims, c, self.rows + other.rows, rows_a + rows_b, self.threshold, views, joint)

    def __radd__(self, other: Any) -> ExpertUsage:
        if isinstance(other, numbers.Integral) and other == 0:  # sum() starts at 0
            return self
        return NotImplemented

    def select_classes(self, classes: Any) -> ExpertUsage:
        """The same usage with only ``classes`` in the class statistics (the others count as having no rows).

        Class indices stay as they are; the per-expert statistics that ignore
        classes (mean coefficient, activity, entropy) are unchanged.  Use it to
        leave rare classes out of the balanced statistics, where a class of a
        few rows gives noisy means.

        Parameters
        ----------
        classes : sequence of int or bool mask ``[C]``

        Examples
        --------
        >>> import numpy as np
        >>> usage = expert_usage(np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), np.array([0, 1, 2]))
        >>> usage.select_classes([0, 1]).class_distribution().tolist()
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
        """
        self._need_classes()
        mask = np.zeros(self.n_classes, dtype=bool)
        index = np.asarray(classes)
        if index.dtype != bool and index.dtype.kind not in "iu":
            raise TypeError(f"classes must be class indices or a boolean mask; got {describe(classes)}")
        try:
            mask[index] = True
        except IndexError as error:
            raise ValueError(f"classes must select among the {self.n_classes} classes; got {classes!r}") from error
        keep = mask.astype(np.float64)

        def restrict(view: _View | None) -> _View | None:
            return None if view is None else dataclasses.replace(view, class_mass=view.class_mass * keep[:, None])

        return dataclasses.replace(self, class_rows=self.class_rows * keep,
                                   _views=tuple(restrict(v) for v in self._views), _joint=restrict(self._joint))

    # -- views --------------------------------------------------------------------------------
    def _get(self, level: Any) -> _View:
        level = _check_level(level, self.expert_dims, allow_joint=True)
        if level is not None:
            return self._views[level]
        if len(self.expert_dims) == 1:
            return self._views[0]
        if self._joint is None:
            raise ValueError(
                f"expert-tuple statistics (level=None) were not kept: {math.prod(self.expert_dims):,} tuples exceed "
                f"max_tuples; expected expert_usage(..., max_tuples=...) at least that large"
            )
        return self._joint

    def n_experts(self, level: int | None = 0) -> int:
        """Number of experts of ``level`` (of tuples for ``None``).

        Examples
        --------
        >>> import numpy as np
        >>> usage = expert_usage([np.full((2, 3), 1 / 3), np.full((2, 2), 0.5)])
        >>> usage.n_experts(1), usage.n_experts(None)
        (2, 6)
        """
        return int(self._get(level).mass.shape[0])

    def expert_index(self, flat: int) -> tuple[int, ...]:
        """The expert tuple ``(n_1, ..., n_H)`` of a flat tuple index (``level=None`` results).

        Examples
        --------
        >>> import numpy as np
        >>> expert_usage([np.full((2, 3), 1 / 3), np.full((2, 2), 0.5)]).expert_index(5)
        (2, 1)
        """
        return tuple(int(i) for i in np.unravel_index(int(flat), self.expert_dims))

    # -- usage --------------------------------------------------------------------------------
    def mean_coefficient(self, level: int | None = 0) -> np.ndarray:
        """``[N]``: each expert's coefficient averaged over all rows (its load).

        Examples
        --------
        >>> import numpy as np
        >>> expert_usage(np.array([[1.0, 0.0], [0.5, 0.5]])).mean_coefficient().tolist()
        [0.75, 0.25]
        """
        return self._get(level).mass / max(self.rows, 1)

    def active_fraction(self, level: int | None = 0) -> np.ndarray:
        """``[N]``: the fraction of rows whose coefficient of the expert exceeds ``threshold``.

        Examples
        --------
        >>> import numpy as np
        >>> expert_usage(np.array([[1.0, 0.0], [0.5, 0.5]])).active_fraction().tolist()
        [1.0, 0.5]
        """
        return self._get(level).active / max(self.rows, 1)

    def used(self, level: int | None = 0) -> np.ndarray:
        """``[N]`` bool: whether the expert was active on any row.

        Examples
        --------
        >>> import numpy as np
        >>> expert_usage(np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])).used().tolist()
        [True, True, False]
        """
        return self._get(level).active > 0

    def mean_entropy(self, level: int | None = 0) -> float:
        """Mean entropy (nats) of a row's coefficients over the experts (normalised to sum to one).

        ``0`` when every row uses one expert; ``log N`` when every row spreads
        evenly.  ``exp`` of it is an effective number of experts per row.

        Examples
        --------
        >>> import numpy as np
        >>> round(expert_usage(np.array([[1.0, 0.0], [0.5, 0.5]])).mean_entropy(), 4)  # (0 + log 2) / 2
        0.3466
        """
        view = self._get(level)
        return view.entropy / view.entropy_rows if view.entropy_rows else float("nan")

    # -- classes ------------------------------------------------------------------------------
    def _need_classes(self) -> None:
        if not self.n_classes:
            raise ValueError("class statistics need labels: build the usage with expert_usage(coefficients, labels)")

    def class_mean(self, level: int | None = 0) -> np.ndarray:
        """``[C, N]``: the mean coefficient of each expert over the rows of each class.

        Classes without rows give ``NaN``.

        Examples
        --------
        >>> import numpy as np
        >>> a = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
        >>> expert_usage(a, np.array([0, 1, 1])).class_mean().tolist()
        [[1.0, 0.0], [0.25, 0.75]]
        """
        self._need_classes()
        with np.errstate(invalid="ignore", divide="ignore"):
            return self._get(level).class_mass / self.class_rows[:, None]

    def class_distribution(self, level: int | None = 0, *, balanced: bool = True) -> np.ndarray:
        """``[N, C]``: how each expert's coefficient mass splits over the classes (rows sum to one).

        ``balanced=True`` (default) splits the expert's *mean coefficient per
        class* (:meth:`class_mean`), so a frequent class does not look preferred
        just for having more rows; ``balanced=False`` splits its raw mass (the
        share of the expert's total coefficient that rows of each class carry).
        Unused experts get a row of ``NaN``; classes without rows get zero.

        Examples
        --------
        >>> import numpy as np
        >>> a = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
        >>> usage = expert_usage(a, np.array([0, 1, 1]))
        >>> usage.class_distribution().round(3).tolist()
        [[0.8, 0.2], [0.0, 1.0]]
        >>> usage.class_distribution(balanced=False).round(3).tolist()
        [[0.667, 0.333], [0.0, 1.0]]
        """
        view = self._get(level)
        self._need_classes()
        if balanced:
            mass = np.nan_to_num(self.class_mean(level), nan=0.0).T
        else:
            mass = view.class_mass.T
        total = mass.sum(1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, mass / total, np.nan)

    def top_class(self, level: int | None = 0, *, balanced: bool = True) -> np.ndarray:
        """``[N]``: each expert's top class (``-1`` for unused experts).

        Examples
        --------
        >>> import numpy as np
        >>> expert_usage(np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([1, 0])).top_class().tolist()
        [1, -1]
        """
        dist = self.class_distribution(level, balanced=balanced)
        ok = ~np.isnan(dist).any(1)
        return np.where(ok, np.argmax(np.nan_to_num(dist, nan=-1.0), axis=1), -1)

    def top_share(self, level: int | None = 0, *, balanced: bool = True) -> np.ndarray:
        """``[N]``: the share of each expert's coefficient mass on its top class (``NaN`` if unused).

        ``1`` for an expert used by one class only; ``1 / C`` for one used by all
        classes alike.  The one-pass, routing-only alternative to the
        counterfactual :func:`polysemanticity` (``1 - top_share`` is its analogue).

        Examples
        --------
        >>> import numpy as np
        >>> a = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
        >>> expert_usage(a, np.array([0, 1, 1])).top_share().round(3).tolist()
        [0.8, 1.0]
        """
        return _row_max(self.class_distribution(level, balanced=balanced))

    def class_entropy(self, level: int | None = 0, *, balanced: bool = True) -> np.ndarray:
        """``[N]``: entropy of each expert's class distribution, divided by ``log C``: 0 one class, 1 all alike.

        ``C`` counts the classes that have rows.  ``NaN`` for unused experts.

        Examples
        --------
        >>> import numpy as np
        >>> a = np.array([[1.0, 0.5], [0.0, 0.5]])
        >>> expert_usage(a, np.array([0, 1])).class_entropy().round(3).tolist()
        [0.0, 1.0]
        """
        dist = self.class_distribution(level, balanced=balanced)
        present = int((self.class_rows > 0).sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            h = 0.0 - np.where(dist > 0, dist * np.log(dist), 0.0).sum(1)
        h = np.where(np.isnan(dist).any(1), np.nan, h)
        return h / math.log(present) if present > 1 else np.where(np.isnan(h), np.nan, 0.0)

    def selectivity(self, level: int | None = 0) -> np.ndarray:
        """``[N, C]``: an expert's mean coefficient on a class minus its mean over the other classes.

        Positive where the class uses the expert more than the other classes do
        on average; the default ranking of :meth:`top_experts`.

        Examples
        --------
        >>> import numpy as np
        >>> a = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
        >>> expert_usage(a, np.array([0, 1, 1])).selectivity().tolist()
        [[0.75, -0.75], [-0.75, 0.75]]
        """
        mean = self.class_mean(level).T  # [N, C]
        present = self.class_rows > 0
        m = int(present.sum())
        filled = np.where(present, mean, 0.0)
        others = (filled.sum(1, keepdims=True) - filled) / max(m - 1, 1)
        return np.where(present, mean - others, np.nan)

    def top_experts(self, cls: int, k: int = 1, level: int | None = 0, *, by: str = "selectivity") -> np.ndarray:
        """The ``k`` experts most associated with class ``cls``, best first.

        Parameters
        ----------
        cls : int
            The class.
        k : int
            How many experts.
        level : int or None
            As everywhere (``None``: expert tuples, flat indices).
        by : {"selectivity", "mean", "share"}
            Ranking: :meth:`selectivity` (default: used more by ``cls`` than by
            the other classes), :meth:`class_mean` (used most by ``cls``, however
            much the others use it too), or the balanced
            :meth:`class_distribution` share on ``cls`` (the expert's mass most
            devoted to ``cls``, however little it is used).

        Examples
        --------
        >>> import numpy as np
        >>> a = np.array([[0.6, 0.4, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])
        >>> usage = expert_usage(a, np.array([0, 1, 1]))
        >>> usage.top_experts(1, 2).tolist(), usage.top_experts(1, 1, by="mean").tolist()
        ([2, 1], [2])
        """
        self._need_classes()
        if not is_int(cls) or not 0 <= cls < self.n_classes:
            raise ValueError(f"cls must be a class in [0, {self.n_classes}); got {describe(cls)}")
        n = self.n_experts(level)
        if not is_int(k) or not 1 <= k <= n:
            raise ValueError(f"k must be an integer in [1, {n}] (the experts of the level); got {describe(k)}")
        if by == "selectivity":
            score = self.selectivity(level)[:, cls]
        elif by == "mean":
            score = self.class_mean(level)[cls]
        elif by == "share":
            score = self.class_distribution(level)[:, cls]
        else:
            raise ValueError(f"by={by!r} is not a ranking; expected one of ['selectivity', 'mean', 'share']")
        score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf)
        return np.argsort(-score, kind="stable")[:k]

    def specialisation(self, level: int | None = 0, *, balanced: bool = True) -> float:
        """Mean :meth:`top_share` over the used experts: ``1/C`` for none, ``1`` for one class per expert.

        Examples
        --------
        >>> import numpy as np
        >>> a = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
        >>> round(expert_usage(a, np.array([0, 1, 1])).specialisation(balanced=False), 4)  # (2/3 + 1) / 2
        0.8333
        """
        share = self.top_share(level, balanced=balanced)
        share = share[self.used(level) & ~np.isnan(share)]
        return float(share.mean()) if share.size else float("nan")


def _row_max(dist: np.ndarray) -> np.ndarray:
    bad = np.isnan(dist).any(1)
    return np.where(bad, np.nan, np.nan_to_num(dist, nan=0.0).max(1, initial=0.0))


def expert_usage(
    coefficients: Any,
    labels: Any = None,
    n_classes: int | None = None,
    *,
    threshold: float = 0.0,
    max_tuples: int = _MAX_TUPLES,
) -> ExpertUsage:
    """Usage statistics of the experts over a batch of rows (and their labels).

    Parameters
    ----------
    coefficients : array ``[..., N]`` or sequence of arrays ``[..., N_h]``
        Expert coefficients of any backend: one level's, or every level's (e.g.
        ``layer.coefficients(params, x)``, a module's ``coefficients(x)``).
    labels : integer array ``[...]``, optional
        The class of every row (leading shape of the coefficients); negative
        labels mark rows to leave out (padding).
    n_classes : int, optional
        Number of classes (default: the largest label plus one).
    threshold : float
        A coefficient above it counts as the expert being active (default 0:
        any non-zero coefficient; entmax and sparsemax give exact zeros).
    max_tuples : int
        Keep expert-tuple statistics (``level=None``) of a hierarchical layer when
        it has at most this many tuples (default ``2**16``).

    Returns
    -------
    ExpertUsage
        Sums that add up over batches.

    Raises
    ------
    ValueError
        If shapes disagree, a label is not below ``n_classes``, or a coefficient
        is negative or not finite.

    Examples
    --------
    >>> import numpy as np
    >>> import tensormoe
    >>> layer = tensormoe.CPMMoE(4, 3, [6, 2], rank=2)
    >>> x = np.random.default_rng(0).normal(size=(10, 4)).astype("float32")
    >>> usage = expert_usage(layer.coefficients(None, x), labels=np.arange(10) % 3)
    >>> usage.class_mean(level=1).shape, usage.class_mean(level=None).shape
    ((3, 2), (3, 12))
    """
    levels = [_numpy(a, f"coefficients[{h}]").astype(np.float64) for h, a in enumerate(_levels(coefficients))]
    lead = levels[0].shape[:-1]
    for h, a in enumerate(levels):
        if a.ndim < 1 or a.shape[:-1] != lead:
            raise ValueError(
                f"coefficients[{h}] must have shape [{', '.join(map(str, lead))}, N_{h}] like coefficients[0]; "
                f"got {list(a.shape)}"
            )
        if a.size and (not np.isfinite(a).all() or a.min() < 0):
            raise ValueError(f"coefficients[{h}] must be finite and non-negative (gate outputs); got values in "
                             f"[{np.nanmin(a):.4g}, {np.nanmax(a):.4g}]")
    expert_dims = tuple(int(a.shape[-1]) for a in levels)
    threshold = _check_real(threshold, "threshold")
    if not is_int(max_tuples) or max_tuples < 1:
        raise ValueError(f"max_tuples must be a positive integer; got {describe(max_tuples)}")
    rows = [a.reshape(-1, a.shape[-1]) for a in levels]
    onehot = None
    c = 0
    if labels is not None:
        y = _numpy(labels, "labels")
        if y.dtype.kind not in "iu":
            raise TypeError(f"labels must be an integer array; got {describe(labels)}")
        if y.shape != lead:
            raise ValueError(f"labels must have the coefficients' leading shape {list(lead)}; got {list(y.shape)}")
        y = y.reshape(-1).astype(np.int64)
        keep = y >= 0
        c = int(y[keep].max()) + 1 if keep.any() else 0
        if n_classes is not None:
            if not is_int(n_classes) or n_classes < 1:
                raise ValueError(f"n_classes must be a positive integer; got {describe(n_classes)}")
            if c > n_classes:
                raise ValueError(f"labels must lie in [0, n_classes={n_classes}); got a label {c - 1}")
            c = int(n_classes)
        rows = [a[keep] for a in rows]
        y = y[keep]
        onehot = np.zeros((len(y), c))
        onehot[np.arange(len(y)), y] = 1.0
    elif n_classes is not None:
        raise ValueError("n_classes was given without labels; expected labels as well (or neither)")
    views = tuple(_view(a, onehot, threshold) for a in rows)
    joint = None
    if len(rows) > 1 and math.prod(expert_dims) <= max_tuples:
        joint = _joint_view(rows, onehot, threshold)
    class_rows = onehot.sum(0) if onehot is not None else np.zeros(0)
    return ExpertUsage(expert_dims, c, int(rows[0].shape[0]), class_rows, threshold, views, joint)


# --- counterfactual specialisation --------------------------------------------------------------


def class_accuracy(predictions: Any, labels: Any, n_classes: int | None = None) -> np.ndarray:
    """``[C]``: the accuracy on the rows of each class (``NaN`` for classes without rows).

    Parameters
    ----------
    predictions : array
        Predicted classes ``[...]`` (integers), or scores ``[..., C]`` whose
        argmax is the prediction; any backend.
    labels : integer array ``[...]``
        True classes; negative labels are left out.
    n_classes : int, optional
        Default: the largest label or prediction plus one (the scores' last axis).

    Examples
    --------
    >>> import numpy as np
    >>> class_accuracy(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 4).tolist()
    [1.0, 1.0, 0.5, nan]
    """
    p = _numpy(predictions, "predictions")
    y = _numpy(labels, "labels")
    if y.dtype.kind not in "iu":
        raise TypeError(f"labels must be an integer array; got {describe(labels)}")
    if p.dtype.kind == "f" or p.ndim == y.ndim + 1:
        if p.shape[:-1] != y.shape:
            raise ValueError(f"scores must have shape [{', '.join(map(str, y.shape))}, C]; got {list(p.shape)}")
        c_scores = p.shape[-1]
        p = p.argmax(-1)
    else:
        c_scores = 0
        if p.shape != y.shape:
            raise ValueError(f"predictions and labels must have one shape; got {list(p.shape)} and {list(y.shape)}")
    p, y = p.reshape(-1).astype(np.int64), y.reshape(-1).astype(np.int64)
    keep = y >= 0
    p, y = p[keep], y[keep]
    c = max(c_scores, int(y.max()) + 1 if y.size else 0, int(p.max()) + 1 if p.size else 0)
    if n_classes is not None:
        if not is_int(n_classes) or n_classes < c:
            raise ValueError(f"n_classes must be an integer of at least {c} (the labels and predictions seen); "
                             f"got {describe(n_classes)}")
        c = int(n_classes)
    total = np.bincount(y, minlength=c).astype(np.float64)
    correct = np.bincount(y[p == y], minlength=c).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.where(total > 0, total, 1.0), np.nan)


def polysemanticity(drops: Any, classes: Any = None) -> np.ndarray:
    """Class-level polysemanticity of experts from their counterfactual accuracy drops.

    For each expert, ``d_c = max(drop_c, 0)`` (only the classes whose accuracy
    falls when the expert is removed), ``p = d / sum(d)`` and the score is
    ``1 - max_c p_c``: ``0`` when removing the expert costs accuracy on a single
    class (monosemantic), up to ``1 - 1/C`` when all classes lose alike.
    Experts whose removal costs no class anything get ``NaN``.  The mean over
    experts (ignoring ``NaN``) is our reading of the paper's "mean expert
    class-level polysemanticity": the paper's exact normalisation could not be
    checked here (see the specialisation guide).

    With unbalanced classes, a class of few rows loses a large share of its
    accuracy when a single row flips, which would make an expert look
    monosemantic by chance: score only the classes with enough rows
    (``classes=``).

    Parameters
    ----------
    drops : array ``[E, C]`` (or ``[C]``)
        Accuracy before minus accuracy after removing each expert, per class
        (:attr:`AblationResult.drop`); ``NaN`` entries (classes without rows) count as 0.
    classes : sequence of int or bool mask ``[C]``, optional
        The classes to score (default: all).

    Examples
    --------
    >>> import numpy as np
    >>> drops = np.array([[0.5, 0.0, -0.1], [0.2, 0.2, 0.0], [0.0, 0.0, 0.0]])
    >>> polysemanticity(drops).tolist(), polysemanticity(drops, classes=[1, 2]).tolist()
    ([0.0, 0.5, nan], [nan, 0.0, nan])
    """
    d = np.nan_to_num(_numpy(drops, "drops").astype(np.float64), nan=0.0).clip(min=0.0)
    if classes is not None:
        index = np.asarray(classes)
        if index.dtype != bool and index.dtype.kind not in "iu":
            raise TypeError(f"classes must be class indices or a boolean mask; got {describe(classes)}")
        try:
            d = d[..., index]
        except IndexError as error:
            raise ValueError(f"classes must select among the {d.shape[-1]} classes of drops; got {classes!r}") from error
    total = d.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1.0 - d.max(-1, initial=0.0) / np.where(total > 0, total, 1.0), np.nan)


@dataclasses.dataclass(frozen=True)
class AblationResult:
    """Per-class accuracy with nothing removed and with each group of experts removed.

    Attributes
    ----------
    experts : tuple of tuple of int
        The groups removed, one per row of ``accuracy``.
    baseline : numpy.ndarray ``[C]``
        Accuracy per class with every expert.
    accuracy : numpy.ndarray ``[E, C]``
        Accuracy per class with each group removed.

    Examples
    --------
    >>> import numpy as np
    >>> r = AblationResult(((0,), (1,)), np.array([0.9, 0.8]), np.array([[0.1, 0.8], [0.9, 0.7]]))
    >>> r.drop.round(3).tolist(), r.polysemanticity().tolist()
    ([[0.8, 0.0], [0.0, 0.1]], [0.0, 0.0])
    """

    experts: tuple[tuple[int, ...], ...]
    baseline: np.ndarray
    accuracy: np.ndarray

    @property
    def change(self) -> np.ndarray:
        """``[E, C]``: accuracy after removal minus before (negative: the class lost accuracy).

        Examples
        --------
        >>> import numpy as np
        >>> AblationResult(((0,),), np.array([0.5]), np.array([[0.25]])).change.tolist()
        [[-0.25]]
        """
        return self.accuracy - self.baseline

    @property
    def drop(self) -> np.ndarray:
        """``[E, C]``: accuracy before minus after removal (positive: the class lost accuracy).

        Examples
        --------
        >>> import numpy as np
        >>> AblationResult(((0,),), np.array([0.5]), np.array([[0.25]])).drop.tolist()
        [[0.25]]
        """
        return self.baseline - self.accuracy

    def polysemanticity(self, classes: Any = None) -> np.ndarray:
        """``[E]``: :func:`polysemanticity` of every removed group (over ``classes``, default all).

        Examples
        --------
        >>> import numpy as np
        >>> AblationResult(((0,),), np.array([0.5, 0.5]), np.array([[0.25, 0.25]])).polysemanticity().tolist()
        [0.5]
        """
        return polysemanticity(self.drop, classes)

    def most_affected(self) -> np.ndarray:
        """``[E]``: the class that loses the most accuracy when each group is removed (``-1``: none loses any).

        Examples
        --------
        >>> import numpy as np
        >>> AblationResult(((0,), (1,)), np.array([0.5, 0.5]), np.array([[0.5, 0.25], [0.5, 0.5]])).most_affected()
        array([ 1, -1])
        """
        drop = np.nan_to_num(self.drop, nan=-np.inf)
        return np.where(drop.max(-1, initial=-np.inf) > 0, np.argmax(drop, axis=-1), -1)


def _groups(experts: Iterable[Any]) -> tuple[tuple[int, ...], ...]:
    if isinstance(experts, (str, bytes)) or not isinstance(experts, Iterable):
        raise TypeError(f"experts must be a sequence of expert indices (or of groups of them); got {describe(experts)}")
    out = []
    for k, e in enumerate(experts):
        group = (e,) if is_int(e) else tuple(e) if isinstance(e, Iterable) else None
        if group is None or not all(is_int(i) and i >= 0 for i in group):
            raise ValueError(f"experts[{k}]={e!r} must be an expert index or a group of them (non-negative integers)")
        out.append(tuple(int(i) for i in group))
    return tuple(out)


def _progress(items: Sequence[Any], progress: bool, desc: str) -> Iterable[Any]:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


def _evaluate(evaluate: Callable[[tuple[int, ...]], Any], removed: tuple[int, ...], c: int | None) -> np.ndarray:
    acc = np.asarray(_numpy(evaluate(removed), "evaluate(...)"), dtype=np.float64)
    if acc.ndim != 1 or (c is not None and acc.shape != (c,)):
        raise ValueError(
            f"evaluate({removed}) must return the accuracy per class, a vector"
            + (f" of {c} entries like evaluate(())" if c is not None else "")
            + f"; got shape {list(acc.shape)}"
        )
    return acc


def ablation_effects(
    evaluate: Callable[[tuple[int, ...]], Any],
    experts: Iterable[Any],
    *,
    progress: bool = False,
) -> AblationResult:
    """Counterfactual interventions: per-class accuracy with each expert (or group) removed in turn.

    Parameters
    ----------
    evaluate : callable
        ``evaluate(removed)`` returns the accuracy per class (``[C]``, e.g.
        :func:`class_accuracy`) of the model evaluated with the experts
        ``removed`` (a tuple of indices; empty for the baseline), for example
        under :func:`intervene` or with :func:`intervened_coefficients`.
    experts : sequence of int or of sequences of int
        The experts to remove one at a time, or groups removed together.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    AblationResult
        ``evaluate(())`` is called once for the baseline.

    Examples
    --------
    A layer's experts removed one at a time, each class's accuracy recomputed:

    >>> import numpy as np
    >>> import tensormoe
    >>> layer = tensormoe.CPMMoE(4, 3, [5], rank=2, gate="softmax")
    >>> x = np.random.default_rng(0).normal(size=(30, 4)).astype("float32")
    >>> y = layer(x).argmax(-1)  # the layer's own predictions as labels
    >>> def evaluate(removed):
    ...     a = intervened_coefficients(layer, None, x, removed)
    ...     return class_accuracy(layer(x, a), y, 3)
    >>> r = ablation_effects(evaluate, range(5))
    >>> r.baseline.tolist(), r.accuracy.shape
    ([1.0, 1.0, 1.0], (5, 3))
    """
    groups = _groups(experts)
    baseline = _evaluate(evaluate, (), None)
    rows = [_evaluate(evaluate, g, baseline.shape[0]) for g in _progress(groups, progress, "ablating experts")]
    accuracy = np.stack(rows) if rows else np.zeros((0, baseline.shape[0]))
    return AblationResult(groups, baseline, accuracy)


@dataclasses.dataclass(frozen=True)
class AblationCurve:
    """Accuracy per class as more and more experts are removed (cumulatively, in a given order).

    Attributes
    ----------
    order : tuple of int
        The experts in the order they are removed.
    removed : numpy.ndarray ``[K]``
        How many experts (the first of ``order``) are removed at each point.
    accuracy : numpy.ndarray ``[K, C]``
        Accuracy per class at each point.
    target : int
        The class the order was chosen for.
    weights : numpy.ndarray ``[C]`` or None
        Weights of the classes in :attr:`other_accuracy` (e.g. their row counts);
        ``None``: every other class alike.

    Examples
    --------
    >>> import numpy as np
    >>> curve = AblationCurve((2, 0), np.array([0, 1]), np.array([[0.9, 0.8, 0.6], [0.2, 0.7, 0.5]]), target=0)
    >>> curve.target_accuracy.tolist(), curve.other_accuracy.round(3).tolist()
    ([0.9, 0.2], [0.7, 0.6])
    """

    order: tuple[int, ...]
    removed: np.ndarray
    accuracy: np.ndarray
    target: int
    weights: np.ndarray | None = None

    @property
    def target_accuracy(self) -> np.ndarray:
        """``[K]``: accuracy on the target class.

        Examples
        --------
        >>> import numpy as np
        >>> AblationCurve((0,), np.array([0, 1]), np.array([[0.9, 0.5], [0.1, 0.5]]), 0).target_accuracy.tolist()
        [0.9, 0.1]
        """
        return self.accuracy[:, self.target]

    @property
    def other_accuracy(self) -> np.ndarray:
        """``[K]``: mean accuracy on the other classes (weighted by ``weights``; classes without rows skipped).

        Examples
        --------
        >>> import numpy as np
        >>> AblationCurve((0,), np.array([0]), np.array([[0.9, 0.5, 0.7]]), 0, np.array([1, 3, 1])).other_accuracy
        array([0.55])
        """
        acc = np.delete(self.accuracy, self.target, axis=1)
        w = np.ones(acc.shape[1]) if self.weights is None else np.delete(np.asarray(self.weights, float), self.target)
        w = np.where(np.isnan(acc), 0.0, w[None, :])
        with np.errstate(invalid="ignore", divide="ignore"):
            return (np.nan_to_num(acc) * w).sum(1) / w.sum(1)


def ablation_curve(
    evaluate: Callable[[tuple[int, ...]], Any],
    order: Sequence[int],
    target: int,
    *,
    steps: Sequence[int] | None = None,
    weights: Any = None,
    progress: bool = False,
) -> AblationCurve:
    """Remove the experts of ``order`` cumulatively and record every class's accuracy (the ablation curve).

    With ``order`` the experts most associated with ``target`` (e.g.
    :meth:`ExpertUsage.top_experts`), a specialised layer shows the target's
    accuracy falling while the other classes' stays: the paper's
    counterfactual picture.

    Parameters
    ----------
    evaluate : callable
        As in :func:`ablation_effects`.
    order : sequence of int
        Experts in the order of removal.
    target : int
        The class of interest.
    steps : sequence of int, optional
        Numbers of experts removed at which to evaluate (default ``0 .. len(order)``).
    weights : array ``[C]``, optional
        Class weights of :attr:`AblationCurve.other_accuracy` (e.g. row counts).
    progress : bool
        Show a tqdm progress bar.

    Examples
    --------
    >>> import numpy as np
    >>> acc = lambda removed: np.array([1.0 - 0.4 * (3 in removed) - 0.4 * (1 in removed), 0.9])
    >>> ablation_curve(acc, [3, 1, 0], target=0).target_accuracy.round(3).tolist()
    [1.0, 0.6, 0.2, 0.2]
    """
    order = tuple(_groups(order))
    if any(len(g) != 1 for g in order):
        raise ValueError(f"order must be a sequence of expert indices; got {order!r}")
    order = tuple(g[0] for g in order)
    if not is_int(target) or target < 0:
        raise ValueError(f"target must be a class index (a non-negative integer); got {describe(target)}")
    steps = list(range(len(order) + 1)) if steps is None else list(steps)
    for k, s in enumerate(steps):
        if not is_int(s) or not 0 <= s <= len(order):
            raise ValueError(f"steps[{k}]={s!r} must be an integer in [0, {len(order)}] (experts removed)")
    rows: list[np.ndarray] = []
    for s in _progress(steps, progress, "ablation curve"):
        rows.append(_evaluate(evaluate, order[:s], rows[0].shape[0] if rows else None))
    accuracy = np.stack(rows)
    if target >= accuracy.shape[1]:
        raise ValueError(f"target={target} is not a class of evaluate's result ({accuracy.shape[1]} classes)")
    w = None if weights is None else _numpy(weights, "weights").astype(np.float64)
    if w is not None and w.shape != (accuracy.shape[1],):
        raise ValueError(f"weights must have one entry per class ({accuracy.shape[1]}); got shape {list(w.shape)}")
    return AblationCurve(order, np.asarray(steps), accuracy, int(target), w)


# --- interventions at inference ---------------------------------------------------------------------


def _column_factors(n: int, experts: tuple[int, ...], value: float) -> np.ndarray:
    v = np.ones(n)
    v[list(experts)] = value
    return v


def scale_coefficients(coefficients: Sequence[Any], experts: Any, *, level: int = 0, scale: float = 0.0) -> list[Any]:
    """Multiply the coefficients of ``experts`` of one level by ``scale`` (after the gate's normalisation).

    ``scale=0`` removes the experts, ``scale > 1`` amplifies them.  The other
    experts' coefficients are returned unchanged (the removed mass is not
    redistributed: see :func:`intervened_coefficients` ``mode="before"`` for that).

    Parameters
    ----------
    coefficients : sequence of arrays ``[..., N_h]``
        Every level's coefficients (any backend), e.g. ``layer.coefficients(params, x)``.
    experts : int or sequence of int
        Experts of level ``level``.
    level : int
        Which level's experts.
    scale : float
        The factor.

    Returns
    -------
    list of arrays
        Of the backend and dtype given.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[0.5, 0.25, 0.25]])
    >>> scale_coefficients([a], [0, 2], scale=2.0)[0].tolist()
    [[1.0, 0.25, 0.5]]
    """
    levels = _levels(coefficients)
    dims = [int(getattr(a, "shape", (0,))[-1]) for a in levels]
    level = _check_level(level, dims)
    experts = _check_experts(experts, dims[level])
    scale = _check_real(scale, "scale")
    a = levels[level]
    name = backend_of(a)
    if name is None:
        raise TypeError(f"coefficients[{level}] must be an array of a tensormoe backend; got {describe(a)}")
    ops = get_ops(name)
    factors = ops.asarray(_column_factors(dims[level], experts, scale), dtype_name(a), like=a)
    out = list(levels)
    out[level] = a * factors
    return out


def _masked_routing_weights(layer: MMoE, ops: Any, routing: _routers.Routing, level: int,
                            experts: tuple[int, ...]) -> Any:
    """Dense coefficients of ``level`` from its logits with ``experts`` set to ``-inf`` before the activation."""
    router = layer.routers[level]
    n = layer.expert_dims[level]
    if routing.logits is None:
        raise ValueError(f"mode='before' needs the gate logits; level {level}'s router {router!r} gave none")
    logits = routing.logits
    mask = np.zeros(n)
    mask[list(experts)] = -np.inf
    masked = logits + ops.asarray(mask, dtype_name(logits), like=logits)
    if isinstance(router, _routers.DenseRouter):
        return _gates.ACTIVATIONS[router.activation](masked, ops=ops)
    if isinstance(router, _routers.TopKRouter):
        if n - len(set(experts)) < router.k:
            raise ValueError(f"mode='before' with a top-{router.k} router needs at least {router.k} experts left; "
                             f"removing {len(set(experts))} of {n} leaves fewer")
        probs = _gates.softmax(masked, ops=ops)
        _, indices = ops.top_k(masked, router.k)
        weights = ops.xp.take_along_axis(probs, indices, axis=-1)
        if router.renormalize:
            weights = weights / ops.xp.sum(weights, axis=-1, keepdims=True)
        return _routers.Routing(weights=weights, indices=indices).to_dense(n)
    raise ValueError(
        f"mode='before' supports dense (entmax15, softmax, sparsemax) and top-k routers; level {level} uses "
        f"{type(router).__name__}: use mode='after'"
    )


def intervened_coefficients(
    layer: Any,
    params: Mapping[str, Any] | None,
    x: Any,
    experts: Any,
    *,
    level: int = 0,
    mode: str = "after",
    scale: float = 0.0,
    backend: str | None = None,
) -> list[Any]:
    """The coefficients of every level with ``experts`` of ``level`` removed (or scaled), for ``apply(..., a)``.

    Parameters
    ----------
    layer : MMoE, or a tensormoe.torch / tensormoe.jax module
        The layer whose gates compute the coefficients.
    params : mapping or None
        Parameters (``None``: the layer's or module's own).
    x : array ``[..., in_dim]``
        The layer's input.
    experts : int or sequence of int
        Experts of level ``level`` (an empty sequence changes nothing).
    level : int
        The level.
    mode : {"after", "before"}
        ``"after"``: scale the coefficients after the gate's normalisation
        (:func:`scale_coefficients`; nothing is redistributed).  ``"before"``:
        set the experts' logits to ``-inf`` before the gate's activation, which
        redistributes their mass over the other experts (a top-k router picks
        the next best); removal only (``scale=0``).
    scale : float
        Factor of the coefficients in ``"after"`` mode (0 removes, > 1 amplifies).
    backend : str, optional
        Compute on this backend (default: the module's, or the current one).

    Returns
    -------
    list of arrays ``[..., N_h]``
        Pass them to ``layer.apply(params, x, coefficients)`` or a module's
        ``forward(x, coefficients)``.

    Examples
    --------
    >>> import numpy as np
    >>> import tensormoe
    >>> layer = tensormoe.CPMMoE(4, 3, [5], rank=2)
    >>> x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    >>> a_after, = intervened_coefficients(layer, None, x, [0, 1])
    >>> a_before, = intervened_coefficients(layer, None, x, [0, 1], mode="before")
    >>> a_after[:, :2].tolist(), a_before[:, :2].tolist(), bool(np.allclose(a_before.sum(-1), 1))
    ([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], True)
    """
    core, params, own_backend = _unwrap(layer, params)
    backend = backend or own_backend
    level = _check_level(level, core.expert_dims)
    experts = _check_experts(experts, core.expert_dims[level])
    scale = _check_real(scale, "scale")
    mode = _check_mode(mode, scale)
    if mode == "after":
        coefficients = core.coefficients(params, x, backend=backend)
        return scale_coefficients(coefficients, experts, level=level, scale=scale) if experts else coefficients
    if len(set(experts)) >= core.expert_dims[level]:
        raise ValueError(f"mode='before' cannot remove every expert of level {level} ({core.expert_dims[level]}): "
                         "the gate would have no expert left to give the mass to")
    routing = core.route(params, x, backend=backend)
    ops = get_ops(backend_of(routing[level].weights))
    out = [r.to_dense(n) for r, n in zip(routing, core.expert_dims)]
    if experts:
        out[level] = _masked_routing_weights(core, ops, routing[level], level, experts)
    return out


def _torch_targets(modules: Any) -> list[Any]:
    items = modules if isinstance(modules, (list, tuple)) else [modules]
    out = []
    for k, m in enumerate(items):
        first = getattr(m, "first", None)
        target = first if first is not None and isinstance(getattr(first, "layer", None), MMoE) else m
        if not (isinstance(getattr(target, "layer", None), MMoE) and hasattr(target, "forward")
                and backend_of(next(iter(target.params.values()))) == "pytorch"):
            raise TypeError(
                f"intervene() takes tensormoe.torch modules (MMoE layers or MMoEMLP blocks) or a list of them; "
                f"modules[{k}] is {describe(m)}"
            )
        out.append(target)
    return out


@contextlib.contextmanager
def intervene(
    modules: Any,
    experts: Any,
    *,
    level: int = 0,
    mode: str = "after",
    scale: float = 0.0,
) -> Iterator[None]:
    """Within the ``with`` block, PyTorch MMoE modules run with ``experts`` removed (or scaled).

    The weights are not touched: each module's gate output is replaced by
    :func:`intervened_coefficients` for the duration of the block, then
    restored (also on errors).  An :class:`tensormoe.torch.MMoEMLP` block is
    intervened on through its first layer, whose coefficients both layers share.

    Parameters
    ----------
    modules : module or list of modules
        :class:`tensormoe.torch.MMoE` layers or :class:`tensormoe.torch.MMoEMLP`
        blocks (e.g. every block of a transformer, or one).
    experts, level, mode, scale
        As in :func:`intervened_coefficients`.

    Raises
    ------
    RuntimeError
        If an intervention is already active on one of the modules (nest the
        experts in one call instead).

    Examples
    --------
    >>> import torch
    >>> from tensormoe.torch import CPMMoE, MMoEMLP
    >>> mlp = MMoEMLP(CPMMoE(4, 8, [3], rank=2), CPMMoE(8, 4, [3], rank=2))
    >>> x = torch.randn(5, 4)
    >>> with intervene(mlp, [1]):
    ...     y = mlp(x)
    >>> a = mlp.coefficients(x)
    >>> a[0][:, 1] = 0
    >>> torch.allclose(y, mlp.second(torch.nn.functional.gelu(mlp.first(x, a)), a))
    True
    """
    targets = _torch_targets(modules)
    if not is_int(experts) and isinstance(experts, Iterable) and not isinstance(experts, (str, bytes)):
        experts = tuple(experts)  # a generator would be used up by the first call
    # check the arguments once, before patching anything
    for target in targets:
        lvl = _check_level(level, target.layer.expert_dims)
        _check_experts(experts, target.layer.expert_dims[lvl])
    _check_mode(mode, _check_real(scale, "scale"))
    for target in targets:
        if "coefficients" in vars(target):
            raise RuntimeError(f"an intervention is already active on {type(target).__name__} {id(target):#x}; "
                               "give all experts to one intervene() call")
    patched = []
    try:
        for target in targets:
            cls = type(target)

            def coefficients(x: Any, _m: Any = target) -> list[Any]:
                return intervened_coefficients(_m, None, x, experts, level=level, mode=mode, scale=scale)

            def forward(x: Any, coefficients: Any = None, _m: Any = target, _cls: Any = cls) -> Any:
                return _cls.forward(_m, x, _m.coefficients(x) if coefficients is None else coefficients)

            target.coefficients = coefficients
            target.forward = forward
            patched.append(target)
        yield
    finally:
        for target in patched:
            del target.coefficients
            del target.forward


# --- permanent edits ----------------------------------------------------------------------------------


def _expert_parameter(layer: MMoE, level: int) -> tuple[str, int]:
    """The parameter holding level ``level``'s expert index, and that index's axis."""
    f = layer.factorization
    letter = f.mode_symbol(level)
    holders = [(name, letters.index(letter)) for name, letters in f.network().items() if letter in letters]
    if len(holders) != 1:  # every format here has exactly one; guard against a new format breaking the rule
        raise NotImplementedError(f"{type(f).__name__}: expert mode {level} is carried by {len(holders)} parameters")
    return holders[0]


def _backend_array(value: np.ndarray, like: Any) -> Any:
    name = backend_of(like)
    if name is None:
        return np.asarray(value, dtype=np.asarray(like).dtype)
    ops = get_ops(name)
    out = ops.asarray(value, dtype_name(like), like=like)
    return out


def scale_expert(layer: Any, params: Mapping[str, Any] | None, expert: int, scale: float, *,
                 level: int = 0) -> dict[str, Any]:
    """New parameters in which expert ``expert`` of ``level`` is multiplied by ``scale`` (a permanent edit).

    Multiplies the expert's own slice of the level's expert factor, so
    ``W[..., n_level = expert, ...]`` (its bias included) is scaled exactly and
    every other expert's weights are unchanged bit for bit; ``scale=0`` removes
    it.  Equivalent to :func:`scale_coefficients` with the same ``scale`` on
    every input (for an :class:`tensormoe.torch.MMoEMLP`, edit both layers).

    Parameters
    ----------
    layer : MMoE, or a tensormoe.torch / tensormoe.jax module
    params : mapping or None
        Parameters (``None``: the layer's or module's own); not modified.
    expert : int
        The expert of ``level``.
    scale : float
    level : int

    Returns
    -------
    dict
        All parameters (the unchanged ones are the same objects), arrays of the
        given backend and dtype.  Load them into a PyTorch module with
        ``module.load_state_dict({"params." + k: v for k, v in new.items()})``,
        into a JAX layer with ``layer.replace(new)``.

    Examples
    --------
    >>> import numpy as np
    >>> import tensormoe
    >>> layer = tensormoe.TRMMoE(4, 3, [5], ranks=2)
    >>> new = scale_expert(layer, None, 2, 0.5)
    >>> w_old, w_new = layer.dense_weight(), layer.dense_weight(new)
    >>> np.allclose(w_new[2], 0.5 * w_old[2]), np.array_equal(np.delete(w_new, 2, 0), np.delete(w_old, 2, 0))
    (True, True)
    """
    core, params, _ = _unwrap(layer, params)
    params = core.params if params is None else params
    level = _check_level(level, core.expert_dims)
    (expert,) = _check_experts([expert], core.expert_dims[level], "expert")
    scale = _check_real(scale, "scale")
    name, axis = _expert_parameter(core, level)
    factor = params[name]
    shape = [1] * len(core.factorization.param_shapes()[name])
    shape[axis] = core.expert_dims[level]
    vector = _column_factors(core.expert_dims[level], (expert,), scale).reshape(shape)
    out = dict(params)
    out[name] = factor * _backend_array(vector, factor)
    return out


@dataclasses.dataclass(frozen=True)
class EditReport:
    """What :func:`edit_expert` achieved, and what else it changed.

    Attributes
    ----------
    expert : tuple of int
        The edited expert (its index on every level).
    level : int
        The level whose expert slice was changed.
    requested : float
        ``||target - W_old[expert]||_F``: the size of the requested change.
    residual : float
        ``||target - W_new[expert]||_F`` (with the new parameters rounded to their dtype).
    achieved : float
        ``1 - residual / requested``: the part of the change achieved (1: exact;
        1 also when nothing was requested).
    shared : int
        Other experts sharing the edited slice (the tuples with the same index on
        ``level``; 0 for a one-level layer).
    leakage : float
        Largest relative change ``||W_new[m] - W_old[m]||_F / ||W_old[m]||_F``
        over the other experts ``m`` (0 when ``shared`` is 0: no other expert's
        parameters change).
    mean_leakage : float
        The mean of that relative change over the ``shared`` experts.

    Examples
    --------
    >>> r = EditReport((1,), 0, requested=2.0, residual=0.5, achieved=0.75, shared=0, leakage=0.0, mean_leakage=0.0)
    >>> r.achieved
    0.75
    """

    expert: tuple[int, ...]
    level: int
    requested: float
    residual: float
    achieved: float
    shared: int
    leakage: float
    mean_leakage: float


def _free_letter(equation: str) -> str:
    used = set(equation)
    return next(opt_einsum.get_symbol(k) for k in range(200) if opt_einsum.get_symbol(k) not in used)


def _level_weights(core: MMoE, params: Mapping[str, np.ndarray], level: int, n: int) -> np.ndarray:
    """``W[..., n_level = n, ...]`` for every tuple of the other levels: ``[N_others..., I(+1), O]``."""
    f = core.factorization
    letter = f.mode_symbol(level)
    terms, operands = [], []
    for name, letters in f.network().items():
        value = params[name]
        if letter in letters:
            axis = letters.index(letter)
            value = np.take(value, n, axis=axis)
            letters = letters.replace(letter, "")
        terms.append(letters)
        operands.append(value)
    out = "".join(f.mode_symbol(k) for k in range(f.order) if k != level)
    return opt_einsum.contract(",".join(terms) + "->" + out, *operands)


def edit_expert(
    layer: Any,
    params: Mapping[str, Any] | None,
    expert: int | Sequence[int],
    target: Any,
    *,
    level: int = 0,
    max_elements: int = 2**26,
) -> tuple[dict[str, Any], EditReport]:
    """Refit one expert's slice so that its matrix comes as close as it can to ``target``.

    Expert ``expert``'s ``[I(+1), O]`` matrix (its bias the last row, with a bias)
    is linear in its slice of level ``level``'s expert factor, every other
    parameter held fixed; the slice is set to the least-squares solution.  The
    span of that slice is limited by the ranks (``R`` matrices for CP, ``R_h``
    for Tucker, ``r_h * r_{h+1}`` for TT and TR), so an arbitrary target is
    met only approximately: the report gives the part achieved.  No other
    parameter changes, so for a one-level layer every other expert is unchanged
    bit for bit; in a hierarchical layer, the experts sharing the index on
    ``level`` change with it and the report measures how much.

    Parameters
    ----------
    layer : MMoE, or a tensormoe.torch / tensormoe.jax module
    params : mapping or None
        Parameters (``None``: the layer's or module's own); not modified.
    expert : int or sequence of int
        The expert's index on every level.
    target : array ``[I(+1), O]``
        The wanted matrix (any backend), e.g. ``layer.expert_weight(params, m)``
        of another expert, or the expert's own with a corrected bias row.
    level : int
        Whose slice to refit (for a hierarchical layer).
    max_elements : int
        Largest number of weight entries computed to measure the leakage
        (the shared experts' matrices, before and after).

    Returns
    -------
    params : dict
        New parameters (the unchanged ones are the same objects).
    report : EditReport

    Examples
    --------
    Make expert 0 of a CP layer copy expert 3 (as far as its rank allows):

    >>> import numpy as np
    >>> import tensormoe
    >>> layer = tensormoe.CPMMoE(4, 3, [5], rank=8)
    >>> new, report = edit_expert(layer, None, 0, layer.expert_weight(None, 3))
    >>> round(report.achieved, 6), report.leakage
    (1.0, 0.0)
    >>> np.allclose(layer.expert_weight(new, 0), layer.expert_weight(None, 3), atol=1e-5)
    True
    """
    core, params, _ = _unwrap(layer, params)
    params = core.params if params is None else params
    index = check_index(expert, core.expert_dims, "expert")
    level = _check_level(level, core.expert_dims)
    f = core.factorization
    out_shape = (f.dims[-2], f.dims[-1])
    t = _numpy(target, "target").astype(np.float64)
    if t.shape != out_shape:
        raise ValueError(f"target must be the expert's matrix of shape {list(out_shape)} ([I(+1), O]); "
                         f"got {list(t.shape)}")
    if not np.isfinite(t).all():
        raise ValueError("target must be finite")
    f.check_params(params)
    p64 = {name: _numpy(params[name], f"params[{name!r}]").astype(np.float64) for name in f.param_shapes()}
    name, axis = _expert_parameter(core, level)
    n_h = index[level]
    # the expert's matrix is linear in its slice: one basis matrix per slice entry
    operands = f.slice_params(p64, index)
    names = list(f.network())
    pos = names.index(name)
    terms, out = f.slice_equation().split("->")
    terms = terms.split(",")
    z = _free_letter(f.slice_equation())
    slice_shape = operands[pos].shape
    j = math.prod(slice_shape)
    basis_operands = list(operands)
    basis_operands[pos] = np.eye(j).reshape(j, *slice_shape)
    terms[pos] = z + terms[pos]
    basis = opt_einsum.contract(",".join(terms) + "->" + z + out, *basis_operands).reshape(j, -1)
    old = opt_einsum.contract(f.slice_equation(), *operands)
    solution, *_ = np.linalg.lstsq(basis.T, t.reshape(-1), rcond=None)
    new_factor = p64[name].copy()
    sl = [slice(None)] * new_factor.ndim
    sl[axis] = n_h
    new_factor[tuple(sl)] = solution.reshape(slice_shape)
    new_params = dict(params)
    new_params[name] = _backend_array(new_factor, params[name])
    # measure on the parameters as stored (rounded to their dtype)
    p_new = dict(p64)
    p_new[name] = _numpy(new_params[name], name).astype(np.float64)
    w_new = opt_einsum.contract(f.slice_equation(), *f.slice_params(p_new, index))
    requested = float(np.linalg.norm(t - old))
    residual = float(np.linalg.norm(t - w_new))
    achieved = 1.0 - residual / requested if requested > 0 else 1.0
    others = [d for h, d in enumerate(core.expert_dims) if h != level]
    shared = math.prod(others) - 1
    leakage = mean_leakage = 0.0
    if shared:
        size = math.prod(others) * math.prod(out_shape)
        if size > max_elements:
            raise ValueError(f"measuring the leakage needs {size:,} weight entries (the {shared + 1:,} experts sharing "
                             f"index {n_h} of level {level}); expected at most max_elements={max_elements:,}")
        before = _level_weights(core, p64, level, n_h).reshape(-1, *out_shape)
        after = _level_weights(core, p_new, level, n_h).reshape(-1, *out_shape)
        own = int(np.ravel_multi_index([i for h, i in enumerate(index) if h != level], others))
        keep = np.arange(before.shape[0]) != own
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.linalg.norm((after - before)[keep], axis=(1, 2)) / np.linalg.norm(before[keep], axis=(1, 2))
        rel = np.nan_to_num(rel, nan=0.0, posinf=np.inf)
        leakage, mean_leakage = float(rel.max()), float(rel.mean())
    return new_params, EditReport(index, level, requested, residual, achieved, shared, leakage, mean_leakage)


def add_rank_one(
    layer: Any, params: Mapping[str, Any] | None, expert: int | Sequence[int], u: Any, v: Any
) -> tuple[MMoE, dict[str, Any]]:
    """A layer one rank larger in which one expert gains ``u v^T`` exactly and no other expert changes.

    An arbitrary correction of one expert rarely lies in the span of its own
    slice (:func:`edit_expert` reports how little of it can be carried); one
    more rank can carry a rank-one correction exactly.  The new rank component
    is owned by the expert: its entries in every expert factor are one-hot on
    the expert's index, so ``W_new[n] = W[n] + u v^T`` for ``n = expert`` and
    ``W_new[m] = W[m]`` for every other expert (hierarchical layers included).

    * CP: rank ``R + 1``; the new column of each factor is the one-hot index, ``u`` or ``v``.
    * Tucker: every rank ``+ 1`` (each must stay within its mode's size), the
      core extended block-diagonally by a one.
    * TT and TR: every bond that can grow grows by one (TT keeps its boundary
      ranks 1), each core extended block-diagonally by the new component's entry.

    Parameters
    ----------
    layer : MMoE, or a tensormoe.torch / tensormoe.jax module
    params : mapping or None
        Parameters (``None``: the layer's or module's own); not modified.
    expert : int or sequence of int
        The expert's index on every level.
    u : array ``[I(+1)]``
        Input-side vector (with a bias, its last entry multiplies the constant
        one: ``u[-1] * v`` is added to the expert's bias).
    v : array ``[O]``
        Output-side vector.

    Returns
    -------
    layer : MMoE
        A new functional layer of the same class and configuration, ranks grown,
        holding the new parameters (wrap it with :func:`tensormoe.torch.wrap` or
        :func:`tensormoe.jax.wrap` for a module).
    params : dict
        The new parameters, of the given backend and dtype (gates unchanged).

    Examples
    --------
    >>> import numpy as np
    >>> import tensormoe
    >>> layer = tensormoe.CPMMoE(4, 3, [5], rank=2, dtype="float64")
    >>> u, v = np.arange(5.0), np.ones(3)
    >>> bigger, params = add_rank_one(layer, None, 1, u, v)
    >>> bigger.rank, np.allclose(bigger.dense_weight()[1], layer.dense_weight()[1] + np.outer(u, v))
    (3, True)
    >>> np.allclose(np.delete(bigger.dense_weight(), 1, 0), np.delete(layer.dense_weight(), 1, 0))
    True
    """
    core, params, _ = _unwrap(layer, params)
    params = core.params if params is None else params
    index = check_index(expert, core.expert_dims, "expert")
    f = core.factorization
    h, order = f.n_expert_modes, f.order
    vectors = {}
    for k, (name, value) in enumerate((("u", u), ("v", v))):
        arr = _numpy(value, name).astype(np.float64)
        if arr.shape != (f.dims[h + k],):
            raise ValueError(f"{name} must be a vector of {f.dims[h + k]} entries (the {'input' if k == 0 else 'output'} "
                             f"mode{', the bias row included' if k == 0 and core.bias else ''}); got shape {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} must be finite")
        vectors[h + k] = arr
    # the new component's entries along every mode: one-hot on the expert, then u, then v
    entries = [np.eye(f.dims[k])[index[k]] for k in range(h)] + [vectors[h], vectors[h + 1]]
    f.check_params(params)
    p64 = {name: _numpy(params[name], f"params[{name!r}]").astype(np.float64) for name in f.param_shapes()}
    config = core.config()
    new: dict[str, np.ndarray] = {}
    if f.name == "cp":
        for k in range(order):
            new[f"factor_{k}"] = np.concatenate([p64[f"factor_{k}"], entries[k][:, None]], axis=1)
        config["rank"] = f.rank + 1
    elif f.name == "tucker":
        too_big = [k for k, (r, d) in enumerate(zip(f.ranks, f.dims)) if r + 1 > d]
        if too_big:
            raise ValueError(f"add_rank_one grows every Tucker rank by one, but ranks {list(f.ranks)} already reach "
                             f"the mode sizes {list(f.dims)} at modes {too_big}; expected ranks below the mode sizes")
        for k in range(order):
            new[f"factor_{k}"] = np.concatenate([p64[f"factor_{k}"], entries[k][:, None]], axis=1)
        grown = np.zeros(tuple(r + 1 for r in f.ranks))
        grown[tuple(slice(0, r) for r in f.ranks)] = p64["core"]
        grown[tuple(r for r in f.ranks)] = 1.0
        new["core"] = grown
        config["ranks"] = [r + 1 for r in f.ranks]
    else:  # TT / TR: cores G_k[r_k, d_k, r_k+1], block-diagonal growth of the bonds that may grow
        ring = f.name == "tr"
        grow = [1 if ring or 0 < k < order else 0 for k in range(order + 1)]
        bonds = [b + g for b, g in zip(f.bonds, grow)]
        for k in range(order):
            old = p64[f"factor_{k}"]
            core_k = np.zeros((bonds[k], f.dims[k], bonds[k + 1]))
            core_k[: old.shape[0], :, : old.shape[2]] = old
            core_k[bonds[k] - 1, :, bonds[k + 1] - 1] += entries[k]
            new[f"factor_{k}"] = core_k
        config["ranks"] = bonds
    bigger = layer_from_config(config)
    out = {name: value for name, value in params.items() if name not in new}
    out.update({name: _backend_array(value, params[name]) for name, value in new.items()})
    bigger.params = {name: out[name] for name in bigger.param_shapes()}
    return bigger, dict(bigger.params)
