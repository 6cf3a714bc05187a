"""Factorized weight tensors: CP, Tucker, tensor-train (TT) and tensor-ring (TR).

A factorization describes the weight tensor of all experts,
``W[n_1, ..., n_H, i, o]``, as a small tensor network.  Each class here holds,
in one place, everything about its format:

* the shapes of its parameters and the validation of its ranks;
* the tensor network itself — which index letters each parameter carries — from
  which the forward equation, the per-expert slice and the accounting derive;
* an initialisation with a controlled standard deviation of the reconstructed
  tensor;
* the reconstruction of the dense tensor through TensorLy (the reference that
  tests compare with; never used on the forward path).

Modes are ordered ``[N_1, ..., N_H, I, O]``: ``H`` expert modes, then the input
mode (``in_dim + 1`` when the layer has a bias) and the output mode.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import opt_einsum

from ..backend import tensorly_backend
from ..validation import (
    as_list,
    check_index,
    check_int_sequence,
    check_params,
    check_positive_int,
    check_positive_real,
    describe,
    is_int,
)

__all__ = [
    "CP", "TR", "TT", "Factorization", "Tucker", "FACTORIZATIONS", "OverparameterizedWarning", "RankWarning",
]

#: Most elements one parameter may have (NumPy cannot address more bytes than 2**63).
_MAX_ELEMENTS = 2**60
_PACKAGE = __name__.split(".")[0]


def _warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside tensormoe (whichever path built the object)."""
    frame, level = sys._getframe(1), 2  # stacklevel 2: _warn's caller
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == _PACKAGE:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class OverparameterizedWarning(UserWarning):
    """Warned when a factorization holds more parameters than the dense tensor it stands for.

    Such ranks save nothing: the dense weight tensor would be smaller.  Silence
    it with ``warnings.simplefilter("ignore", OverparameterizedWarning)``, or turn
    it into an error with ``"error"``.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     CP([8, 5, 6], rank=100, n_expert_modes=1).check_size()
    >>> caught[0].category.__name__
    'OverparameterizedWarning'
    """


class RankWarning(UserWarning):
    """Warned when ranks are accepted as the reference implementation reads them, not as they are written.

    Two spellings of the reference muMoE implementation give it:

    * Tucker ranks above their mode's size (an over-complete factor ``[d_k, R_k]``
      with ``R_k > d_k``): the tensor is the same as with smaller ranks, so some
      parameters are redundant; the message says how many.
    * A TT/TR core shape ``[r_k, n_k, r_k+1]`` whose middle entry ``n_k`` is not
      the mode's size: only the bonds ``r_k`` and ``r_k+1`` are read (the
      reference overwrites ``n_k`` with the mode size).  ``None`` there is read
      the same way, silently.

    Silence it with ``warnings.simplefilter("ignore", RankWarning)``, or turn it
    into an error with ``"error"``.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     Tucker([32, 5, 8], ranks=[8, 8, 8], n_expert_modes=1).ranks
    (8, 8, 8)
    >>> print(caught[0].message)  # doctest: +NORMALIZE_WHITESPACE
    ranks=[8, 8, 8] with dims=[32, 5, 8]: ranks[1]=8 exceeds the size 5 of mode 1 (an over-complete factor);
    the tensor is the one ranks=[8, 5, 8] give, so 207 of the 872 factorized parameters are redundant;
    expected at most ranks=[8, 5, 8] to hold none
    """


