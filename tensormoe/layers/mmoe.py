"""The functional MMoE layer, framework-neutral: ``init`` -> params, ``apply(params, x)``.

A layer object holds its configuration (dims, factorization, routers), its
structure as a :class:`~tensormoe.layers.config.LayerSpec` and, for convenience,
one set of parameters in :attr:`MMoE.params` (:mod:`tensormoe.layers.params`).
It checks what users pass in and runs the pure forward functions of
:mod:`tensormoe.layers.forward`, compiled on JAX.

Forward pass of one layer, for ``x[..., I]``:

    a_h = gate(norm(x @ G_h))                     # one coefficient vector per level
    y   = contract(a_1, ..., a_H, [x, 1], *factors)   # never builds W

which equals ``einsum('bn...io,bn,...,bi->bo', W, a_1, ..., [x, 1])`` through the
dense weight tensor ``W`` (:meth:`MMoE.dense_forward`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from .. import routing as _routing
from .. import validation as _v
from .._array import dtype_name
from .._array import to_numpy as _to_numpy
from ..backend import canonical_name, get_backend
from ..frameworks import Ops, get_ops
from ..network.contraction import Plan, check_optimizer, get_plan
from ..network.factorizations import CP, TR, TT, Factorization, Tucker
from ..validation import check_positive_int
from . import forward as _forward
from .accounting import factorization_cost
from .config import LayerSpec, parse_expert_dims
from .params import ParamStore, convert_params, init_params, param_shapes

__all__ = [
    "CPMMoE",
    "LAYERS",
    "MMoE",
    "TRMMoE",
    "TTMMoE",
    "TuckerMMoE",
    "GATE_NORMS",
    "convert_params",
    "layer_from_config",
    "make_layer",
]

GATE_NORMS = [*_routing.gates.NORMS, "batchnorm"]
"""The layers' ``gate_norm=`` values: the routers' per-row normalisations and ``"batchnorm"``.

