"""JAX shells: the MMoE layers as pytrees, for ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

A layer object here is a pytree whose leaves are its parameters (factors, Tucker
core, gates) and whose static part is the functional layer
(:class:`tensormoe.MMoE`: configuration and math).  So a layer can be passed
straight through ``jax.jit`` and differentiated with ``jax.grad``; gradients
come back as a layer of the same structure, and an optimizer step is a
``jax.tree_util.tree_map``.  The forward is the functional layer's own
(:meth:`tensormoe.layers.MMoE.apply` with ``backend="jax"``), whatever the global
backend flag says.

The static part compares equal between layers of the same configuration (seed
and ``init_std`` aside), so jitted functions are not re-traced for each new
layer object, and contraction plans come from the shared plan cache: a new
trace of the same shapes plans nothing.

Importing this module imports JAX (keeping ``jax_enable_x64`` as it was, despite
TensorLy); ``import tensormoe`` does not.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> from tensormoe.jax import CPMMoE
>>> layer = CPMMoE(16, 8, expert_dims=[32], rank=4)
>>> loss = lambda layer, x: jnp.sum(layer(x) ** 2)
>>> grads = jax.jit(jax.grad(loss))(layer, jnp.ones((3, 16)))
>>> type(grads).__name__, grads.params["factor_0"].shape
('CPMMoE', (32, 4))
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from . import layers as _layer
from ._array import dtype_name, to_numpy
from .backend import backend_context, load

__all__ = ["CPMMoE", "MMoE", "TRMMoE", "TTMMoE", "TuckerMMoE", "wrap"]

_BACKEND = "jax"
load(_BACKEND)  # TensorLy's JAX backend, imported with jax_enable_x64 restored


class _Static:
    """The functional layer as pytree aux data: equal (and hashed) by what it computes."""

    __slots__ = ("layer", "key")

    def __init__(self, layer: _layer.MMoE) -> None:
        self.layer = layer
        # everything the forward depends on (routers with all their settings), not the seed
        self.key = repr(
            (type(layer).__name__, layer.in_dim, layer.out_dim, layer.factorization, layer.bias, layer.gate,
             layer.gate_norm, layer.gate_rank, layer.routers, layer.dtype, layer.optimize)
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Static) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"_Static({self.key})"


class MMoE:
    """A multilinear mixture-of-experts layer as a JAX pytree (base class).

    Use :class:`CPMMoE`, :class:`TuckerMMoE`, :class:`TTMMoE` or :class:`TRMMoE`;
    their arguments are those of the functional layers (:class:`tensormoe.CPMMoE`, ...).

    Attributes
    ----------
    layer : tensormoe.MMoE
        The functional layer (static: configuration, factorization, math).
    params : dict of str to jax.Array
        The leaves: factors (and the Tucker core) and one gate per level.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> layer = TTMMoE(8, 4, [6, 2], ranks=2)
    >>> isinstance(layer, MMoE), len(jax.tree_util.tree_leaves(layer))
    (True, 6)
    """

    core_class: type[_layer.MMoE] = _layer.MMoE

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with backend_context(_BACKEND):
            layer = self.core_class(*args, **kwargs)
        self._static = _Static(layer)
        self.params = dict(layer.params)

    # -- pytree ----------------------------------------------------------------------
    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[_Static, tuple[str, ...]]]:
        """The leaves (parameters, in name order) and the static part (the functional layer, the names).

        Examples
        --------
        >>> leaves, (static, names) = CPMMoE(4, 3, [5], rank=2).tree_flatten()
        >>> names, [leaf.shape for leaf in leaves][:2]
        (('factor_0', 'factor_1', 'factor_2', 'gate_0'), [(5, 2), (5, 2)])
        """
        names = tuple(self.params)
        return tuple(self.params[name] for name in names), (self._static, names)

    @classmethod
    def tree_unflatten(cls, aux: tuple[_Static, tuple[str, ...]], leaves: Sequence[Any]) -> MMoE:
        """Rebuild a layer from :meth:`tree_flatten`'s output (leaves are not checked: JAX passes placeholders).

        Examples
        --------
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> leaves, aux = layer.tree_flatten()
        >>> CPMMoE.tree_unflatten(aux, leaves).layer is layer.layer
        True
        """
        static, names = aux
        out = cls.__new__(cls)
        out._static = static
        out.params = dict(zip(names, leaves))
        return out

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node_class(cls)

    # -- construction ----------------------------------------------------------------
    @property
    def layer(self) -> _layer.MMoE:
        """The functional layer (:class:`tensormoe.MMoE`): configuration and math, static under ``jax.jit``.

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).layer
        CPMMoE(in_dim=4, out_dim=3, expert_dims=[5], rank=2, bias=True, gate='entmax15')
        """
        return self._static.layer

    @classmethod
    def from_layer(cls, layer: _layer.MMoE) -> MMoE:
        """A pytree layer with the configuration and (a JAX copy of) the parameters of a functional layer.

        Examples
        --------
        >>> import tensormoe
        >>> TRMMoE.from_layer(tensormoe.TRMMoE(4, 3, [5], ranks=2)).params["factor_0"].shape
        (2, 5, 2)
        """
        if not isinstance(layer, cls.core_class):
            raise TypeError(f"layer must be a {cls.core_class.__name__}; got {type(layer).__name__}")
        core = copy.copy(layer)  # configuration and routers shared, caches fresh (MMoE.__getstate__)
        params = _layer.convert_params(layer.params, _BACKEND)
        core.params = params
        return cls._make(core, params)

    @classmethod
    def _make(cls, layer: _layer.MMoE, params: Mapping[str, Any]) -> MMoE:
        out = cls.__new__(cls)
        out._static = _Static(layer)
        out.params = dict(params)
        return out

    def replace(self, params: Mapping[str, Any]) -> MMoE:
        """The same layer with other parameters (checked against its names and shapes).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> zero = layer.replace({k: jnp.zeros_like(v) for k, v in layer.params.items()})
        >>> float(jnp.abs(zero.params["factor_0"]).max())
        0.0
        """
        self.layer.check_params(params)
        return self._make(self.layer, params)

    def init(self, seed: int | None = None) -> dict[str, Any]:
        """A fresh set of parameters (a dict of ``jax.Array``) drawn from ``seed``.

        The same seed gives the same weights as on every other backend.

        Examples
        --------
        >>> sorted(CPMMoE(4, 3, [5], rank=2).init(seed=1))
        ['factor_0', 'factor_1', 'factor_2', 'gate_0']
        """
        with backend_context(_BACKEND):
            return self.layer.init(seed)

    # -- forward ---------------------------------------------------------------------
    def __call__(self, x: Any, coefficients: Sequence[Any] | None = None, **kwargs: Any) -> Any:
        """The factorized forward pass with this layer's parameters (see :meth:`tensormoe.layers.MMoE.apply`).

        Keyword arguments (``routing``, ``mask``, ``training``, ``rng``,
        ``return_routing``) are passed on to :meth:`apply`.
        """
        return self.apply(self.params, x, coefficients, **kwargs)

    def apply(
        self,
        params: Mapping[str, Any],
        x: Any,
        coefficients: Sequence[Any] | None = None,
        *,
        routing: Sequence[Any] | None = None,
        mask: Any = None,
        training: bool = False,
        rng: Any = None,
        return_routing: bool = False,
        norm_state: Any = None,
        return_norm_state: bool = False,
    ) -> Any:
        """The functional forward ``y = f(params, x)``: jit it, differentiate it with respect to ``params``.

        ``routing``, ``mask``, ``training`` (with ``rng``, a JAX key or an integer
        seed) and ``return_routing`` are as in :meth:`tensormoe.layers.MMoE.apply`.
        With ``gate_norm="batchnorm"`` the running statistics are explicit state:
        pass them as ``norm_state`` (default: ``norm_state``) and, in training,
        take the updated ones back with ``return_norm_state=True``:
        ``y, state = layer.apply(params, x, norm_state=state, training=True, return_norm_state=True)``.

        Examples
        --------
        >>> import jax, jax.numpy as jnp
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> jax.jit(layer.apply)(layer.params, jnp.ones((2, 4))).shape
        (2, 3)
        """
        return self.layer.apply(params, x, coefficients, routing=routing, mask=mask, training=training, rng=rng,
                                return_routing=return_routing, norm_state=norm_state,
                                return_norm_state=return_norm_state, backend=_BACKEND)

    @property
    def norm_state(self) -> tuple[Any, ...] | None:
        """BatchNorm gates: the layer's running statistics as JAX arrays (``None`` for other gates).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> layer = CPMMoE(4, 3, [5], rank=2, gate_norm="batchnorm")
        >>> y, state = layer.apply(layer.params, jnp.ones((6, 4)), norm_state=layer.norm_state, training=True,
        ...                        return_norm_state=True)
        >>> [int(s.count) for s in state], CPMMoE(4, 3, [5], rank=2).norm_state
        ([1], None)
        """
        state = self.layer.norm_state
        if state is None:
            return None
        return tuple(type(s)(*(jax.numpy.asarray(to_numpy(a)) for a in s)) for s in state)

    def route(self, x: Any, *, mask: Any = None, training: bool = False, rng: Any = None) -> tuple[Any, ...]:
        """Route ``x`` through every level, with the auxiliary losses (see :meth:`tensormoe.layers.MMoE.route`).

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> (r,) = CPMMoE(4, 3, [5], rank=2, router="top2").route(jnp.ones((6, 4)))
        >>> r.indices.shape, round(float(r.load.sum()), 6)
        ((6, 2), 1.0)
        """
        return self.layer.route(self.params, x, mask=mask, training=training, rng=rng, backend=_BACKEND)

    def coefficients(self, x: Any) -> list[Any]:
        """The gates' expert coefficients of every level, ``[..., N_h]`` each.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> a, = CPMMoE(4, 3, [5], rank=2).coefficients(jnp.ones((2, 4)))
        >>> a.shape
        (2, 5)
        """
        return self.layer.coefficients(self.params, x, backend=_BACKEND)

    def dense_forward(
        self, x: Any, coefficients: Sequence[Any] | None = None, *, routing: Sequence[Any] | None = None,
        mask: Any = None, training: bool = False, rng: Any = None,
    ) -> Any:
        """The reference forward through the reconstructed weight tensor (tests, small layers).

        Keyword arguments as in :meth:`apply`.

        Examples
        --------
        >>> import jax.numpy as jnp
        >>> CPMMoE(4, 3, [5], rank=2).dense_forward(jnp.ones((2, 4))).shape
        (2, 3)
        """
        return self.layer.dense_forward(self.params, x, coefficients, routing=routing, mask=mask, training=training,
                                        rng=rng, backend=_BACKEND)

    def dense_weight(self) -> Any:
        """The reconstructed ``W[N_1, ..., N_H, I(+1), O]`` (small layers only).

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).dense_weight().shape
        (5, 5, 3)
        """
        return self.layer.factorization.to_dense(self.params, backend=_BACKEND)

    def expert_weight(self, index: int | Sequence[int]) -> Any:
        """One expert's ``[I(+1), O]`` matrix without building ``W``.

        Examples
        --------
        >>> TTMMoE(4, 3, [5, 2], ranks=2).expert_weight((4, 1)).shape
        (5, 3)
        """
        return self.layer.expert_weight(self.params, index, backend=_BACKEND)

    # -- description -----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The functional layer's configuration, dtype as the parameters are now.

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).config()["dtype"]
        'float32'
        """
        config = self.layer.config()
        first = self.params[next(iter(self.params))]
        if hasattr(first, "dtype"):
            config["dtype"] = dtype_name(first)
        return config

    def __repr__(self) -> str:
        return repr(self.layer)

    # -- io protocol (tensormoe.tools.io) ------------------------------------------------
    def _assign_params(self, arrays: dict[str, Any]) -> None:
        dtypes = {name: value.dtype for name, value in self.params.items()}
        self.params = {name: jax.numpy.asarray(arrays[name], dtype=dtypes[name]) for name in self.params}