class Factorization:
    """A factorized weight tensor format (abstract base).

    Parameters
    ----------
    dims : sequence of int
        Mode sizes ``[N_1, ..., N_H, I, O]``.
    n_expert_modes : int
        ``H``, the number of leading expert modes.

    Attributes
    ----------
    name : str
        ``"cp"``, ``"tucker"``, ``"tt"`` or ``"tr"``.
    dims : tuple of int
        The mode sizes.
    n_expert_modes : int
        The number of expert modes ``H``.

    Examples
    --------
    >>> f = CP([4, 3, 2], rank=5, n_expert_modes=1)
    >>> f.param_shapes()
    {'factor_0': (4, 5), 'factor_1': (3, 5), 'factor_2': (2, 5)}
    """

    name: str = ""
    #: the constructor argument holding the ranks (for messages)
    _rank_argument = "ranks"
    #: how many of the parameters are not expert factors (used by the init)
    _n_free: int = 2

    def __init__(self, dims: Sequence[int], n_expert_modes: int) -> None:
        self.dims = tuple(check_int_sequence(dims, "dims"))
        self.n_expert_modes = check_positive_int(n_expert_modes, "n_expert_modes")
        if len(self.dims) != self.n_expert_modes + 2:
            raise ValueError(
                f"dims must have n_expert_modes + 2 = {self.n_expert_modes + 2} entries "
                f"[N_1, ..., N_H, I, O]; got {len(self.dims)}: {list(self.dims)}"
            )

    # -- the network ---------------------------------------------------------------
    @property
    def order(self) -> int:
        """Number of modes ``d = H + 2``.

        Examples
        --------
        >>> CP([8, 4, 5, 6], rank=3, n_expert_modes=2).order
        4
        """
        return len(self.dims)

    def mode_symbol(self, k: int) -> str:
        """The einsum letter of mode ``k``.

        Letters are assigned in a fixed order: the batch index first, then the
        ``d`` modes, then the rank (bond) indices.

        Examples
        --------
        >>> f = CP([8, 5, 6], rank=3, n_expert_modes=1)
        >>> f.batch_symbol, [f.mode_symbol(k) for k in range(f.order)]
        ('a', ['b', 'c', 'd'])
        """
        return opt_einsum.get_symbol(1 + k)

    def rank_symbol(self, k: int) -> str:
        """The einsum letter of rank index ``k``.

        Examples
        --------
        >>> CP([8, 5, 6], rank=3, n_expert_modes=1).rank_symbol(0)
        'e'
        """
        return opt_einsum.get_symbol(1 + self.order + k)

    #: the einsum letter of the batch index
    batch_symbol = opt_einsum.get_symbol(0)

    @property
    def n_rank_indices(self) -> int:
        """How many rank indices the format has (CP: one, shared by every factor; the others: one per mode).

        Examples
        --------
        >>> CP([8, 5, 6], rank=3, n_expert_modes=1).n_rank_indices, TT([8, 5, 6], ranks=2, n_expert_modes=1).n_rank_indices
        (1, 3)
        """
        return self.order

    def default_rank_index(self) -> int:
        """The rank index rank parallelism splits unless told otherwise: the last one (CP: its only rank).

        Tucker: the output mode's rank; TT and TR: the bond between the input and the output core.

        Examples
        --------
        >>> Tucker([8, 5, 6], ranks=[2, 3, 4], n_expert_modes=1).default_rank_index()
        2
        """
        return self.n_rank_indices - 1

    def check_rank_index(self, rank_index: int | None = None) -> int:
        """``rank_index`` as an ``int`` once checked to name a rank of the format (default :meth:`default_rank_index`).

        Raises
        ------
        ValueError
            If ``rank_index`` names no rank of the format.

        Examples
        --------
        >>> TT([8, 5, 6], ranks=2, n_expert_modes=1).check_rank_index(), CP([8, 5, 6], rank=3, n_expert_modes=1).check_rank_index(0)
        (2, 0)
        """
        if rank_index is None:
            return self.default_rank_index()
        if not is_int(rank_index) or not 0 <= rank_index < self.n_rank_indices:
            raise ValueError(f"rank_index={rank_index!r} does not name a rank of {self!r}; expected an integer in "
                             f"[0, {self.n_rank_indices})")
        return int(rank_index)

    def rank_axes(self, rank_index: int | None = None) -> dict[str, int]:
        """The parameters that carry rank index ``rank_index`` (default :meth:`default_rank_index`), and on which axis.

        Read from :meth:`network`: the parameters that hold the rank's letter.

        Raises
        ------
        ValueError
            If ``rank_index`` names no rank of the format.

        Examples
        --------
        >>> Tucker([8, 5, 6], ranks=[2, 3, 4], n_expert_modes=1).rank_axes()
        {'factor_2': 1, 'core': 2}
        """
        letter = self.rank_symbol(self.check_rank_index(rank_index))
        return {name: letters.index(letter) for name, letters in self.network().items() if letter in letters}

    def network(self) -> dict[str, str]:
        """Map each parameter name to the einsum letters of its axes.

        This is the tensor network of the format: the forward, dense and slice
        equations, the parameter shapes and the accounting all derive from it.

        Examples
        --------
        >>> CP([8, 5, 6], rank=3, n_expert_modes=1).network()
        {'factor_0': 'be', 'factor_1': 'ce', 'factor_2': 'de'}
        >>> Tucker([8, 5, 6], ranks=[2, 3, 4], n_expert_modes=1).network()
        {'factor_0': 'be', 'factor_1': 'cf', 'factor_2': 'dg', 'core': 'efg'}
        >>> TR([8, 5, 6], ranks=[2, 3, 4], n_expert_modes=1).network()
        {'factor_0': 'ebf', 'factor_1': 'fcg', 'factor_2': 'gde'}
        """
        raise NotImplementedError

    def _network(self) -> dict[str, str]:
        """:meth:`network`, computed once (the forward's gathers read it on every call).

        Not a ``functools.cached_property``: on Python 3.11 that takes a lock,
        which ``torch.compile(fullgraph=True)`` cannot trace.
        """
        network = self.__dict__.get("_network_once")
        if network is None:
            network = self.__dict__["_network_once"] = self.network()
        return network

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each parameter, by name, in the order of :meth:`network`.

        Examples
        --------
        >>> Tucker([8, 5, 6], ranks=[2, 3, 4], n_expert_modes=1).param_shapes()
        {'factor_0': (8, 2), 'factor_1': (5, 3), 'factor_2': (6, 4), 'core': (2, 3, 4)}
        >>> TT([8, 5, 6], ranks=3, n_expert_modes=1).param_shapes()
        {'factor_0': (1, 8, 3), 'factor_1': (3, 5, 3), 'factor_2': (3, 6, 1)}
        """
        raise NotImplementedError

    def forward_equation(self) -> str:
        """Einsum equation of the forward pass.

        Operands: the ``H`` coefficient matrices ``a_h[b, N_h]``, the input
        ``x[b, I]``, then the parameters in :meth:`network` order; result ``y[b, O]``.

        Examples
        --------
        With one expert level, ``a`` is the batch, ``b`` the experts, ``c`` the
        input, ``d`` the output and ``e`` the CP rank:

        >>> CP([8, 5, 6], rank=3, n_expert_modes=1).forward_equation()
        'ab,ac,be,ce,de->ad'

        Each further level adds one coefficient matrix and one factor:

        >>> CP([8, 4, 5, 6], rank=3, n_expert_modes=2).forward_equation()
        'ab,ac,ad,bf,cf,df,ef->ae'
        """
        return self.routed_equation([False] * self.n_expert_modes)

    def selection_symbol(self, level: int) -> str:
        """The einsum letter of the selected-expert axis ``k`` of a sparse level.

        Examples
        --------
        >>> CP([8, 5, 6], rank=3, n_expert_modes=1).selection_symbol(0)
        'h'
        """
        return opt_einsum.get_symbol(1 + 2 * self.order + level)

    def _sparse_letters(self, sparse: Sequence[bool], joint: Sequence[int] | None = None) -> dict[str, str]:
        if len(sparse) != self.n_expert_modes:
            raise ValueError(f"sparse must flag each of the {self.n_expert_modes} expert levels; got {list(sparse)!r}")
        joint = self._check_joint(joint, sparse)
        return {self.mode_symbol(h): self.selection_symbol(joint[0] if h in joint else h)
                for h, s in enumerate(sparse) if s}

    def _check_joint(self, joint: Sequence[int] | None, sparse: Sequence[bool] | None = None) -> tuple[int, ...]:
        levels = () if joint is None else tuple(joint)
        if not levels:
            return ()
        if (len(levels) < 2 or len(set(levels)) != len(levels) or not all(is_int(h) for h in levels)
                or not all(0 <= h < self.n_expert_modes for h in levels)):
            raise ValueError(f"joint must name two or more distinct expert levels in [0, {self.n_expert_modes}); "
                             f"got {joint!r}")
        if sparse is not None and not all(sparse[h] for h in levels):
            raise ValueError(f"joint={joint!r} joins sparse levels only; sparse={list(sparse)!r}")
        return tuple(sorted(int(h) for h in levels))

    def routed_equation(self, sparse: Sequence[bool], joint: Sequence[int] | None = None) -> str:
        """Einsum equation of the forward pass with some levels routed sparsely.

        A dense level ``h`` contributes its coefficients ``a_h[b, N_h]``; a sparse
        level contributes the weights ``w_h[b, k_h]`` of its selected experts, and
        every parameter carrying that level's expert axis is replaced by its rows
        gathered per input (:meth:`gather_params`): axes ``[b, k_h, ...rest]`` in
        place of the expert axis.  Derived from :meth:`network`, so it holds for
        every format; all sparse levels dense gives :meth:`forward_equation`.

        ``joint`` names sparse levels selected together (product keys): slot ``m``
        selects one expert of each joined level, so they share one selection axis,
        and their weights ``w[b, m]`` appear once, as the operand of the first
        joined level (the others have no operand).

        Examples
        --------
        >>> CP([8, 5, 6], rank=3, n_expert_modes=1).routed_equation([True])
        'ah,ac,ahe,ce,de->ad'
        >>> CP([4, 4, 5, 6], rank=3, n_expert_modes=2).routed_equation([True, True], joint=(0, 1))
        'aj,ad,ajf,ajf,df,ef->ae'
        """
        key = (tuple(bool(s) for s in sparse), self._check_joint(joint, sparse))
        cache = self.__dict__.setdefault("_equations", {})
        if key not in cache:
            cache[key] = self._routed_equation(sparse, key[1])
        return cache[key]

    def _routed_equation(self, sparse: Sequence[bool], joint: tuple[int, ...] = ()) -> str:
        b = self.batch_symbol
        selected = self._sparse_letters(sparse, joint)
        terms = [b + selected.get(self.mode_symbol(h), self.mode_symbol(h))
                 for h in range(self.n_expert_modes) if h not in joint[1:]]
        terms.append(b + self.mode_symbol(self.order - 2))
        for letters in self.network().values():
            experts = [c for c in letters if c in selected]
            if experts:
                axes = "".join(dict.fromkeys(selected[c] for c in experts))
                letters = b + axes + "".join(c for c in letters if c not in selected)
            terms.append(letters)
        return ",".join(terms) + "->" + b + self.mode_symbol(self.order - 1)

    def gather_params(self, params: Mapping[str, Any], indices: Mapping[int, Any], ops: Any,
                      joint: Sequence[int] | None = None) -> list[Any]:
        """Parameters with the expert rows selected per input (operands of :meth:`routed_equation`).

        Parameters
        ----------
        params : mapping of str to array
            The factors (and core).
        indices : mapping of int to integer array ``[B, k_h]``
            The selected experts of each sparse level.
        ops : Ops
            The backend's array operations.
        joint : sequence of int, optional
            Sparse levels selected together (as in :meth:`routed_equation`): their
            index arrays have the same shape ``[B, m]``, slot ``j`` of each naming
            one expert of a selected tuple.

        Returns
        -------
        list of arrays
            In :meth:`network` order.  A parameter carrying the expert axes of sparse
            levels ``h1, h2, ...`` becomes ``[B, k_h1, k_h2, ..., rest]``: only the
            ``B * k`` selected rows are read, never all ``N``.  Joined levels share
            one axis: a parameter carrying two of them is read at the ``B * m``
            selected tuples only (a diagonal gather).

        Examples
        --------
        >>> import numpy as np
        >>> from tensormoe.frameworks import get_ops
        >>> f = CP([1000, 5, 6], rank=3, n_expert_modes=1)
        >>> p = f.init(np.random.default_rng(0), std=0.1)
        >>> [g.shape for g in f.gather_params(p, {0: np.array([[7, 9]])}, get_ops("numpy"))]
        [(1, 2, 3), (5, 3), (6, 3)]
        >>> f2 = TR([4, 4, 5, 6], ranks=2, n_expert_modes=2)
        >>> p2 = f2.init(np.random.default_rng(0), std=0.1)
        >>> pairs = {0: np.array([[3, 0]]), 1: np.array([[1, 1]])}
        >>> [g.shape for g in f2.gather_params(p2, pairs, get_ops("numpy"), joint=(0, 1))]
        [(1, 2, 2, 2), (1, 2, 2, 2), (2, 5, 2), (2, 6, 2)]
        """
        joint = self._check_joint(joint, [h in indices for h in range(self.n_expert_modes)])
        selected = {self.mode_symbol(h): h for h in indices}
        axis_of = {h: joint[0] if h in joint else h for h in indices}  # the selection axis each level uses
        out = []
        for name, letters in self._network().items():
            levels = [selected[c] for c in letters if c in selected]
            value = params[name]
            if levels:
                axes = [letters.index(self.mode_symbol(h)) for h in levels]
                value = ops.xp.moveaxis(value, tuple(axes), tuple(range(len(axes))))
                shared = list(dict.fromkeys(axis_of[h] for h in levels))
                index = []
                for h in levels:
                    idx = indices[h]
                    shape = [idx.shape[0]] + [1] * len(shared)
                    shape[1 + shared.index(axis_of[h])] = idx.shape[1]
                    index.append(ops.xp.reshape(idx, tuple(shape)))
                value = ops.gather(value, tuple(index))
            out.append(value)
        return out

    def dense_equation(self, joint: Sequence[int] | None = None) -> str:
        """Einsum equation of the forward pass through the dense tensor ``W``.

        Operands: the ``H`` coefficient matrices, the input and ``W``.  With
        ``joint`` levels (product keys), their coefficients are one tensor
        ``a[b, N_h1, N_h2, ...]`` (:func:`tensormoe.routing.pair_to_dense`), the
        operand of the first joined level.

        Examples
        --------
        >>> CP([8, 5, 6], rank=3, n_expert_modes=1).dense_equation()
        'ab,ac,bcd->ad'
        >>> CP([4, 4, 5, 6], rank=3, n_expert_modes=2).dense_equation(joint=(0, 1))
        'abc,ad,bcde->ae'
        """
        joint = self._check_joint(joint)
        b = self.batch_symbol
        modes = "".join(self.mode_symbol(k) for k in range(self.order))
        terms = []
        for h in range(self.n_expert_modes):
            if h in joint[1:]:
                continue
            terms.append(b + ("".join(self.mode_symbol(j) for j in joint) if h in joint else self.mode_symbol(h)))
        terms += [b + self.mode_symbol(self.n_expert_modes), modes]
        return ",".join(terms) + "->" + b + self.mode_symbol(self.order - 1)

    def slice_equation(self) -> str:
        """Einsum equation of one expert's ``[I, O]`` matrix from the sliced parameters.

        Operands: the output of :meth:`slice_params`.

        Examples
        --------
        >>> CP([8, 5, 6], rank=3, n_expert_modes=1).slice_equation()
        'e,ce,de->cd'
        """
        expert = {self.mode_symbol(k) for k in range(self.n_expert_modes)}
        terms = ["".join(c for c in letters if c not in expert) for letters in self.network().values()]
        return ",".join(terms) + "->" + self.mode_symbol(self.order - 2) + self.mode_symbol(self.order - 1)

    def slice_params(self, params: Mapping[str, Any], index: Sequence[int]) -> list[Any]:
        """Parameters with each expert mode fixed at ``index`` (operands of :meth:`slice_equation`).

        Examples
        --------
        >>> import numpy as np
        >>> f = CP([8, 5, 6], rank=3, n_expert_modes=1)
        >>> p = f.init(np.random.default_rng(0), std=0.1)
        >>> [a.shape for a in f.slice_params(p, [2])]
        [(3,), (5, 3), (6, 3)]
        >>> w2 = np.einsum(f.slice_equation(), *f.slice_params(p, [2]))
        >>> np.allclose(w2, f.to_dense(p)[2])
        True
        """
        index = check_index(index, self.dims[: self.n_expert_modes])
        self.check_params(params)
        fixed = {self.mode_symbol(k): int(n) for k, n in enumerate(index)}
        out = []
        for name, letters in self.network().items():
            sl = tuple(fixed.get(c, slice(None)) for c in letters)
            out.append(params[name][sl])
        return out

    def check_size(self) -> None:
        """Raise ``ValueError`` if a parameter would have more elements than one array can address.

        Warn (:class:`OverparameterizedWarning`) if the factors hold more
        parameters than the dense tensor has entries.

        Examples
        --------
        >>> CP([4, 3, 2], rank=2**62, n_expert_modes=1).check_size()
        Traceback (most recent call last):
        ...
        ValueError: rank=4611686018427387904 with dims=[4, 3, 2] give factor_0 of shape (4, 4611686018427387904) ...
        """
        for name, shape in self.param_shapes().items():
            size = math.prod(shape)
            if size > _MAX_ELEMENTS:
                raise ValueError(
                    f"{self._rank_argument}={self.describe_ranks()!r} with dims={list(self.dims)} give {name} "
                    f"of shape {shape} ({size} elements); expected at most 2**60 elements per parameter"
                )
        count, dense = self.n_params(), math.prod(self.dims)
        if count > dense:
            _warn(
                f"{self._rank_argument}={self.describe_ranks()!r} with dims={list(self.dims)} give {count:,} "
                f"factorized parameters, {count / dense:.3g}x the {dense:,} entries of the dense tensor they stand "
                "for; expected fewer (smaller ranks save parameters, these save nothing)",
                OverparameterizedWarning,
            )

    # -- counting ------------------------------------------------------------------
    def n_params(self) -> int:
        """Number of scalars in the factors.

        Examples
        --------
        >>> CP([4, 3, 2], rank=5, n_expert_modes=1).n_params()
        45
        """
        return sum(math.prod(s) for s in self.param_shapes().values())

    # -- initialisation ------------------------------------------------------------
    def _paths(self) -> int:
        """Number of rank-index combinations that contribute to one entry at init."""
        raise NotImplementedError

    def _expert_init(self, rng: np.random.Generator, level: int, shape: tuple[int, ...]) -> np.ndarray:
        # first level N(1, 1), later levels exactly one: all experts start close to
        # one shared map, later levels have no effect at init (reference scheme).
        if level == 0:
            return rng.normal(1.0, 1.0, size=shape)
        return np.ones(shape)

    def init(self, rng: np.random.Generator, std: float) -> dict[str, np.ndarray]:
        """Draw float64 parameters whose reconstructed tensor has entry std ``std``.

        Expert factors start as ``1 + N(0, 1)`` on the first level and exactly one
        on later levels, so experts begin correlated (correlation 1/2) around a
        shared map; every other factor is zero-mean normal with the common std
        ``s`` that makes ``Var(W) = std**2``:
        ``s = (std**2 / (2 * paths)) ** (1 / (2 * K))`` with ``K`` free factors.

        Examples
        --------
        >>> import numpy as np
        >>> f = CP([64, 65, 64], rank=32, n_expert_modes=1)
        >>> p = f.init(np.random.default_rng(0), std=0.1)
        >>> 0.08 < float(np.std(f.to_dense(p))) < 0.12
        True
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, e.g. np.random.default_rng(0); got {describe(rng)}")
        std = check_positive_real(std, "std")
        # in log space: std**2 would overflow for std > 1e154 although s itself is finite
        s = math.exp((2.0 * math.log(std) - math.log(2.0 * self._paths())) / (2 * self._n_free))
        params = {}
        for name, shape in self.param_shapes().items():
            level = self._expert_level(name)
            params[name] = self._expert_init(rng, level, shape) if level is not None else rng.normal(0.0, s, size=shape)
        return params

    def _expert_level(self, name: str) -> int | None:
        if name.startswith("factor_"):
            k = int(name.split("_")[1])
            return k if k < self.n_expert_modes else None
        return None

    # -- reconstruction ------------------------------------------------------------
    def check_params(self, params: Mapping[str, Any]) -> Mapping[str, Any]:
        """Raise unless ``params`` holds every factor with its shape, all on one backend.

        Other entries (such as a layer's gates) are ignored.

        Examples
        --------
        >>> CP([4, 3, 2], rank=5, n_expert_modes=1).check_params({})
        Traceback (most recent call last):
        ...
        ValueError: params is missing factor_0, factor_1, factor_2 (expected the keys ['factor_0', 'factor_1', 'factor_2'])
        """
        return check_params(params, self.param_shapes(), exact=False)

    def to_tensorly(self, params: Mapping[str, Any]) -> Any:
        """The TensorLy factorized tensor holding ``params`` (no copy).

        Examples
        --------
        >>> import numpy as np
        >>> f = TT([8, 5, 6], ranks=3, n_expert_modes=1)
        >>> type(f.to_tensorly(f.init(np.random.default_rng(0), std=0.1))).__name__
        'TTTensor'
        """
        raise NotImplementedError

    def _to_tensor(self, tensor: Any) -> Any:
        raise NotImplementedError

    def to_dense(self, params: Mapping[str, Any], backend: str | None = None) -> Any:
        """Reconstruct the full tensor ``W`` with TensorLy on ``backend`` (default: the current one).

        This builds ``prod(dims)`` elements: for tests and small layers only.

        Examples
        --------
        >>> import numpy as np
        >>> f = Tucker([8, 5, 6], ranks=[2, 3, 4], n_expert_modes=1)
        >>> f.to_dense(f.init(np.random.default_rng(0), std=0.1)).shape
        (8, 5, 6)
        """
        self.check_params(params)
        with tensorly_backend(backend):
            return self._to_tensor(self.to_tensorly(params))

    def describe_ranks(self) -> Any:
        """The validated ranks in the format's own convention.

        CP: the rank; Tucker: one rank per mode; TT and TR: the ``d + 1`` bond
        ranks ``[r_0, ..., r_d]`` (``r_d = r_0``).

        Examples
        --------
        >>> CP([8, 5, 6], rank=3, n_expert_modes=1).describe_ranks()
        3
        >>> TT([8, 5, 6], ranks=3, n_expert_modes=1).describe_ranks()
        [1, 3, 3, 1]
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dims={list(self.dims)}, ranks={self.describe_ranks()!r})"


class CP(Factorization):
    """CP (CANDECOMP/PARAFAC): ``W = sum_r U_1[:, r] o ... o U_d[:, r]``.

    Parameters
    ----------
    dims : sequence of int
        Mode sizes ``[N_1, ..., N_H, I, O]``.
    rank : int
        The CP rank ``R``.
    n_expert_modes : int
        ``H``.

    Examples
    --------
    >>> CP([8, 5, 6], rank=3, n_expert_modes=1).forward_equation()
    'ab,ac,be,ce,de->ad'
    """

    name = "cp"
    _rank_argument = "rank"


    @property
    def n_rank_indices(self) -> int:
        """One: every factor shares the rank.

        Examples
        --------
        >>> CP([8, 5, 6], rank=3, n_expert_modes=1).n_rank_indices
        1
        """
        return 1

    def __init__(self, dims: Sequence[int], rank: int, n_expert_modes: int) -> None:
        super().__init__(dims, n_expert_modes)
        self.rank = check_positive_int(rank, "rank")

    def describe_ranks(self) -> int:
        return self.rank

    def network(self) -> dict[str, str]:
        r = self.rank_symbol(0)
        return {f"factor_{k}": self.mode_symbol(k) + r for k in range(self.order)}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"factor_{k}": (d, self.rank) for k, d in enumerate(self.dims)}

    def _paths(self) -> int:
        return self.rank

    def to_tensorly(self, params: Mapping[str, Any]) -> Any:
        from tensorly.cp_tensor import CPTensor

        return CPTensor((None, [params[f"factor_{k}"] for k in range(self.order)]))

    def _to_tensor(self, tensor: Any) -> Any:
        import tensorly as tl

        return tl.cp_to_tensor(tensor)


class Tucker(Factorization):
    """Tucker: ``W = G x_1 U_1 x_2 ... x_d U_d`` with a core ``G[R_1, ..., R_d]``.

    Parameters
    ----------
    dims : sequence of int
        Mode sizes ``[N_1, ..., N_H, I, O]``.
    ranks : int or sequence of int
        One rank per mode; an integer is used for every mode and clipped to each
        mode's size.  An explicit rank above its mode's size is kept as given (an
        over-complete factor, as the reference implementation allows) with a
        :class:`RankWarning` that counts the redundant parameters.
    n_expert_modes : int
        ``H``.

    Examples
    --------
    >>> Tucker([8, 5, 6], ranks=4, n_expert_modes=1).ranks
    (4, 4, 4)
    >>> Tucker([2, 5, 6], ranks=4, n_expert_modes=1).ranks
    (2, 4, 4)
    """

    name = "tucker"
    _n_free = 3

    def __init__(self, dims: Sequence[int], ranks: int | Sequence[int], n_expert_modes: int) -> None:
        super().__init__(dims, n_expert_modes)
        if is_int(ranks):
            r = check_positive_int(ranks, "ranks")
            self.ranks = tuple(min(r, d) for d in self.dims)
        else:
            values = check_int_sequence(ranks, "ranks", what="an integer or a sequence of positive integers")
            if len(values) != self.order:
                raise ValueError(
                    f"ranks must have one entry per mode ({self.order}: {self.n_expert_modes} expert modes, "
                    f"input, output); got {len(values)} entries {values!r}"
                )
            self.ranks = tuple(values)
            over = [k for k, (r, d) in enumerate(zip(values, self.dims)) if r > d]
            if over:
                self._warn_overcomplete(over)

    def _warn_overcomplete(self, over: list[int]) -> None:
        needed = self.essential_ranks()
        shapes = dict(self.param_shapes(), core=tuple(needed))
        shapes.update({f"factor_{k}": (d, r) for k, (d, r) in enumerate(zip(self.dims, needed))})
        redundant = self.n_params() - sum(math.prod(s) for s in shapes.values())
        which = ", ".join(f"ranks[{k}]={self.ranks[k]}" for k in over)
        sizes = ", ".join(f"{self.dims[k]}" for k in over)
        modes = ", ".join(str(k) for k in over)
        plural = "s" if len(over) > 1 else ""
        _warn(
            f"ranks={list(self.ranks)} with dims={list(self.dims)}: {which} exceed{'s' if not plural else ''} "
            f"the size{plural} {sizes} of mode{plural} {modes} ({'over-complete factors' if plural else 'an over-complete factor'}); the tensor is the one "
            f"ranks={needed} give, so {redundant:,} of the {self.n_params():,} factorized parameters are redundant; "
            f"expected at most ranks={needed} to hold none",
            RankWarning,
        )

    def essential_ranks(self) -> list[int]:
        """The smallest ranks that can hold every tensor these ranks can: ``R'_k = min(R_k, d_k, prod_{j != k} R'_j)``.

        A factor ``[d_k, R_k]`` has rank at most ``d_k``, and the core's mode-``k``
        unfolding at most the product of its other ranks, so larger ranks only add
        redundant parameters.

        Examples
        --------
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", RankWarning)  # over-complete: it says so
        ...     wide = Tucker([32, 2, 5, 8], ranks=[8, 8, 8, 8], n_expert_modes=2)
        >>> wide.essential_ranks()
        [8, 2, 5, 8]
        >>> Tucker([9, 9, 9], ranks=[1, 2, 9], n_expert_modes=1).essential_ranks()
        [1, 2, 2]
        """
        ranks = [min(r, d) for r, d in zip(self.ranks, self.dims)]
        changed = True
        while changed:
            changed = False
            for k in range(len(ranks)):
                bound = math.prod(ranks[:k] + ranks[k + 1 :])
                if ranks[k] > bound:
                    ranks[k], changed = bound, True
        return ranks

    def describe_ranks(self) -> list[int]:
        return list(self.ranks)

    def network(self) -> dict[str, str]:
        net = {f"factor_{k}": self.mode_symbol(k) + self.rank_symbol(k) for k in range(self.order)}
        net["core"] = "".join(self.rank_symbol(k) for k in range(self.order))
        return net

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {f"factor_{k}": (d, r) for k, (d, r) in enumerate(zip(self.dims, self.ranks))}
        shapes["core"] = tuple(self.ranks)
        return shapes

    def _paths(self) -> int:
        return math.prod(self.ranks)

    def to_tensorly(self, params: Mapping[str, Any]) -> Any:
        from tensorly.tucker_tensor import TuckerTensor

        return TuckerTensor((params["core"], [params[f"factor_{k}"] for k in range(self.order)]))

    def _to_tensor(self, tensor: Any) -> Any:
        import tensorly as tl

        return tl.tucker_to_tensor(tensor)


class _Chain(Factorization):
    """Shared logic of TT and TR: cores ``G_k[r_k, d_k, r_{k+1}]`` with ``r_d = r_0``."""

    _ring = False

    def __init__(self, dims: Sequence[int], ranks: Any, n_expert_modes: int, *, in_dim: int | None = None) -> None:
        super().__init__(dims, n_expert_modes)
        self._in_dim = None if in_dim is None else check_positive_int(in_dim, "in_dim")
        d = self.order
        values = as_list(ranks)
        if is_int(ranks):
            r = check_positive_int(ranks, "ranks")
            bonds = [r] * (d + 1)
            if not self._ring:
                bonds[0] = bonds[-1] = 1
        elif values and all(as_list(c) is not None for c in values):
            bonds = self._bonds_from_core_shapes(values)
        else:
            values = check_int_sequence(
                ranks, "ranks", what="an integer or a sequence of integers (bond ranks) or of core shapes"
            )
            if len(values) == d + 1:
                bonds = values
            elif len(values) == d - 1 and not self._ring:
                bonds = [1, *values, 1]
            elif len(values) == d and self._ring:
                bonds = [*values, values[0]]
            else:
                allowed = f"{d + 1} (all bonds r_0..r_{d})" + (
                    f" or {d - 1} (inner bonds)" if not self._ring else f" or {d} (r_0..r_{d - 1}, closing on r_0)"
                )
                raise ValueError(
                    f"ranks must be an integer or a list of {allowed} bond ranks for {d} modes; "
                    f"got {len(values)} entries {values!r}"
                )
        self._check_boundary(bonds)
        self.bonds = tuple(bonds)

    def _bonds_from_core_shapes(self, shapes: Sequence[Sequence[Any]]) -> list[int]:
        d = self.order
        if len(shapes) != d:
            raise ValueError(f"ranks given as core shapes must list {d} cores [r_k, n_k, r_k+1]; got {len(shapes)}")
        bonds: list[int] = []
        for k, shape in enumerate(shapes):
            values = as_list(shape)
            if values is None or len(values) != 3:
                raise ValueError(f"ranks[{k}] must be a core shape [r_k, n_k, r_k+1]; got {shape!r}")
            left, right = (check_positive_int(values[j], f"ranks[{k}][{j}]") for j in (0, 2))
            if k and left != bonds[-1]:
                raise ValueError(f"ranks[{k}][0]={left} must equal ranks[{k - 1}][2]={bonds[-1]} (shared bond)")
            if values[1] is not None:
                self._check_middle(k, check_positive_int(values[1], f"ranks[{k}][1]"), left, right)
            bonds.extend([left, right] if not k else [right])
        return bonds

    def _check_middle(self, k: int, size: int, left: int, right: int) -> None:
        # the reference reads only the bonds of a core shape (it overwrites the middle entry
        # with the mode size): a middle entry that disagrees is read the same way, with a warning
        accepted = self._accepted_sizes(k)
        if size not in accepted:
            alternative = f" (or in_dim={accepted[1]})" if len(accepted) > 1 and accepted[1] != accepted[0] else ""
            _warn(
                f"ranks[{k}][1]={size} is not the size {self.dims[k]} of mode {k}{alternative}: only the bonds "
                f"of a core shape [r_k, n_k, r_k+1] are read, so core {k} has shape {[left, self.dims[k], right]}; "
                f"expected the mode size {self.dims[k]}{alternative} or None as the middle entry",
                RankWarning,
            )

    def _accepted_sizes(self, k: int) -> tuple[int, ...]:
        # the input mode may carry a bias row: a layer passes its in_dim, which core
        # shapes may then give for that mode instead of in_dim + 1
        if k == self.order - 2 and self._in_dim is not None:
            return (self.dims[k], self._in_dim)
        return (self.dims[k],)

    def _check_boundary(self, bonds: list[int]) -> None:
        raise NotImplementedError

    def describe_ranks(self) -> list[int]:
        return list(self.bonds)

    def network(self) -> dict[str, str]:
        d = self.order
        bond = [self.rank_symbol(k) for k in range(d)] + [self.rank_symbol(0)]
        return {f"factor_{k}": bond[k] + self.mode_symbol(k) + bond[k + 1] for k in range(d)}

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {f"factor_{k}": (self.bonds[k], n, self.bonds[k + 1]) for k, n in enumerate(self.dims)}

    def _paths(self) -> int:
        h = self.n_expert_modes
        return min(self.bonds[: h + 1]) * self.bonds[h + 1]

    def _expert_init(self, rng: np.random.Generator, level: int, shape: tuple[int, ...]) -> np.ndarray:
        # identity-like slices: expert cores keep one bond index alive along the chain
        eye = np.eye(shape[0], shape[2])[:, None, :]
        return eye * super()._expert_init(rng, level, shape)


class TT(_Chain):
    """Tensor train: cores ``G_k[r_k, d_k, r_{k+1}]`` with boundary ranks ``r_0 = r_d = 1``.

    Parameters
    ----------
    dims : sequence of int
        Mode sizes ``[N_1, ..., N_H, I, O]``.
    ranks : int, sequence of int, or sequence of core shapes
        An integer for every inner bond; ``d + 1`` bond ranks ``[1, r_1, ..., 1]``;
        the ``d - 1`` inner ones; or the reference style list of core shapes
        ``[[1, N, r_1], [r_1, I, r_2], [r_2, O, 1]]``, whose middle entries may
        be ``None`` (only the bonds are read; a middle entry other than the mode's
        size, or ``in_dim`` for the input mode, gives a :class:`RankWarning`).
    n_expert_modes : int
        ``H``.

    Examples
    --------
    >>> TT([8, 5, 6], ranks=3, n_expert_modes=1).bonds
    (1, 3, 3, 1)
    """

    name = "tt"

    def _check_boundary(self, bonds: list[int]) -> None:
        if bonds[0] != 1 or bonds[-1] != 1:
            raise ValueError(
                f"TT boundary ranks must be 1; got r_0={bonds[0]} and r_{len(bonds) - 1}={bonds[-1]} "
                "(use TRMMoE for a ring with boundary rank > 1)"
            )

    def to_tensorly(self, params: Mapping[str, Any]) -> Any:
        from tensorly.tt_tensor import TTTensor

        return TTTensor([params[f"factor_{k}"] for k in range(self.order)])

    def _to_tensor(self, tensor: Any) -> Any:
        import tensorly as tl

        return tl.tt_to_tensor(tensor)


class TR(_Chain):
    """Tensor ring: cores ``G_k[r_k, d_k, r_{k+1}]`` closing on ``r_d = r_0``.

    Parameters
    ----------
    dims : sequence of int
        Mode sizes ``[N_1, ..., N_H, I, O]``.
    ranks : int, sequence of int, or sequence of core shapes
        An integer for every bond; ``d + 1`` bond ranks with ``r_0 = r_d``; ``d``
        bond ranks ``r_0..r_{d-1}``; or a list of core shapes ``[r_k, n_k, r_k+1]``
        (middle entries as for :class:`TT`: ``None``, the mode's size, or read
        with a :class:`RankWarning`).
    n_expert_modes : int
        ``H``.

    Examples
    --------
    >>> TR([8, 5, 6], ranks=[2, 3, 4], n_expert_modes=1).bonds
    (2, 3, 4, 2)
    >>> TR([8, 5, 6], ranks=[[4, None, 2], [2, None, 3], [3, None, 4]], n_expert_modes=1).bonds
    (4, 2, 3, 4)
    """

    name = "tr"
    _ring = True

    def _check_boundary(self, bonds: list[int]) -> None:
        if bonds[0] != bonds[-1]:
            raise ValueError(f"TR boundary ranks must be equal (r_0 = r_d); got r_0={bonds[0]} and r_d={bonds[-1]}")

    def to_tensorly(self, params: Mapping[str, Any]) -> Any:
        from tensorly.tr_tensor import TRTensor

        return TRTensor([params[f"factor_{k}"] for k in range(self.order)])

    def _to_tensor(self, tensor: Any) -> Any:
        import tensorly as tl

        return tl.tr_to_tensor(tensor)


FACTORIZATIONS: dict[str, type[Factorization]] = {"cp": CP, "tucker": Tucker, "tt": TT, "tr": TR}
"""Factorization classes by name.

Examples
--------
>>> sorted(FACTORIZATIONS)
['cp', 'tr', 'tt', 'tucker']
>>> FACTORIZATIONS["tr"] is TR
True
"""