``"batchnorm"`` normalises each expert's logit over the batch, with running
statistics for evaluation (:mod:`tensormoe.routing.batchnorm`; the reference
implementation's default); the layer then holds them in ``MMoE.norm_state``.

Examples
--------
>>> GATE_NORMS
[None, 'layernorm', 'batchnorm']
"""


class Checked(NamedTuple):
    """A call's checked arguments: the framework code, the parameters, the input and the coefficients (or None)."""

    ops: Ops
    params: Mapping[str, Any]
    x: Any
    coefficients: list[Any] | None


class Prepared(NamedTuple):
    """:class:`Checked`, plus the checked routing, the mask as 0/1 and the training noise (each None if absent)."""

    ops: Ops
    params: Mapping[str, Any]
    x: Any
    coefficients: list[Any] | None
    routing: Any
    mask: Any
    noise: Any


def _ops(backend: str | None) -> Ops:
    """The ops of ``backend`` (normalised, e.g. ``"torch"``), or of the current backend."""
    return get_ops(None if backend is None else canonical_name(backend))


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
    gate_norm : {"layernorm", None, "batchnorm"}
        Normalisation of the gate logits before the activation: per row
        (``"layernorm"``), none, or over the batch with running statistics for
        evaluation (``"batchnorm"``, the reference implementation's default; see
        :mod:`tensormoe.routing.batchnorm`), which the layer holds in
        ``norm_state`` and :meth:`apply` takes and returns (``norm_state=``,
        ``return_norm_state=``).  ``"batchnorm"`` needs the default dense routers.
    router : str, Router or sequence of them, optional
        How each level routes (:mod:`tensormoe.routing`): a name
        (``"entmax15"``, ``"softmax"``, ``"sparsemax"``, ``"top1"``, ``"top2"``,
        ``"top<k>"``, ``"gshard"``, ``"expert_choice"``, ``"soft"``,
        ``"product_keys"``) or a :class:`~tensormoe.routing.Router`, for every
        level, or a list with one per level.  Default: a dense router with
        ``gate`` and ``gate_norm`` on every level (the MMoE's own gating).  Top-k
        levels contract only the selected experts' factor rows.  A
        :class:`~tensormoe.routing.ProductKeyRouter` routes two levels ``[n, n]``
        together (given once, not in a list).
    gate_rank : int, optional
        Low-rank gates: each level's logits are ``(x @ gate_down_h) @ gate_up_h``
        with ``gate_down_h[I, r]`` and ``gate_up_h[r, N_h]`` instead of
        ``x @ gate_h[I, N_h]`` (the learned noise projection of top-k routers
        likewise), costing ``2 B r (I + N_h)`` FLOPs instead of ``2 B I N_h``.
        Default ``None``: full gates.  A level with ``gate_rank >= min(I, N_h)``
        keeps its full gate (the product could not express anything more).
        Router objects given without a rank get this one.
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
    max_bytes : int, optional
        Most bytes the parameters may take: a larger layer is refused with a
        ``ValueError`` before anything is allocated.  Default:
        :func:`tensormoe.validation.memory_limit` (``TENSORMOE_MAX_BYTES``, or a
        quarter of physical memory).
    init : bool
        Draw the parameters (default).  ``False`` builds the layer without
        any: assign :attr:`params` (e.g. loaded from a file) before calling it
        without ``params=``.

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
        ``factor_k`` (and ``core`` for Tucker) and one ``gate_h[I, N_h]`` per level
        (``gate_down_h[I, r]`` and ``gate_up_h[r, N_h]`` with ``gate_rank=r``).
    factorization : Factorization
        The weight tensor's format, dims and ranks.
    spec : LayerSpec
        What the forward functions (:mod:`tensormoe.layers.forward`) need.

    Examples
    --------
    A layer is a configuration plus one set of parameters; the functional core
    is ``init`` and ``apply``:

    >>> import numpy as np
    >>> layer = CPMMoE(in_dim=6, out_dim=4, expert_dims=[8], rank=3)
    >>> layer
    CPMMoE(in_dim=6, out_dim=4, expert_dims=[8], rank=3, bias=True, gate='entmax15')
    >>> params = layer.init(seed=1)
    >>> x = np.ones((2, 6), dtype="float32")
    >>> layer.apply(params, x).shape
    (2, 4)

    The factorized forward equals the forward through the dense weight tensor:

    >>> bool(np.allclose(layer.apply(params, x), layer.dense_forward(params, x), atol=1e-5))
    True
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
        router: Any = None,
        check_finite: bool = False,
        gate_rank: int | None = None,
        max_bytes: int | None = None,
        init: bool = True,
    ) -> None:
        self.in_dim = check_positive_int(in_dim, "in_dim")
        self.out_dim = check_positive_int(out_dim, "out_dim")
        self.expert_dims = parse_expert_dims(expert_dims, hierarchy)
        self.bias = _v.check_bool(bias, "bias")
        self.gate = _v.check_choice(gate, "gate", sorted(_routing.gates.ACTIVATIONS), what="a gate activation")
        self.gate_norm = _v.check_choice(gate_norm, "gate_norm", GATE_NORMS)
        if self.gate_norm == "batchnorm" and router is not None:
            raise ValueError(
                f"gate_norm='batchnorm' normalises the logits of the layer's own dense gates; got router={router!r}: "
                "expected router=None"
            )
        self.gate_rank = None if gate_rank is None else check_positive_int(gate_rank, "gate_rank")
        # the routers' own normalisation (a BatchNorm is the layer's: it keeps running statistics)
        self._router_norm = None if self.gate_norm == "batchnorm" else self.gate_norm
        self.routers = _routing.resolve_routers(router, self.expert_dims, gate, self._router_norm, self.gate_rank,
                                                in_dim=self.in_dim, out_dim=self.out_dim)
        self._router_arg = list(router) if isinstance(router, Sequence) and not isinstance(router, str) else router
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
        self.spec = LayerSpec(self.in_dim, self.out_dim, self.expert_dims, self.bias, self.routers, self.factorization,
                              self.optimize)
        self._store = ParamStore(param_shapes(self.spec), self.dtype)
        _v.check_memory(self.param_shapes(), self.dtype, repr(self), max_bytes)  # before anything is allocated
        self._compiled: dict[tuple[str, str], Any] = {}
        if _v.check_bool(init, "init"):
            self.params = self.init(self.seed)
        self.norm_state = self.init_norm_state() if self.gate_norm == "batchnorm" else None

    def _make_factorization(self, dims: tuple[int, ...]) -> Factorization:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy / pickle (a torch module holding this layer, an EMA copy):
        # the caches hold framework handles and compiled functions; they refill on use
        state = self.__dict__.copy()
        state["_compiled"] = {}
        state["_store"] = self._store.copy()  # a copy's parameters are its own (a shell assigns its tensors)
        return state

    # -- parameters ---------------------------------------------------------------
    @property
    def hierarchy(self) -> int:
        """Number of expert levels ``H``.

        Examples
        --------
        >>> CPMMoE(4, 3, [5, 2], rank=2).hierarchy
        2
        """
        return len(self.expert_dims)

    @property
    def n_experts(self) -> int:
        """Total number of experts ``N_1 * ... * N_H``.

        Examples
        --------
        >>> CPMMoE(4, 3, [5, 2], rank=2).n_experts
        10
        """
        return math.prod(self.expert_dims)

    @property
    def params(self) -> dict[str, Any]:
        """The layer's own parameters: ``factor_k`` (and ``core`` for Tucker), ``gate_h``.

        Arrays of the backend that was current when the layer was built, or of
        whichever backend assigned them last.  Assigning checks names and shapes
        (:meth:`check_params`); the layer then converts them, once per backend,
        when it is called on another backend.

        Examples
        --------
        >>> import numpy as np
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> layer.params["factor_1"].shape  # input mode: in_dim + 1 rows (bias)
        (5, 2)
        >>> layer.params = {**layer.params, "gate_0": np.ones((4, 5), dtype="float32")}
        >>> layer.params = {"factor_0": np.ones((5, 2))}
        Traceback (most recent call last):
        ...
        ValueError: params is missing factor_1, factor_2, gate_0 (expected the keys ['factor_0', 'factor_1', 'factor_2', 'gate_0'])
        """
        return self._store.params

    @params.setter
    def params(self, value: Mapping[str, Any]) -> None:
        self._store.set(value)

    @property
    def n_params(self) -> int:
        """Number of trainable scalars: factors (and core) plus gates.

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).n_params  # factors 5x2 + 5x2 + 3x2, gate 4x5
        46
        """
        return self._store.n_params()

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
        return dict(self._store.shapes)

    def init(self, seed: int | None = None) -> dict[str, Any]:
        """Draw a fresh set of parameters on the current backend.

        The draw is made in float64 NumPy from ``seed`` and then cast, so one seed
        gives the same weights on every backend.  Dense gates start at zero
        (uniform coefficients), the gates of selecting routers near zero
        (:meth:`tensormoe.routing.Router.init`); factors follow
        :meth:`Factorization.init` with ``std=init_std``.

        Examples
        --------
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> sorted(layer.init(seed=1))
        ['factor_0', 'factor_1', 'factor_2', 'gate_0']
        """
        seed = self.seed if seed is None else _v.check_nonnegative_int(seed, "seed")
        return init_params(self.spec, init_std=self.init_std, dtype=self.dtype, seed=seed)

    def init_norm_state(self, backend: str | None = None) -> tuple[_routing.BatchNormState, ...]:
        """Fresh BatchNorm statistics of every level (mean 0, variance 1, count 0), for ``gate_norm="batchnorm"``.

        Examples
        --------
        >>> layer = CPMMoE(4, 3, [5, 2], rank=2, gate_norm="batchnorm")
        >>> [s.var.tolist() for s in layer.init_norm_state()]
        [[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0]]
        """
        if self.gate_norm != "batchnorm":
            raise ValueError(f"init_norm_state: the layer has gate_norm={self.gate_norm!r}; expected 'batchnorm'")
        ops = _ops(backend)
        return tuple(_routing.batch_norm_state(n, self.dtype, ops) for n in self.expert_dims)

    def _norm_state_for(self, ops: Ops, state: Any, like: Any) -> tuple:
        """The statistics to normalise with: ``state`` as given, or the layer's own on ``ops``'s backend."""
        if state is not None:
            if not isinstance(state, (tuple, list)) or len(state) != len(self.expert_dims):
                raise TypeError(
                    f"norm_state must be a tuple of {len(self.expert_dims)} BatchNormState (one per level, e.g. "
                    f"layer.norm_state); got {_v.describe(state)}"
                )
            return tuple(state)
        own = self.norm_state
        if ops.is_array(own[0].mean):
            return own
        return tuple(_routing.BatchNormState(*(ops.asarray(_to_numpy(a), like=like) for a in s)) for s in own)

    def _batchnorm_gates(self, ops: Ops, params: Mapping[str, Any], x: Any, norm_state: Any, training: bool,
                         return_norm_state: bool) -> tuple[list[Any], tuple]:
        if training and not return_norm_state:
            raise ValueError(
                "training=True with gate_norm='batchnorm' needs return_norm_state=True: the call updates the running "
                "statistics, which the caller keeps (tensormoe.torch keeps them in buffers, tensormoe.jax passes them)"
            )
        state = self._norm_state_for(ops, norm_state, x)
        return _routing.gate_coefficients(ops, self.routers, params, self.in_dim, self.expert_dims, x, state,
                                          training=training)

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
        self._store.check(params, dtype=self.dtype)

    def _params_for(self, params: Mapping[str, Any] | None, backend: str, any_dtype: bool = False) -> Mapping[str, Any]:
        # any_dtype: the framework shells (backend=...) hold parameters cast with .half() etc.
        if params is not None:
            return self._store.check(params, dtype=None if any_dtype else self.dtype, backend=backend)
        return self._store.on(backend)

    # -- inputs -------------------------------------------------------------------
    def _check_input(
        self,
        x: Any,
        ops: Ops,
        argument: str = "x",
        last: int | None = None,
        device: Any = None,
        expected: str | None = None,
        explicit: bool = False,
    ) -> Any:
        # expected: the dtype of the parameters in use (a torch module cast with .half() included);
        # explicit: the caller named the backend (backend=...), whatever the global flag says
        return _v.check_array(
            x,
            ops,
            argument,
            last=self.in_dim if last is None else last,
            dtype=expected or self.dtype,
            device=device,
            explicit=explicit,
        )

    def _check_coefficients(
        self,
        coefficients: Any,
        batch: tuple[int, ...],
        ops: Ops,
        device: Any = None,
        expected: str | None = None,
        explicit: bool = False,
    ) -> list:
        return _v.check_coefficients(
            coefficients, self.expert_dims, batch, ops, expected or self.dtype, device, explicit=explicit
        )

    # -- forward ------------------------------------------------------------------
    def _run(self, function: Any, ops: Ops, *args: Any, training: bool = False) -> Any:
        """Call the forward ``function`` through the backend's compiler (``jax.jit`` on JAX), cached per layer.

        ``training`` is fixed in the compiled function (it picks the routers' settings, e.g. capacities).
        """
        key = (function.__name__, ops.name, training)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = ops.compile(functools.partial(function, ops, self.spec, training=training))
        return compiled(*args)

    def _checked(self, params: Any, x: Any, coefficients: Any = None, backend: str | None = None) -> Checked:
        ops = _ops(backend)
        params = self._params_for(params, ops.name, any_dtype=backend is not None)
        # inputs must match the parameters in use (a torch module cast with .half() included)
        expected = self._params_dtype(params, ops)
        explicit = backend is not None
        device = ops.device(next(iter(params.values())))
        x = self._check_input(x, ops, device=device, expected=expected, explicit=explicit)
        if coefficients is not None:
            coefficients = self._check_coefficients(
                coefficients, tuple(x.shape[:-1]), ops, device, expected=expected, explicit=explicit
            )
        if self.check_finite:
            _v.check_finite(x, ops, "x")
            for h, a in enumerate(coefficients or ()):
                _v.check_finite(a, ops, f"coefficients[{h}]")
            for name, value in params.items():
                _v.check_finite(value, ops, f"params[{name!r}]")
        return Checked(ops, params, x, coefficients)

    def _finite_result(self, ops: Ops, out: Any, method: str) -> Any:
        """``out`` unchanged; with ``check_finite`` raise if it is not finite (finite inputs overflowed)."""
        if self.check_finite:
            for y in out if isinstance(out, list) else [out]:
                if ops.count_nonfinite(y):
                    raise ValueError(
                        f"the result of {type(self).__name__}.{method} holds non-finite values although x and the "
                        f"parameters are finite: the computation overflowed {self.dtype} (largest finite value "
                        f"{_v.FLOAT_MAX[self.dtype]:.4g}); expected a finite result: use a wider dtype or smaller inputs"
                    )
        return out

    def _params_dtype(self, params: Mapping[str, Any], ops: Ops) -> str:
        name = next(iter(self.param_shapes()))
        value = params.get(name) if isinstance(params, Mapping) else None
        return self.dtype if value is None or not hasattr(value, "dtype") else dtype_name(value)

    def _prepared(self, params: Any, x: Any, *, coefficients: Any, routing: Any, mask: Any, training: Any,
                  rng: Any, backend: str | None) -> Prepared:
        """Checked inputs, plus the routing, the mask as 0/1 and the training noise (if any)."""
        ops, params, x, coefficients = self._checked(params, x, coefficients, backend)
        if not isinstance(training, bool):
            raise TypeError(f"training must be True or False; got {training!r}")
        lead = tuple(x.shape[:-1])
        if routing is not None:
            if coefficients is not None:
                raise ValueError("give either coefficients= or routing=, not both")
            routing = _routing.check_routing(routing, self.expert_dims, lead, ops, dtype=self.dtype,
                                             joint=_routing.joint_levels(self.routers))
        if mask is not None:
            if coefficients is not None or routing is not None:
                raise ValueError(
                    "mask= applies when the routing is computed here; with coefficients= or routing= given, "
                    "mask the routing where it is computed (layer.route(..., mask=mask))"
                )
            mask = _v.check_mask(mask, ops, lead, x)
        noise = None
        if coefficients is None and routing is None:
            noise = _routing.training_noise(ops, self.routers, self.expert_dims, lead, rng, like=x, training=training)
        return Prepared(ops, params, x, coefficients, routing, mask, noise)

    def coefficients(
        self, params: Mapping[str, Any] | None, x: Any, *, norm_state: Any = None, training: bool = False,
        return_norm_state: bool = False, backend: str | None = None,
    ) -> Any:
        """Expert coefficients of every level, ``[..., N_h]`` each (zero for unselected experts).

        With the default dense routers the rows sum to one; top-k levels give
        their selected weights scattered into ``N_h`` columns.  Not defined for
        Soft MoE, which weighs slots (see :meth:`route`).

        Parameters
        ----------
        params : mapping or None
            Parameters (``None``: the layer's own).
        x : array of shape [..., in_dim]
            Input of the current backend and the layer's dtype.
        norm_state, training, return_norm_state
            BatchNorm gates (``gate_norm="batchnorm"``) only, as in :meth:`apply`.
        backend : str, optional
            Compute on this backend instead of the current one (see :meth:`apply`).

        Examples
        --------
        >>> import numpy as np
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> a, = layer.coefficients(None, np.ones((2, 4), dtype="float32"))
        >>> a.shape, np.allclose(a.sum(-1), 1)
        ((2, 5), True)
        """
        if any(r.soft for r in self.routers):
            raise ValueError("Soft MoE routing weighs slots, not experts: per-token coefficients are not defined; "
                             "use layer.route(params, x)")
        if any(r.joint for r in self.routers):
            raise ValueError("a ProductKeyRouter selects pairs of experts: per-level coefficients do not describe them; "
                             "use layer.route(params, x) and tensormoe.routing.pair_to_dense")
        ops, params, x, _ = self._checked(params, x, backend=backend)
        if self.gate_norm == "batchnorm":
            coefficients, state = self._batchnorm_gates(ops, params, x, norm_state, _v.check_bool(training, "training"),
                                                        return_norm_state)
            coefficients = self._finite_result(ops, coefficients, "coefficients")
            return (coefficients, state) if return_norm_state else coefficients
        if norm_state is not None or return_norm_state:
            raise ValueError(f"norm_state and return_norm_state need gate_norm='batchnorm'; the layer has {self.gate_norm!r}")
        return self._finite_result(ops, self._run(_forward.coefficients, ops, params, x), "coefficients")

    def route(
        self,
        params: Mapping[str, Any] | None,
        x: Any,
        *,
        mask: Any = None,
        training: bool = False,
        rng: Any = None,
        backend: str | None = None,
    ) -> tuple[_routing.Routing, ...]:
        """Route ``x`` through every level: a :class:`~tensormoe.routing.Routing` per level, with the aux losses.

        Pass the result to :meth:`apply` (``routing=``) to run one or several
        layers with it; ``tensormoe.routing.aux_loss`` sums the losses.

        Parameters
        ----------
        params : mapping or None
            Parameters (``None``: the layer's own).
        x : array ``[..., in_dim]``
        mask : array ``[...]``, optional
            True (one) for real tokens, false (zero) for padding: padding is routed
            to no expert and left out of the losses and statistics.
        training : bool
            Training mode: draw the routers' training noise (noisy top-k; needs
            ``rng``) and use the training values of the routers' settings
            (capacity factor, second-expert policy).
        rng : int, numpy.random.Generator, torch.Generator or JAX key, optional
            Source of the noise and of the ``"random"`` second-expert policy's
            draws (in either mode); an integer seed gives the same numbers on every backend.
        backend : str, optional
            Compute on this backend instead of the current one (see :meth:`apply`).

        Returns
        -------
        tuple of Routing
            Leading axes of ``x`` (for a layer with a Soft MoE level, the other
            levels route its slots: ``[..., S, ...]``).

        Examples
        --------
        >>> import numpy as np
        >>> layer = CPMMoE(4, 3, [8, 4], rank=2, router=["top2", "entmax15"])
        >>> top, dense = layer.route(None, np.ones((5, 4), dtype="float32"))
        >>> top.indices.shape, dense.weights.shape, round(float(top.load.sum()), 6)
        ((5, 2), (5, 4), 1.0)
        """
        ops, params, x, _, _, mask, noise = self._prepared(
            params, x, coefficients=None, routing=None, mask=mask, training=training, rng=rng, backend=backend
        )
        return self._run(_forward.route, ops, params, x, mask, noise, training=training)

    def apply(
        self,
        params: Mapping[str, Any] | None,
        x: Any,
        coefficients: Sequence[Any] | None = None,
        *,
        routing: Sequence[_routing.Routing] | None = None,
        mask: Any = None,
        training: bool = False,
        rng: Any = None,
        return_routing: bool = False,
        norm_state: Any = None,
        return_norm_state: bool = False,
        backend: str | None = None,
    ) -> Any:
        """The factorized forward pass: ``y[..., out_dim]`` from ``x[..., in_dim]``.

        One planned contraction of the coefficients, the input and the factors;
        the weight tensor is never built.  Levels routed sparsely (top-k,
        product keys) gather only their selected experts' factor rows.  Tokens
        that a capacity or a second-expert policy leaves without an expert
        output zero, or their input with ``overflow="pass-through"``.  On JAX
        the whole forward (routing included) runs as one ``jax.jit``-compiled function.

        Parameters
        ----------
        params : mapping or None
            Parameters (``None``: the layer's own, converted to the current
            backend if needed).
        x : array of shape [..., in_dim]
            Input of the current backend and the layer's dtype.
        coefficients : list of arrays of shape [..., N_h], optional
            Dense expert coefficients to use instead of the routers' (e.g. to
            share one gating between two layers).
        routing : list of Routing, optional
            A routing from :meth:`route` (or written by hand, e.g.
            ``Routing(weights, indices)``) to use instead of routing here.
        mask : array of shape [...], optional
            Padding mask (true for tokens): padding gets no expert, so a zero output.
        training : bool
            Training mode: draw the routers' training noise (needs ``rng``) and
            use the training values of the routers' settings (capacity factor,
            second-expert policy).
        rng : int, numpy.random.Generator, torch.Generator or JAX key, optional
            Source of the training noise and of the ``"random"`` second-expert
            policy's draws (in either mode).
        return_routing : bool
            Also return the routing (with its auxiliary losses): ``(y, routing)``.
        norm_state : tuple of BatchNormState, optional
            With ``gate_norm="batchnorm"``: the running statistics to use (default:
            ``norm_state``).  ``training=True`` normalises with the batch's
            statistics (every leading axis of ``x`` is a row) and updates them.
        return_norm_state : bool
            With ``gate_norm="batchnorm"``: return ``(y, norm_state)``, the statistics
            after the call; required with ``training=True``, whose update would
            otherwise be lost.
        backend : str, optional
            Compute on this backend whatever the global flag says (the
            framework shells :mod:`tensormoe.torch` and :mod:`tensormoe.jax`
            pass it).  ``x`` and ``params`` must then be arrays of it.

        Examples
        --------
        >>> import numpy as np
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> layer.apply(layer.params, np.ones((2, 7, 4), dtype="float32")).shape
        (2, 7, 3)
        >>> y, (r,) = CPMMoE(4, 3, [5], rank=2, router="top1").apply(
        ...     None, np.ones((6, 4), dtype="float32"), return_routing=True)
        >>> r.indices.shape, float(r.z_loss) > 0
        ((6, 1), True)
        >>> layer.apply(layer.params, np.ones((2, 4), dtype="float32"), backend="numpy").shape
        (2, 3)
        """
        ops, params, x, coefficients, routing, mask, noise = self._prepared(
            params, x, coefficients=coefficients, routing=routing, mask=mask, training=training, rng=rng, backend=backend
        )
        if self.gate_norm == "batchnorm" and coefficients is None and routing is None:
            if mask is not None or return_routing:
                raise ValueError("mask= and return_routing= need routers; gate_norm='batchnorm' uses the dense gates")
            coefficients, state = self._batchnorm_gates(ops, params, x, norm_state, training, return_norm_state)
            y = self._run(_forward.forward, ops, params, x, coefficients, None, None, None)
            y = self._finite_result(ops, y, "apply")
            return (y, state) if return_norm_state else y
        if return_norm_state:
            raise ValueError(
                "return_norm_state=True returns BatchNorm statistics: it needs gate_norm='batchnorm' and the gates "
                f"(no coefficients= or routing=); the layer has gate_norm={self.gate_norm!r}"
            )
        if return_routing:
            if coefficients is not None:
                raise ValueError("return_routing=True needs the routers: it cannot be used with coefficients=")
            y, routing = self._run(_forward.forward_with_routing, ops, params, x, coefficients, routing, mask, noise,
                                   training=training)
            return self._finite_result(ops, y, "apply"), routing
        y = self._run(_forward.forward, ops, params, x, coefficients, routing, mask, noise, training=training)
        return self._finite_result(ops, y, "apply")

    def __call__(self, x: Any, coefficients: Sequence[Any] | None = None, **kwargs: Any) -> Any:
        """:meth:`apply` with the layer's own parameters, on the current backend.

        Keyword arguments (``routing``, ``mask``, ``training``, ``rng``,
        ``return_routing``) are passed on to :meth:`apply`.

        Examples
        --------
        >>> import numpy as np
        >>> layer = TRMMoE(4, 3, [5], ranks=2)
        >>> x = np.ones((2, 4), dtype="float32")
        >>> bool(np.array_equal(layer(x), layer.apply(layer.params, x)))
        True
        """
        return self.apply(None, x, coefficients, **kwargs)

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

    def dense_forward(
        self,
        params: Mapping[str, Any] | None,
        x: Any,
        coefficients: Sequence[Any] | None = None,
        *,
        routing: Sequence[_routing.Routing] | None = None,
        mask: Any = None,
        training: bool = False,
        rng: Any = None,
        backend: str | None = None,
    ) -> Any:
        """The reference forward pass through the reconstructed weight tensor.

        ``y[b, o] = sum a_1[b, n_1] ... a_H[b, n_H] W[n_1, ..., n_H, i, o] x[b, i]``
        (``x`` extended by a one when the layer has a bias), with sparse routings
        scattered to dense coefficients (zeros for unselected experts).  Equal to
        :meth:`apply` up to floating-point rounding; arguments as in :meth:`apply`.

        Examples
        --------
        >>> import numpy as np
        >>> layer = TuckerMMoE(4, 3, [5], ranks=2)
        >>> x = np.random.default_rng(0).normal(size=(6, 4)).astype("float32")
        >>> np.allclose(layer.dense_forward(None, x), layer(x), atol=1e-5)
        True
        """
        ops, params, x, coefficients, routing, mask, noise = self._prepared(
            params, x, coefficients=coefficients, routing=routing, mask=mask, training=training, rng=rng, backend=backend
        )
        return self._finite_result(
            ops, self._run(_forward.dense_forward, ops, params, x, coefficients, routing, mask, noise, training=training),
            "dense_forward",
        )

    def expert_weight(
        self, params: Mapping[str, Any] | None, index: int | Sequence[int], *, backend: str | None = None
    ) -> Any:
        """The ``[I(+1), O]`` matrix of one expert, ``W[n_1, ..., n_H]``, without building ``W``.

        With a bias the last row is that expert's bias.

        Parameters
        ----------
        params : mapping or None
            Parameters (``None``: the layer's own).
        index : int or sequence of int
            The expert's index on every level (an integer for one level).
        backend : str, optional
            Compute on this backend instead of the current one.

        Examples
        --------
        >>> import numpy as np
        >>> layer = TTMMoE(4, 3, [5, 2], ranks=3)
        >>> np.allclose(layer.expert_weight(None, (4, 1)), layer.dense_weight()[4, 1], atol=1e-6)
        True
        """
        index = _v.check_index(index, self.expert_dims)
        ops = _ops(backend)
        return _forward.expert_weight(ops, self.spec, self._params_for(params, ops.name), index)

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

    def cost(self, batch_size: int = 1) -> Any:
        """Parameters, FLOPs and peak intermediate of this layer, next to a linear layer's.

        Returns a frozen :class:`tensormoe.layers.accounting.Cost`; its FLOPs come from
        the same plan as :meth:`plan`, and the gates are counted separately.

        Examples
        --------
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> c = layer.cost(batch_size=8)
        >>> c.params == layer.n_params, c.forward_flops == layer.plan(8).flops
        (True, True)
        """

        return factorization_cost(
            self.factorization, batch_size, bias=self.bias, backend=get_backend(), dtype=self.dtype,
            optimize=self.optimize, gate_rank=self.gate_rank,
        )

    # -- configuration ------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this layer, as plain JSON-serialisable values.

        ``"class"`` names the layer class; the ranks are given in their validated
        form.  :func:`layer_from_config` is the inverse (with freshly initialised
        parameters).

        Examples
        --------
        >>> cfg = CPMMoE(4, 3, [5, 2], rank=2, gate="softmax").config()
        >>> cfg["class"], cfg["expert_dims"], cfg["rank"], cfg["gate"], cfg["router"]
        ('CPMMoE', [5, 2], 2, 'softmax', None)
        """
        router = self._router_arg
        names = router if isinstance(router, list) else [router]
        if not all(r is None or isinstance(r, str) for r in names):
            raise ValueError(
                "config() describes routers by name only; this layer was built with Router objects "
                f"({self.routers!r}): rebuild them yourself, or pass router names"
            )
        return {
            "class": type(self).__name__,
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "expert_dims": list(self.expert_dims),
            **self._rank_config(),
            "bias": self.bias,
            "gate": self.gate,
            "gate_norm": self.gate_norm,
            "init_std": self.init_std,
            "dtype": self.dtype,
            "seed": self.seed,
            "optimize": self.optimize,
            "router": router,
            "check_finite": self.check_finite,
            "gate_rank": self.gate_rank,
        }

    def _rank_config(self) -> dict[str, Any]:
        return {"ranks": self.factorization.describe_ranks()}

    def __repr__(self) -> str:
        default = all(
            isinstance(r, _routing.DenseRouter) and (r.activation, r.norm, r.rank) == (self.gate, self._router_norm, self.gate_rank)
            for r in self.routers
        )
        routing = f"gate={self.gate!r}" if default else f"router={[r.name for r in self.routers]!r}"
        if self.gate_rank is not None:
            routing += f", gate_rank={self.gate_rank}"
        if self.gate_norm == "batchnorm":
            routing += ", gate_norm='batchnorm'"
        return (
            f"{type(self).__name__}(in_dim={self.in_dim}, out_dim={self.out_dim}, "
            f"expert_dims={list(self.expert_dims)}, {self._rank_repr()}, bias={self.bias}, {routing})"
        )

    def _rank_repr(self) -> str:
        return f"ranks={self.factorization.describe_ranks()!r}"


class CPMMoE(MMoE):
    """MMoE layer whose weight tensor is a CP tensor of rank ``rank``.

    Cost of the forward pass: ``B * R * (sum N_h + I + O)`` multiply-adds.
    See :class:`MMoE` for the other parameters.  ``ranks=R`` is accepted for
    ``rank=R`` (the reference implementation's ``MuMoE`` wrapper calls it so).

    Examples
    --------
    >>> import numpy as np
    >>> layer = CPMMoE(in_dim=16, out_dim=8, expert_dims=[32], rank=4)
    >>> layer(np.zeros((3, 16), dtype="float32")).shape
    (3, 8)
    >>> CPMMoE(16, 8, [32], ranks=4).rank
    4
    """

    def __init__(self, in_dim: int, out_dim: int, expert_dims: int | Sequence[int], rank: int | None = None,
                 *, ranks: int | None = None, **kwargs: Any) -> None:
        if (rank is None) == (ranks is None):
            raise TypeError(
                f"CPMMoE takes the CP rank as rank= (or ranks=, the reference's name); got rank={rank!r} and "
                f"ranks={ranks!r}: expected exactly one"
            )
        self._rank = rank if ranks is None else ranks
        super().__init__(in_dim, out_dim, expert_dims, **kwargs)

    def _make_factorization(self, dims: tuple[int, ...]) -> Factorization:
        return CP(dims, self._rank, len(self.expert_dims))

    @property
    def rank(self) -> int:
        """The CP rank ``R``.

        Examples
        --------
        >>> CPMMoE(16, 8, [32], rank=4).rank
        4
        """
        return self.factorization.rank

    def _rank_repr(self) -> str:
        return f"rank={self.rank}"

    def _rank_config(self) -> dict[str, Any]:
        return {"rank": self.rank}


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


#: Layer classes by factorization name.
LAYERS: dict[str, type[MMoE]] = {"cp": CPMMoE, "tucker": TuckerMMoE, "tt": TTMMoE, "tr": TRMMoE}
"""Layer classes by factorization name.

Examples
--------
>>> LAYERS["tt"].__name__
'TTMMoE'
"""


def make_layer(
    kind: str, in_dim: int, out_dim: int, expert_dims: int | Sequence[int], ranks: Any, **kwargs: Any
) -> MMoE:
    """Build the layer of factorization ``kind``; ``ranks`` is CP's ``rank`` or the others' ``ranks``.

    Parameters
    ----------
    kind : {"cp", "tucker", "tt", "tr"}
    in_dim, out_dim : int
    expert_dims : int or sequence of int
    ranks : int or sequence
        As the layer class takes them.
    **kwargs
        Passed on to the layer class (``bias``, ``gate``, ``seed``, ...).

    Examples
    --------
    >>> make_layer("cp", 4, 3, [5], 2)
    CPMMoE(in_dim=4, out_dim=3, expert_dims=[5], rank=2, bias=True, gate='entmax15')
    """
    if kind not in LAYERS:
        raise ValueError(f"kind={kind!r} is not a factorization; expected one of {sorted(LAYERS)}")
    if kind == "cp":
        return CPMMoE(in_dim, out_dim, expert_dims, rank=ranks, **kwargs)
    return LAYERS[kind](in_dim, out_dim, expert_dims, ranks=ranks, **kwargs)


def layer_from_config(config: Mapping[str, Any]) -> MMoE:
    """Build a layer from :meth:`MMoE.config` output (parameters freshly initialised from its seed).

    Parameters
    ----------
    config : mapping
        ``"class"`` (the name of a class in :data:`LAYERS`) and that class's constructor arguments.

    Raises
    ------
    ValueError
        If the class is unknown or an argument is missing or not accepted.

    Examples
    --------
    >>> layer = TTMMoE(4, 3, [5], ranks=2)
    >>> copy = layer_from_config(layer.config())
    >>> copy.config() == layer.config()
    True
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (the output of MMoE.config()); got {type(config).__name__}")
    classes = {cls.__name__: cls for cls in LAYERS.values()}
    name = config.get("class")
    if name not in classes:
        raise ValueError(f"config['class']={name!r} is not a layer class; expected one of {sorted(classes)}")
    cls = classes[name]
    kwargs = {k: v for k, v in config.items() if k != "class"}
    rank_key = "rank" if cls is CPMMoE else "ranks"
    required = ("in_dim", "out_dim", "expert_dims", rank_key)
    missing = [k for k in required if k not in kwargs]
    allowed = {*required, "hierarchy", "bias", "gate", "gate_norm", "init_std", "dtype", "seed", "optimize", "router",
               "check_finite", "gate_rank"}
    unknown = sorted(k for k in kwargs if k not in allowed)
    if missing or unknown:
        raise ValueError(
            f"config for {name} "
            + " and ".join(
                p for p in (missing and f"is missing {missing}", unknown and f"has unknown keys {unknown}") if p
            )
            + f"; expected the keys ['class', {', '.join(repr(k) for k in sorted(allowed))}]"
        )
    return cls(**kwargs)