class CPMMoE(MMoE):
    """CP MMoE layer as a pytree; arguments as :class:`tensormoe.CPMMoE`.

    Examples
    --------
    >>> import jax
    >>> sorted(CPMMoE(16, 8, [32], rank=4).params)
    ['factor_0', 'factor_1', 'factor_2', 'gate_0']
    """

    core_class = _layer.CPMMoE



class TuckerMMoE(MMoE):
    """Tucker MMoE layer as a pytree; arguments as :class:`tensormoe.TuckerMMoE`.

    Examples
    --------
    >>> TuckerMMoE(16, 8, [32], ranks=[4, 5, 6]).params["core"].shape
    (4, 5, 6)
    """

    core_class = _layer.TuckerMMoE



class TTMMoE(MMoE):
    """Tensor-train MMoE layer as a pytree; arguments as :class:`tensormoe.TTMMoE`.

    Examples
    --------
    >>> TTMMoE(16, 8, [32], ranks=3).params["factor_0"].shape
    (1, 32, 3)
    """

    core_class = _layer.TTMMoE



class TRMMoE(MMoE):
    """Tensor-ring MMoE layer as a pytree; arguments as :class:`tensormoe.TRMMoE`.

    Examples
    --------
    >>> TRMMoE(16, 8, [32], ranks=3).params["factor_0"].shape
    (3, 32, 3)
    """

    core_class = _layer.TRMMoE



_LAYERS: dict[str, type[MMoE]] = {cls.core_class.__name__: cls for cls in (CPMMoE, TuckerMMoE, TTMMoE, TRMMoE)}


def wrap(layer: _layer.MMoE) -> MMoE:
    """The pytree layer of the right class for a functional layer, with a JAX copy of its parameters.

    Examples
    --------
    >>> import tensormoe
    >>> type(wrap(tensormoe.TTMMoE(4, 3, [5], ranks=2))).__name__
    'TTMMoE'
    """
    name = type(layer).__name__
    if name not in _LAYERS:
        raise TypeError(f"layer must be one of {sorted(_LAYERS)}; got {name}")
    return _LAYERS[name].from_layer(layer)
