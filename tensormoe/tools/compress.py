"""Start an MMoE layer from existing weights: a dense expert tensor, or a pretrained linear layer.

* :func:`from_dense` factorizes a dense tensor ``W[N_1, ..., N_H, I(+1), O]``
  with TensorLy's decompositions — ``parafac`` (CP, ALS), ``tucker`` (HOOI),
  ``tensor_train`` (TT-SVD), ``tensor_ring`` (TR-SVD, or ``tensor_ring_als``
  where TR-SVD's rank condition cannot be met) — and reports the relative
  reconstruction error.
* :func:`from_linear` starts every expert as one pretrained linear layer, as
  when an MLP is turned into an MMoE for fine-tuning.  That tensor is every
  expert the same matrix ``M = [W; b]``, which each format represents *exactly*
  at low rank, without any iterative decomposition: the construction writes the
  singular value decomposition of ``M`` into the factors.  CP needs rank
  ``rank(M)`` (expert factors all ones); Tucker needs ``R_I, R_O >= rank(M)``;
  TT/TR need ``m * r >= rank(M)``, with ``r`` the input–output bond and ``m``
  the smallest bond on the expert side of the ring (1 for TT).  With smaller
  ranks the SVD is truncated, which is the best approximation any layer of
  those ranks can give (for all-equal experts, the nearest layer of given
  ranks is no closer than the average of its experts, a matrix of rank at most
  that capacity — Eckart–Young does the rest).

Decompositions run in float64 on TensorLy's NumPy backend inside
:func:`tensormoe.backend_context` (never changing TensorLy's global backend);
the factors are then cast to the layer's dtype and current backend.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._array import backend_of, to_numpy
from ..backend import backend_context
from ..network.contraction import contract
from ..network.factorizations import Factorization, check_positive_int
from ..layers import MMoE, make_layer
from ..frameworks import get_ops
from .ranks import match_rank

__all__ = ["Compressed", "from_dense", "from_linear"]


@dataclasses.dataclass(frozen=True)
class Compressed:
    """A layer started from existing weights, and how well it reproduces them.

    Attributes
    ----------
    layer : MMoE
        The layer, its parameters on the current backend in its dtype.
    relative_error : float
        ``||W - W_hat|| / ||W||`` (Frobenius) between the given weights and the
        layer's, computed in float64 from the layer's (cast) parameters.
    method : str
        How the factors were obtained.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(3, 4))
    >>> c = from_linear(w, layout="out_in", kind="cp", expert_dims=[8], ranks=3, dtype="float64")
    >>> c.relative_error < 1e-12, c.method
    (True, 'exact: SVD of the linear layer')
    """

    layer: MMoE
    relative_error: float
    method: str


# -- inputs -------------------------------------------------------------------------
def _as_float64(x: Any, argument: str) -> np.ndarray:
    if backend_of(x) is not None:
        array = to_numpy(x)
    elif isinstance(x, (list, tuple)):
        array = np.asarray(x)
    else:
        raise TypeError(f"{argument} must be a NumPy, PyTorch or JAX array; got {type(x).__name__}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{argument} must hold real numbers; got dtype {array.dtype}")
    array = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{argument} contains NaN or infinite values")
    return array


def _ranks_from(
    kind: str, ranks: Any, budget: Any, in_dim: int, out_dim: int, experts: Sequence[int], bias: bool, bond_rank: Any
) -> Any:
    if (ranks is None) == (budget is None):
        raise ValueError(
            f"give exactly one of ranks and budget; got ranks={ranks!r} and budget={budget!r}"
        )
    if ranks is not None:
        return ranks
    return match_rank(kind, in_dim, out_dim, list(experts), budget, bias=bias, bond_rank=bond_rank).ranks


def _set_params(layer: MMoE, params: dict[str, np.ndarray]) -> None:
    """Cast float64 ``params`` to the layer's dtype on the current backend and install them."""
    ops = get_ops()
    layer.params = {name: ops.asarray(value, layer.dtype) for name, value in params.items()}


def _layer_params_float64(layer: MMoE) -> dict[str, np.ndarray]:
    return {name: to_numpy(v).astype(np.float64) for name, v in layer.params.items()}


def _relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    norm = float(np.linalg.norm(reference))
    diff = float(np.linalg.norm(reference - approximation))
    return diff / norm if norm > 0 else diff


