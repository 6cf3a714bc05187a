"""The functional MMoE layer, framework-neutral: ``init`` -> params, ``apply(params, x)``.

A layer object holds its configuration (dims, factorization, gate) and, for
convenience, one set of parameters in :attr:`MMoE.params`.  The math lives in
:mod:`tensormoe.factorizations` (the network), :mod:`tensormoe.contraction` (the
planned einsum) and :mod:`tensormoe.gates`; this module wires them together and
checks what users pass in.

Forward pass of one layer, for ``x[..., I]``::

    a_h = gate(norm(x @ G_h))                     # one coefficient vector per level
    y   = contract(a_1, ..., a_H, [x, 1], *factors)   # never builds W

which equals ``einsum('bn...io,bn,...,bi->bo', W, a_1, ..., [x, 1])`` through the
dense weight tensor ``W`` (:meth:`MMoE.dense_forward`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import gates as _gates
from . import validation as _v
from .backend import _normalise, get_backend
from .contraction import Plan, check_optimizer, get_plan
from .factorizations import CP, TR, TT, Factorization, Tucker
from .ops import Ops, get_ops, ops_for_array
from .validation import check_positive_int

__all__ = ["CPMMoE", "MMoE", "TRMMoE", "TTMMoE", "TuckerMMoE", "convert_params"]

_FLOAT_DTYPES = _v.FLOAT_DTYPES
#: Largest finite value of each dtype (for overflow messages).
_FLOAT_MAX = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38, "float64": 1.7977e308}


def convert_params(params: Mapping[str, Any], backend: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Copy a parameter dict to another backend (through NumPy).

    Parameters
    ----------
    params : mapping of str to array
        Parameters of any backend.
    backend : str, optional
        Target backend (default: the current one).
    dtype : str, optional
        Target dtype name (default: keep each array's dtype).

    Examples
    --------
    >>> import numpy as np
    >>> out = convert_params({"w": np.ones(2)}, "numpy", "float32")
    >>> out["w"].dtype
    dtype('float32')
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of names to arrays; got {_v.describe(params)}")
    target = get_ops(None if backend is None else _normalise(backend, "backend"))
    dtype = None if dtype is None else _v.check_dtype(dtype)
    out = {}
    for name, value in params.items():
        source = ops_for_array(value)
        array = get_ops(source).to_numpy(value) if source else np.asarray(value)
        if array.dtype.kind not in "fiub":
            raise TypeError(f"params[{name!r}] must be a real numeric array; got {_v.describe(value)}")
        out[name] = target.asarray(array, dtype or _dtype_name(value))
    return out


def _dtype_name(x: Any) -> str:
    return str(getattr(x, "dtype", "float32")).replace("torch.", "")


def _expert_dims(expert_dims: Any, hierarchy: Any) -> tuple[int, ...]:
    if _v.is_int(expert_dims):
        levels = 1 if hierarchy is None else check_positive_int(hierarchy, "hierarchy")
        dims = [expert_dims] * levels
    elif _v.as_list(expert_dims) is not None:
        dims = _v.as_list(expert_dims)
        if not dims:
            raise ValueError("expert_dims must list at least one expert level; got []")
        if hierarchy is not None and check_positive_int(hierarchy, "hierarchy") != len(dims):
            raise ValueError(
                f"hierarchy={hierarchy!r} does not match expert_dims={dims!r}: expected "
                f"hierarchy == len(expert_dims) == {len(dims)} (or omit hierarchy)"
            )
    else:
        raise TypeError(
            f"expert_dims must be a positive integer or a list of them (one per level); got {_v.describe(expert_dims)}"
        )
    return tuple(check_positive_int(n, f"expert_dims[{k}]") for k, n in enumerate(dims))


class MMoE:
    """A multilinear mixture-of-experts layer over a factorized weight tensor (base class).

    Use one of :class:`CPMMoE`, :class:`TuckerMMoE`, :class:`TTMMoE`,
    :class:`TRMMoE`; they differ only in the factorization of the weight tensor
    ``W[N_1, ..., N_H, I(+1), O]``.

    Parameters
    ----------
    in_dim, out_dim : int
        Input and output features.
    expert_dims : int or sequence of int
        Experts per level ``[N_1, ..., N_H]``; an integer with ``hierarchy=H``
        repeats it ``H`` times.
    hierarchy : int, optional
        Number of expert levels; must agree with ``expert_dims`` when both are given.
    bias : bool
        Per-expert bias, mixed by the coefficients like the weights (the input
        mode gets one extra row).
    gate : {"entmax15", "softmax", "sparsemax"}
        Activation producing each level's coefficients.
    gate_norm : {"layernorm", None}
        Normalisation of the gate logits before the activation.
    init_std : float, optional
        Standard deviation of the entries of the reconstructed ``W`` at
        initialisation (default ``1 / sqrt(in_dim)``).
    dtype : str
        Parameter dtype: ``"float32"`` (default), ``"float64"``, ``"float16"``,
        or ``"bfloat16"`` (PyTorch and JAX).
    seed : int
        Seed of the initialisation; the same seed gives the same weights on
        every backend.
    optimize : str
        opt_einsum path optimizer for the forward contraction.
    check_finite : bool
        Opt-in check for NaN and Inf: when ``True``, :meth:`apply`,
        :meth:`dense_forward` and :meth:`coefficients` raise ``ValueError`` if
        the input, the given coefficients, the parameters or the result hold a
        non-finite value (costs one reduction per array; concrete arrays only,
        not under ``jax.jit``).  When ``False`` (default) non-finite values
        propagate: a NaN or Inf in row ``b`` of ``x`` makes row ``b`` of the
        output non-finite and leaves the other rows unchanged.

    Raises
    ------
    TypeError
        If an argument has the wrong type (a float for an integer, a list for a string, ...).
    ValueError
        If an argument has the right type but an invalid value (see the
        robustness guide for the full table).

    Attributes
    ----------
    params : dict of str to array
        The layer's parameters on the backend that was current when it was built:
        ``factor_k`` (and ``core`` for Tucker) and one ``gate_h[I, N_h]`` per level.
    factorization : Factorization
        The weight tensor's format, dims and ranks.
    """

    factorization: Factorization

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        expert_dims: int | Sequence[int],
        *,
        hierarchy: int | None = None,
        bias: bool = True,
        gate: str = "entmax15",
        gate_norm: str | None = "layernorm",
        init_std: float | None = None,
        dtype: str = "float32",
        seed: int = 0,
        optimize: str = "auto",
        check_finite: bool = False,
    ) -> None:
        self.in_dim = check_positive_int(in_dim, "in_dim")
        self.out_dim = check_positive_int(out_dim, "out_dim")
        self.expert_dims = _expert_dims(expert_dims, hierarchy)
        self.bias = _v.check_bool(bias, "bias")
        self.gate = _v.check_choice(gate, "gate", sorted(_gates.ACTIVATIONS), what="a gate activation")
        self.gate_norm = _v.check_choice(gate_norm, "gate_norm", list(_gates.NORMS))
        self.init_std = (
            1.0 / math.sqrt(self.in_dim) if init_std is None else _v.check_positive_real(init_std, "init_std")
        )
        self.dtype = _v.check_dtype(dtype)
        self.seed = _v.check_nonnegative_int(seed, "seed")
        self.check_finite = _v.check_bool(check_finite, "check_finite")
        check_optimizer(optimize)
        self.optimize = optimize
        self.factorization = self._make_factorization(
            (*self.expert_dims, self.in_dim + int(self.bias), self.out_dim)
        )
        self.factorization.check_size()
        self._params: dict[str, Any] = {}
        self._params_backend = ""
        self._converted: dict[str, dict[str, Any]] = {}
        self._compiled: dict[tuple[str, str], Any] = {}
        self.params = self.init(self.seed)

    def _make_factorization(self, dims: tuple[int, ...]) -> Factorization:
        raise NotImplementedError

    # -- parameters ---------------------------------------------------------------
    @property
    def hierarchy(self) -> int:
        """Number of expert levels ``H``."""
        return len(self.expert_dims)

    @property
    def n_experts(self) -> int:
        """Total number of experts ``N_1 * ... * N_H``."""
        return math.prod(self.expert_dims)

    @property
    def params(self) -> dict[str, Any]:
        return self._params

    @params.setter
    def params(self, value: Mapping[str, Any]) -> None:
        self.check_params(value)
        self._params = dict(value)
        first = next(iter(self._params.values()))
        self._params_backend = ops_for_array(first) or get_backend()
        self._converted = {}

    @property
    def n_params(self) -> int:
        """Number of trainable scalars: factors (and core) plus gates.

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).n_params
        46
        """
        return sum(math.prod(shape) for shape in self.param_shapes().values())

    @property
    def n_dense_params(self) -> int:
        """Number of entries of the dense weight tensor ``W`` the factors stand for.

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).n_dense_params
        75
        """
        return math.prod(self.factorization.dims)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every parameter: factors (and core), then the gates.

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).param_shapes()
        {'factor_0': (5, 2), 'factor_1': (5, 2), 'factor_2': (3, 2), 'gate_0': (4, 5)}
        """
        shapes = dict(self.factorization.param_shapes())
        for h, n in enumerate(self.expert_dims):
            shapes[f"gate_{h}"] = (self.in_dim, n)
        return shapes

    def init(self, seed: int | None = None) -> dict[str, Any]:
        """Draw a fresh set of parameters on the current backend.

        The draw is made in float64 NumPy from ``seed`` and then cast, so one seed
        gives the same weights on every backend.  Gates start at zero (uniform
        coefficients); factors follow :meth:`Factorization.init` with
        ``std=init_std``.

        Examples
        --------
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> sorted(layer.init(seed=1))
        ['factor_0', 'factor_1', 'factor_2', 'gate_0']
        """
        rng = np.random.default_rng(self.seed if seed is None else _v.check_nonnegative_int(seed, "seed"))
        raw = self.factorization.init(rng, self.init_std)
        for h, n in enumerate(self.expert_dims):
            raw[f"gate_{h}"] = np.zeros((self.in_dim, n))
        ops = get_ops()
        with np.errstate(over="ignore"):  # an overflowing cast is reported just below
            params = {name: ops.asarray(value, self.dtype) for name, value in raw.items()}
        if not all(ops.count_nonfinite(value) == 0 for value in params.values()):
            raise ValueError(
                f"init_std={self.init_std!r} gives parameters that overflow {self.dtype} (largest finite value "
                f"{_FLOAT_MAX[self.dtype]:.4g}); expected a smaller init_std"
            )
        return params

    def check_params(self, params: Mapping[str, Any]) -> None:
        """Raise if ``params`` does not have exactly this layer's names and shapes.

        Examples
        --------
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> layer.check_params({})
        Traceback (most recent call last):
        ...
        ValueError: params is missing factor_0, factor_1, factor_2, gate_0 (expected the keys ['factor_0', 'factor_1', 'factor_2', 'gate_0'])
        """
        _v.check_params(params, self.param_shapes(), dtype=self.dtype)

    def _params_for(self, params: Mapping[str, Any] | None, backend: str) -> Mapping[str, Any]:
        if params is not None:
            return _v.check_params(params, self.param_shapes(), dtype=self.dtype, backend=backend)
        if self._params_backend == backend:
            return self._params
        if backend not in self._converted:
            self._converted[backend] = convert_params(self._params, backend, self.dtype)
        return self._converted[backend]

    # -- inputs -------------------------------------------------------------------
    def _check_input(self, x: Any, ops: Ops, argument: str = "x", last: int | None = None, device: Any = None) -> Any:
        return _v.check_array(
            x, ops, argument, last=self.in_dim if last is None else last, dtype=self.dtype, device=device
        )

    def _check_coefficients(self, coefficients: Any, batch: tuple[int, ...], ops: Ops, device: Any = None) -> list:
        return _v.check_coefficients(coefficients, self.expert_dims, batch, ops, self.dtype, device)

    # -- forward ------------------------------------------------------------------
    def _run(self, method: str, ops: Ops, *args: Any) -> Any:
        """Call ``method`` through the backend's compiler (``jax.jit`` on JAX), cached per layer."""
        key = (method, ops.name)
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = ops.compile(functools.partial(getattr(self, method), ops))
        return fn(*args)

    def _gate(self, ops: Ops, params: Mapping[str, Any], x2: Any) -> list[Any]:
        activation = _gates.ACTIVATIONS[self.gate]
        norm = _gates.NORMS[self.gate_norm]
        out = []
        for h in range(self.hierarchy):
            logits = x2 @ params[f"gate_{h}"]
            if norm is not None:
                logits = norm(logits, ops=ops)
            out.append(activation(logits, ops=ops))
        return out

    def _flat(self, ops: Ops, params: Mapping[str, Any], x: Any, coefficients: Any) -> tuple[tuple, list, Any]:
        """Rows of ``x`` as a matrix, each level's coefficients, and the (bias-extended) input."""
        lead = tuple(x.shape[:-1])
        rows = math.prod(lead)
        x2 = ops.reshape(x, (rows, self.in_dim))
        if coefficients is None:
            coeffs = self._gate(ops, params, x2)
        else:
            coeffs = [ops.reshape(a, (rows, n)) for a, n in zip(coefficients, self.expert_dims)]
        return lead, coeffs, ops.concat_ones(x2) if self.bias else x2

    def _contract(self, ops: Ops, equation: str, operands: list[Any]) -> Any:
        plan = get_plan(
            equation, *(tuple(o.shape) for o in operands), backend=ops.name, dtype=self.dtype, optimize=self.optimize
        )
        return plan(*operands, backend=ops.einsum_backend)

    def _forward(self, ops: Ops, params: Mapping[str, Any], x: Any, coefficients: Any) -> Any:
        lead, coeffs, xin = self._flat(ops, params, x, coefficients)
        operands = [*coeffs, xin, *(params[name] for name in self.factorization.network())]
        y = self._contract(ops, self.factorization.forward_equation(), operands)
        return ops.reshape(y, (*lead, self.out_dim))

    def _dense_forward(self, ops: Ops, params: Mapping[str, Any], x: Any, coefficients: Any) -> Any:
        lead, coeffs, xin = self._flat(ops, params, x, coefficients)
        weight = self.factorization.to_dense(params)
        y = self._contract(ops, self.factorization.dense_equation(), [*coeffs, xin, weight])
        return ops.reshape(y, (*lead, self.out_dim))

    def _coefficients(self, ops: Ops, params: Mapping[str, Any], x: Any) -> list[Any]:
        lead = tuple(x.shape[:-1])
        coeffs = self._gate(ops, params, ops.reshape(x, (math.prod(lead), self.in_dim)))
        return [ops.reshape(a, (*lead, n)) for a, n in zip(coeffs, self.expert_dims)]

    def _checked(self, params: Any, x: Any, coefficients: Any = None) -> tuple:
        ops = get_ops()
        params = self._params_for(params, ops.name)
        device = ops.device(next(iter(params.values())))
        x = self._check_input(x, ops, device=device)
        if coefficients is not None:
            coefficients = self._check_coefficients(coefficients, tuple(x.shape[:-1]), ops, device)
        if self.check_finite:
            _v.check_finite(x, ops, "x")
            for h, a in enumerate(coefficients or ()):
                _v.check_finite(a, ops, f"coefficients[{h}]")
            for name, value in params.items():
                _v.check_finite(value, ops, f"params[{name!r}]")
        return ops, params, x, coefficients

    def _finite_result(self, ops: Ops, out: Any, method: str) -> Any:
        """``out`` unchanged; with ``check_finite`` raise if it is not finite (finite inputs overflowed)."""
        if self.check_finite:
            for y in out if isinstance(out, list) else [out]:
                if ops.count_nonfinite(y):
                    raise ValueError(
                        f"the result of {type(self).__name__}.{method} holds non-finite values although x and the "
                        f"parameters are finite: the computation overflowed {self.dtype} (largest finite value "
                        f"{_FLOAT_MAX[self.dtype]:.4g}); expected a finite result: use a wider dtype or smaller inputs"
                    )
        return out

    def coefficients(self, params: Mapping[str, Any] | None, x: Any) -> list[Any]:
        """Expert coefficients of every level, ``[..., N_h]`` each (rows sum to one).

        Parameters
        ----------
        params : mapping or None
            Parameters (``None``: the layer's own).
        x : array ``[..., in_dim]``

        Examples
        --------
        >>> import numpy as np
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> a, = layer.coefficients(None, np.ones((2, 4), dtype="float32"))
        >>> a.shape, np.allclose(a.sum(-1), 1)
        ((2, 5), True)
        """
        ops, params, x, _ = self._checked(params, x)
        return self._finite_result(ops, self._run("_coefficients", ops, params, x), "coefficients")

    def apply(self, params: Mapping[str, Any] | None, x: Any, coefficients: Sequence[Any] | None = None) -> Any:
        """The factorized forward pass: ``y[..., out_dim]`` from ``x[..., in_dim]``.

        One planned contraction of the coefficients, the input and the factors;
        the weight tensor is never built.  On JAX the whole forward (gates
        included) runs as one ``jax.jit``-compiled function.

        Parameters
        ----------
        params : mapping or None
            Parameters (``None``: the layer's own, converted to the current
            backend if needed).
        x : array ``[..., in_dim]``
            Input of the current backend and the layer's dtype.
        coefficients : list of arrays ``[..., N_h]``, optional
            Expert coefficients to use instead of the gates' (e.g. to share one
            gating between two layers).

        Examples
        --------
        >>> import numpy as np
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> layer.apply(layer.params, np.ones((2, 7, 4), dtype="float32")).shape
        (2, 7, 3)
        """
        ops, params, x, coefficients = self._checked(params, x, coefficients)
        return self._finite_result(ops, self._run("_forward", ops, params, x, coefficients), "apply")

    def __call__(self, x: Any, coefficients: Sequence[Any] | None = None) -> Any:
        """``apply`` with the layer's own parameters on the current backend."""
        return self.apply(None, x, coefficients)

    # -- the dense reference ------------------------------------------------------
    def dense_weight(self, params: Mapping[str, Any] | None = None) -> Any:
        """Reconstruct ``W[N_1, ..., N_H, I(+1), O]`` through TensorLy.

        This builds every expert: for tests and small layers only.

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).dense_weight().shape
        (5, 5, 3)
        """
        ops = get_ops()
        return self.factorization.to_dense(self._params_for(params, ops.name))

    def dense_forward(self, params: Mapping[str, Any] | None, x: Any, coefficients: Sequence[Any] | None = None) -> Any:
        """The reference forward pass through the reconstructed weight tensor.

        ``y[b, o] = sum a_1[b, n_1] ... a_H[b, n_H] W[n_1, ..., n_H, i, o] x[b, i]``
        (``x`` extended by a one when the layer has a bias).  Equal to
        :meth:`apply` up to floating-point rounding.

        Examples
        --------
        >>> import numpy as np
        >>> layer = TuckerMMoE(4, 3, [5], ranks=2)
        >>> x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
        >>> np.allclose(layer.dense_forward(None, x), layer(x), atol=1e-5)
        True
        """
        ops, params, x, coefficients = self._checked(params, x, coefficients)
        return self._finite_result(ops, self._run("_dense_forward", ops, params, x, coefficients), "dense_forward")

    def expert_weight(self, params: Mapping[str, Any] | None, index: int | Sequence[int]) -> Any:
        """The ``[I(+1), O]`` matrix of one expert, ``W[n_1, ..., n_H]``, without building ``W``.

        With a bias the last row is that expert's bias.

        Parameters
        ----------
        params : mapping or None
            Parameters (``None``: the layer's own).
        index : int or sequence of int
            The expert's index on every level (an integer for one level).

        Examples
        --------
        >>> import numpy as np
        >>> layer = TTMMoE(4, 3, [5, 2], ranks=3)
        >>> np.allclose(layer.expert_weight(None, (4, 1)), layer.dense_weight()[4, 1], atol=1e-6)
        True
        """
        index = _v.check_index(index, self.expert_dims)
        ops = get_ops()
        operands = self.factorization.slice_params(self._params_for(params, ops.name), index)
        return self._contract(ops, self.factorization.slice_equation(), operands)

    def plan(self, batch_size: int = 1) -> Plan:
        """The planned forward contraction for ``batch_size`` rows (path, FLOPs, largest intermediate).

        Examples
        --------
        >>> p = CPMMoE(768, 768, [1024], rank=256).plan(64)
        >>> p.flops < 64 * 768 * 768 * 2 * 2
        True
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        shapes = [(batch_size, n) for n in self.expert_dims]
        shapes.append((batch_size, self.in_dim + int(self.bias)))
        shapes += list(self.factorization.param_shapes().values())
        return get_plan(
            self.factorization.forward_equation(), *shapes, backend=get_backend(), dtype=self.dtype, optimize=self.optimize
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(in_dim={self.in_dim}, out_dim={self.out_dim}, "
            f"expert_dims={list(self.expert_dims)}, {self._rank_repr()}, bias={self.bias}, gate={self.gate!r})"
        )

    def _rank_repr(self) -> str:
        return f"ranks={self.factorization.describe_ranks()!r}"


class CPMMoE(MMoE):
    """MMoE layer whose weight tensor is a CP tensor of rank ``rank``.

    Cost of the forward pass: ``B * R * (sum N_h + I + O)`` multiply-adds.
    See :class:`MMoE` for the other parameters.

    Examples
    --------
    >>> import numpy as np
    >>> layer = CPMMoE(in_dim=16, out_dim=8, expert_dims=[32], rank=4)
    >>> layer(np.zeros((3, 16), dtype="float32")).shape
    (3, 8)
    """

    def __init__(self, in_dim: int, out_dim: int, expert_dims: int | Sequence[int], rank: int, **kwargs: Any) -> None:
        self._rank = rank
        super().__init__(in_dim, out_dim, expert_dims, **kwargs)

    def _make_factorization(self, dims: tuple[int, ...]) -> Factorization:
        return CP(dims, self._rank, len(self.expert_dims))

    @property
    def rank(self) -> int:
        """The CP rank."""
        return self.factorization.rank

    def _rank_repr(self) -> str:
        return f"rank={self.rank}"


class TuckerMMoE(MMoE):
    """MMoE layer whose weight tensor is a Tucker tensor.

    ``ranks`` gives one rank per mode ``[R_1, ..., R_H, R_I, R_O]``, or one integer
    for all (clipped to each mode's size).  See :class:`MMoE` for the other
    parameters.

    Examples
    --------
    >>> TuckerMMoE(16, 8, [32], ranks=[4, 5, 6]).factorization.ranks
    (4, 5, 6)
    """

    def __init__(self, in_dim: int, out_dim: int, expert_dims: int | Sequence[int], ranks: Any, **kwargs: Any) -> None:
        self._ranks = ranks
        super().__init__(in_dim, out_dim, expert_dims, **kwargs)

    def _make_factorization(self, dims: tuple[int, ...]) -> Factorization:
        return Tucker(dims, self._ranks, len(self.expert_dims))


class TTMMoE(MMoE):
    """MMoE layer whose weight tensor is a tensor train (boundary ranks 1).

    ``ranks`` is an integer for every inner bond, a list of all ``H + 3`` bond
    ranks ``[1, r_1, ..., 1]`` (or the ``H + 1`` inner ones), or the reference
    style list of core shapes ``[[1, N, r1], [r1, I, r2], [r2, O, 1]]``.
    See :class:`MMoE` for the other parameters.

    Examples
    --------
    >>> TTMMoE(16, 8, [32], ranks=[[1, 32, 4], [4, 16, 5], [5, 8, 1]]).factorization.bonds
    (1, 4, 5, 1)
    """

    def __init__(self, in_dim: int, out_dim: int, expert_dims: int | Sequence[int], ranks: Any, **kwargs: Any) -> None:
        self._ranks = ranks
        super().__init__(in_dim, out_dim, expert_dims, **kwargs)

    def _make_factorization(self, dims: tuple[int, ...]) -> Factorization:
        return TT(dims, self._ranks, len(self.expert_dims), in_dim=self.in_dim)


class TRMMoE(MMoE):
    """MMoE layer whose weight tensor is a tensor ring (boundary rank ``r_0 = r_d``).

    ``ranks`` is an integer for every bond, a list of ``H + 3`` bond ranks with
    equal ends (or the ``H + 2`` ranks ``r_0..r_{d-1}``), or a list of core shapes.
    See :class:`MMoE` for the other parameters.

    Examples
    --------
    >>> TRMMoE(16, 8, [32], ranks=[4, 4, 2]).factorization.bonds
    (4, 4, 2, 4)
    """

    def __init__(self, in_dim: int, out_dim: int, expert_dims: int | Sequence[int], ranks: Any, **kwargs: Any) -> None:
        self._ranks = ranks
        super().__init__(in_dim, out_dim, expert_dims, **kwargs)

    def _make_factorization(self, dims: tuple[int, ...]) -> Factorization:
        return TR(dims, self._ranks, len(self.expert_dims), in_dim=self.in_dim)