# -- from a dense tensor ------------------------------------------------------------
def from_dense(
    weight: Any,
    *,
    kind: str,
    ranks: Any = None,
    budget: int | float | str | None = None,
    bias: bool = True,
    bond_rank: int | None = None,
    n_iter_max: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    **layer_kwargs: Any,
) -> Compressed:
    """Factorize a dense expert tensor into an MMoE layer.

    Parameters
    ----------
    weight : array ``[N_1, ..., N_H, I (+1), O]``
        One ``[I (+1), O]`` matrix per expert (``x @ W[n]`` maps inputs to
        outputs), NumPy, PyTorch or JAX.
    kind : {"cp", "tucker", "tt", "tr"}
    ranks : int or sequence, optional
        As the layer class takes them.  Give ``ranks`` or ``budget``.
    budget : int, float or "linear", optional
        Choose the ranks with :func:`tensormoe.tools.ranks.match_rank`.
    bias : bool
        ``True``: the last row of the input mode is each expert's bias
        (``in_dim = weight.shape[-2] - 1``).
    bond_rank : int, optional
        Passed to :func:`~tensormoe.tools.ranks.match_rank` with ``budget``.
    n_iter_max, tol : int, float
        Iterations and tolerance of the iterative decompositions (CP ALS,
        Tucker HOOI, TR-ALS).
    seed : int
        Seed of the decompositions' random parts and of the layer.
    **layer_kwargs
        Passed to the layer class (``gate``, ``dtype``, ...).

    Returns
    -------
    Compressed

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe import TTMMoE
    >>> w = TTMMoE(6, 5, [4], ranks=3, dtype="float64", seed=1).dense_weight()   # a TT tensor
    >>> c = from_dense(w, kind="tt", ranks=3, dtype="float64")
    >>> c.relative_error < 1e-10, c.method
    (True, 'tensorly.decomposition.tensor_train (TT-SVD)')
    """
    w = _as_float64(weight, "weight")
    if w.ndim < 3:
        raise ValueError(f"weight must have shape [N_1, ..., N_H, I(+1), O] (3 or more axes); got shape {w.shape}")
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be True or False; got {bias!r}")
    if w.shape[-2] - int(bias) < 1 or min(w.shape) < 1:
        raise ValueError(f"weight of shape {w.shape} leaves no input features (bias={bias} takes the last row)")
    experts = list(w.shape[:-2])
    in_dim, out_dim = w.shape[-2] - int(bias), w.shape[-1]
    n_iter_max = check_positive_int(n_iter_max, "n_iter_max")
    chosen = _ranks_from(kind, ranks, budget, in_dim, out_dim, experts, bias, bond_rank)
    layer = make_layer(kind, in_dim, out_dim, experts, chosen, bias=bias, seed=seed, **layer_kwargs)
    f = layer.factorization
    base = _layer_params_float64(layer)
    with backend_context("numpy"):
        factors, method = _DECOMPOSE[kind](w, f, n_iter_max=n_iter_max, tol=float(tol), seed=seed)
    base.update(factors)
    _set_params(layer, base)
    with backend_context("numpy"):
        approximation = f.to_dense(_layer_params_float64(layer))
    return Compressed(layer=layer, relative_error=_relative_error(w, approximation), method=method)


def _balanced(factors: list[np.ndarray]) -> list[np.ndarray]:
    """Rescale CP factor columns to equal norms across modes (the tensor is unchanged)."""
    norms = np.stack([np.linalg.norm(u, axis=0) for u in factors])  # [modes, R]
    target = np.exp(np.mean(np.log(np.maximum(norms, 1e-300)), axis=0))
    zero = np.any(norms == 0, axis=0)
    return [u * np.where(zero, 1.0, target / np.maximum(n, 1e-300)) for u, n in zip(factors, norms)]


def _cp_init(w: np.ndarray, rank: int, rng: np.random.Generator) -> list[np.ndarray]:
    """SVD initialisation of CP-ALS: leading left singular vectors of each unfolding.

    Where an unfolding has fewer than ``rank`` singular vectors the remaining
    columns are random (TensorLy's own ``init="svd"`` fails when the other modes'
    product is below the rank).  The first factor carries the singular values.
    """
    factors = []
    for k, n in enumerate(w.shape):
        u, s, _ = np.linalg.svd(np.moveaxis(w, k, 0).reshape(n, -1), full_matrices=False)
        cols = min(rank, u.shape[1])
        u = u[:, :cols] * (s[:cols] if k == 0 else 1.0)
        if cols < rank:
            u = np.concatenate([u, rng.normal(0.0, 1.0 / math.sqrt(n), size=(n, rank - cols))], axis=1)
        factors.append(u)
    return factors


def _cp(w: np.ndarray, f: Factorization, *, n_iter_max: int, tol: float, seed: int) -> tuple[dict, str]:
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import parafac

    most = min(w.size // n for n in w.shape)
    if f.rank > most:
        raise ValueError(
            f"rank={f.rank} exceeds {most}, the fewest rows of the Khatri-Rao products CP-ALS solves with for a "
            f"tensor of shape {w.shape} (its normal equations would be singular); expected rank <= {most}"
        )
    init = CPTensor((None, _cp_init(w, f.rank, np.random.default_rng(seed))))
    weights, factors = parafac(w, f.rank, n_iter_max=n_iter_max, init=init, tol=tol, random_state=seed)
    factors = [np.asarray(u, dtype=np.float64) for u in factors]
    factors[-1] = factors[-1] * np.asarray(weights)[None, :]
    return {f"factor_{k}": u for k, u in enumerate(_balanced(factors))}, "tensorly.decomposition.parafac (ALS)"


def _tucker(w: np.ndarray, f: Factorization, *, n_iter_max: int, tol: float, seed: int) -> tuple[dict, str]:
    from tensorly.decomposition import tucker

    core, factors = tucker(w, rank=list(f.ranks), n_iter_max=n_iter_max, init="svd", tol=tol, random_state=seed)
    out = {f"factor_{k}": np.asarray(u) for k, u in enumerate(factors)}
    out["core"] = np.asarray(core)
    return out, "tensorly.decomposition.tucker (HOOI)"


def _pad_chain(cores: list[np.ndarray], bonds: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """Grow each bond of a TT/TR chain to ``bonds`` without changing the tensor.

    New slots of bond ``k`` are zero on the core to its left and random on the
    core to its right, so their products vanish but both sides get gradients.
    """
    cores = [np.asarray(c, dtype=np.float64) for c in cores]
    d = len(cores)
    for k in range(d):  # bond between core k and core k+1 (mod d) is bonds[k+1]
        right = (k + 1) % d
        have, want = cores[k].shape[2], bonds[k + 1]
        if have == want:
            continue
        scale = float(np.std(cores[right])) or 1.0
        cores[k] = np.concatenate([cores[k], np.zeros((*cores[k].shape[:2], want - have))], axis=2)
        extra = rng.normal(0.0, scale, size=(want - have, *cores[right].shape[1:]))
        cores[right] = np.concatenate([cores[right], extra], axis=0)
    return cores


def _tt(w: np.ndarray, f: Factorization, *, n_iter_max: int, tol: float, seed: int) -> tuple[dict, str]:
    from tensorly.decomposition import tensor_train

    cores = list(tensor_train(w, rank=list(f.bonds)))
    cores = _pad_chain(cores, f.bonds, np.random.default_rng(seed))
    return {f"factor_{k}": c for k, c in enumerate(cores)}, "tensorly.decomposition.tensor_train (TT-SVD)"


def _tr(w: np.ndarray, f: Factorization, *, n_iter_max: int, tol: float, seed: int) -> tuple[dict, str]:
    import tensorly as tl
    from tensorly.decomposition import tensor_ring, tensor_ring_als

    bonds, d = list(f.bonds), w.ndim
    best: tuple[float, list] | None = None
    # TR-SVD starts at one mode m and needs r_m * r_{m+1} <= the sizes of its first unfolding
    for mode in range(d):
        if bonds[mode] * bonds[mode + 1] <= min(w.shape[mode], w.size // w.shape[mode]):
            cores = list(tensor_ring(w, rank=bonds, mode=mode))
            error = float(tl.norm(tl.tr_to_tensor(cores) - w))
            if best is None or error < best[0]:
                best = (error, cores)
    if best is not None:
        method = "tensorly.decomposition.tensor_ring (TR-SVD)"
        cores = best[1]
    else:
        method = "tensorly.decomposition.tensor_ring_als (no mode meets TR-SVD's rank condition)"
        cores = list(tensor_ring_als(w, rank=bonds, n_iter_max=n_iter_max, tol=tol, random_state=seed))
    cores = _pad_chain(cores, f.bonds, np.random.default_rng(seed))
    return {f"factor_{k}": c for k, c in enumerate(cores)}, method


_DECOMPOSE = {"cp": _cp, "tucker": _tucker, "tt": _tt, "tr": _tr}


# -- from a linear layer ------------------------------------------------------------
_LAYOUTS = {
    "out_in": "weight[out_dim, in_dim], y = x @ weight.T + bias (torch.nn.Linear.weight)",
    "in_out": "weight[in_dim, out_dim], y = x @ weight + bias (a Flax/Keras Dense kernel)",
}


def from_linear(
    weight: Any,
    bias: Any = None,
    *,
    layout: str,
    kind: str,
    expert_dims: int | Sequence[int],
    ranks: Any = None,
    budget: int | float | str | None = None,
    bond_rank: int | None = None,
    gate_std: float | None = None,
    seed: int = 0,
    **layer_kwargs: Any,
) -> Compressed:
    """An MMoE layer whose every expert starts as the linear layer ``y = x W + b``.

    The factors hold the SVD of ``M = [W; b]`` (``[I (+1), O]``), so the layer's
    output equals the linear layer's for *any* expert coefficients whenever the
    ranks can hold ``rank(M)`` (see the module documentation); otherwise it is
    the best approximation at those ranks.  Parameters that do not touch the
    output keep the layer's own random initialisation, and padding is zero on
    one side only, so every parameter receives gradients.

    Parameters
    ----------
    weight : array
        The linear layer's weight, laid out as ``layout`` says.
    bias : array ``[out_dim]``, optional
        Its bias.  The MMoE gets a (per-expert) bias exactly when one is given;
        pass zeros for a bias that starts at zero.
    layout : {"out_in", "in_out"}
        ``"out_in"``: ``weight[out_dim, in_dim]`` as in ``torch.nn.Linear``;
        ``"in_out"``: ``weight[in_dim, out_dim]`` as in a Flax/Keras ``Dense``
        kernel.  Required: a square weight cannot tell.
    kind : {"cp", "tucker", "tt", "tr"}
    expert_dims : int or sequence of int
        Experts per level.
    ranks : int or sequence, optional
        As the layer class takes them.  Give ``ranks`` or ``budget``.
    budget : int, float or "linear", optional
        Choose the ranks with :func:`tensormoe.tools.ranks.match_rank`.
    bond_rank : int, optional
        Passed to :func:`~tensormoe.tools.ranks.match_rank` with ``budget``.
    gate_std : float, optional
        Std of the gates' random initial weights (default ``1 / sqrt(in_dim)``).
        Any gates leave the output unchanged here (the experts are equal and the
        coefficients sum to one), but with all-zero gates every expert gets the
        same gradient forever and the experts never specialise; ``0`` gives
        zero gates nevertheless.
    seed : int
        Seed of the layer's initialisation.
    **layer_kwargs
        Passed to the layer class (``gate``, ``dtype``, ...).

    Returns
    -------
    Compressed
        ``relative_error`` is ``||M - W_hat[n]|| / ||M||``, the same for every expert.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> w, b = rng.normal(size=(5, 8)), rng.normal(size=5)          # torch layout [out, in]
    >>> c = from_linear(w, b, layout="out_in", kind="tr", expert_dims=[16, 4], ranks=[2, 2, 2, 3, 2],
    ...                 dtype="float64")
    >>> x = rng.normal(size=(3, 8))
    >>> np.allclose(c.layer(x), x @ w.T + b), c.relative_error < 1e-12
    (True, True)
    """
    if layout not in _LAYOUTS:
        raise ValueError(
            f"layout={layout!r} is not understood; expected 'out_in' ({_LAYOUTS['out_in']}) "
            f"or 'in_out' ({_LAYOUTS['in_out']})"
        )
    w = _as_float64(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight must be a matrix ({_LAYOUTS[layout]}); got shape {w.shape}")
    if layout == "out_in":
        w = w.T
    in_dim, out_dim = w.shape
    std = 1.0 / math.sqrt(in_dim) if gate_std is None else gate_std
    if isinstance(std, bool) or not isinstance(std, numbers.Real) or not std >= 0 or not math.isfinite(std):
        raise ValueError(f"gate_std must be a finite number >= 0; got {gate_std!r}")
    has_bias = bias is not None
    if has_bias:
        b = _as_float64(bias, "bias")
        if b.shape != (out_dim,):
            raise ValueError(f"bias must have shape ({out_dim},) to match weight ({layout}); got shape {b.shape}")
        matrix = np.concatenate([w, b[None, :]], axis=0)
    else:
        matrix = w
    chosen = _ranks_from(kind, ranks, budget, in_dim, out_dim, _list(expert_dims), has_bias, bond_rank)
    layer = make_layer(kind, in_dim, out_dim, expert_dims, chosen, bias=has_bias, seed=seed, **layer_kwargs)
    f = layer.factorization
    params = _layer_params_float64(layer)

    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(s)
    left, right = u * root, vt.T * root  # M = left @ right.T, balanced
    _EXACT[kind](params, f, left, right)

    rng = np.random.default_rng(seed)
    for h, n in enumerate(layer.expert_dims):
        params[f"gate_{h}"] = rng.normal(0.0, std, size=(in_dim, n)) if std > 0 else np.zeros((in_dim, n))
    _set_params(layer, params)

    # every expert holds the same matrix: compare one of them (W itself may be far too large)
    cast = _layer_params_float64(layer)
    last = [n - 1 for n in layer.expert_dims]
    expert = contract(f.slice_equation(), *f.slice_params(cast, last), backend="numpy", dtype="float64")
    numerical_rank = int(np.count_nonzero(s > s[0] * max(matrix.shape) * np.finfo(np.float64).eps)) if s.size else 0
    if _capacity(f) >= numerical_rank:
        method = "exact: SVD of the linear layer"
    else:
        method = f"truncated SVD of the linear layer (capacity {_capacity(f)} < rank(M) = {numerical_rank})"
    return Compressed(layer=layer, relative_error=_relative_error(matrix, expert), method=method)


def _list(expert_dims: Any) -> list[int]:
    return [expert_dims] if isinstance(expert_dims, int) else list(expert_dims)


def _capacity(f: Factorization) -> int:
    """How many singular components of ``M`` the construction below can hold."""
    h = f.n_expert_modes
    if f.name == "cp":
        return f.rank
    if f.name == "tucker":
        return min(f.ranks[-2], f.ranks[-1])
    return min(f.bonds[: h + 1]) * f.bonds[h + 1]


def _exact_cp(params: dict, f: Factorization, left: np.ndarray, right: np.ndarray) -> None:
    h, used = f.n_expert_modes, min(f.rank, left.shape[1])
    for k in range(h):  # experts all equal on the used components
        params[f"factor_{k}"][:, :used] = 1.0
    params[f"factor_{h}"][:, :used] = left[:, :used]
    params[f"factor_{h + 1}"][:, :used] = right[:, :used]
    params[f"factor_{h + 1}"][:, used:] = 0.0  # unused components: no output, gradients alive


def _exact_tucker(params: dict, f: Factorization, left: np.ndarray, right: np.ndarray) -> None:
    h, used = f.n_expert_modes, min(_capacity(f), left.shape[1])
    for k in range(h):
        params[f"factor_{k}"][:, 0] = 1.0
    core = np.zeros(f.ranks)
    idx = np.arange(used)
    core[(0,) * h + (idx, idx)] = 1.0
    params["core"] = core
    params[f"factor_{h}"][:, :used] = left[:, :used]
    params[f"factor_{h + 1}"][:, :used] = right[:, :used]


def _exact_chain(params: dict, f: Factorization, left: np.ndarray, right: np.ndarray) -> None:
    # expert cores are identity slices, so the ring reduces to sum_{k<m} (A_i B_o)[k, k]
    # with A the input core, B the output core, m the smallest expert-side bond
    h, bonds = f.n_expert_modes, f.bonds
    for k in range(h):
        params[f"factor_{k}"] = np.broadcast_to(
            np.eye(bonds[k], bonds[k + 1])[:, None, :], (bonds[k], f.dims[k], bonds[k + 1])
        ).copy()
    m, r = min(bonds[: h + 1]), bonds[h + 1]
    a, b = params[f"factor_{h}"], params[f"factor_{h + 1}"]  # A[b_h, I, r], B[r, O, b_0]
    used = min(m * r, left.shape[1])
    b[:, :, :m] = 0.0
    for c in range(used):
        k, j = divmod(c, r)
        a[k, :, j] = left[:, c]
        b[j, :, k] = right[:, c]


_EXACT = {"cp": _exact_cp, "tucker": _exact_tucker, "tt": _exact_chain, "tr": _exact_chain}
