"""PyTorch shells: the MMoE layers as :class:`torch.nn.Module`.

Each module holds its factors and gates as :class:`torch.nn.Parameter` in a
:class:`torch.nn.ParameterDict` keyed like the functional layer's parameters
(``params.factor_0``, ..., ``params.gate_0`` in the ``state_dict``), and its
forward is the functional layer's own forward (:meth:`tensormoe.layers.MMoE.apply`),
called with ``backend="pytorch"``: one planned contraction, autograd flowing
through it, whatever the global backend flag says.  Nothing here re-implements
the math.

The modules behave like any other: ``.to(device)``, ``.half()``,
``.bfloat16()``, ``state_dict``/``load_state_dict``, ``torch.compile``
(the contraction is handed to ``torch.einsum`` while tracing, so the whole
forward is one graph).

Importing this module imports PyTorch; ``import tensormoe`` does not.

Examples
--------
>>> import torch
>>> from tensormoe.torch import CPMMoE
>>> layer = CPMMoE(16, 8, expert_dims=[32], rank=4)
>>> y = layer(torch.ones(3, 16))
>>> y.sum().backward()
>>> y.shape, layer.params["factor_0"].grad.shape
(torch.Size([3, 8]), torch.Size([32, 4]))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from . import layers as _layer
from ._array import dtype_name
from .backend import backend_context

__all__ = ["CPMMoE", "MMoE", "MMoEMLP", "TRMMoE", "TTMMoE", "TuckerMMoE", "wrap"]

_BACKEND = "pytorch"


class MMoE(nn.Module):
    """A multilinear mixture-of-experts layer as a ``torch.nn.Module`` (base class).

    Use :class:`CPMMoE`, :class:`TuckerMMoE`, :class:`TTMMoE` or :class:`TRMMoE`;
    their arguments are those of the functional layers (:class:`tensormoe.CPMMoE`,
    ...), plus ``device``.

    Attributes
    ----------
    layer : tensormoe.MMoE
        The functional layer: configuration, factorization and the forward math.
        Its ``params`` are this module's parameters.
    params : torch.nn.ParameterDict
        Factors (and the Tucker core) and one gate ``gate_h[in_dim, N_h]`` per level.

    Examples
    --------
    >>> import torch
    >>> layer = TuckerMMoE(8, 4, [6, 2], ranks=2)
    >>> isinstance(layer, MMoE), layer(torch.ones(3, 8)).shape
    (True, torch.Size([3, 4]))
    """

    core_class: type[_layer.MMoE] = _layer.MMoE

    def __init__(self, *args: Any, device: Any = None, **kwargs: Any) -> None:
        super().__init__()
        with backend_context(_BACKEND):
            layer = self.core_class(*args, **kwargs)
        self._wrap(layer, device)

    def _wrap(self, layer: _layer.MMoE, device: Any) -> None:
        params = _layer.convert_params(layer.params, _BACKEND)
        self.params = nn.ParameterDict({name: nn.Parameter(value.to(device)) for name, value in params.items()})
        # the functional layer's own parameters are these Parameters (no second copy)
        layer.params = dict(self.params)
        self.layer = layer

    @classmethod
    def from_layer(cls, layer: _layer.MMoE, device: Any = None) -> MMoE:
        """Wrap a functional layer (its configuration, a copy of its parameters) in a module.

        Parameters
        ----------
        layer : tensormoe.MMoE
            A functional layer of the class this module wraps; its parameters may
            live on any backend.
        device : torch.device or str, optional

        Examples
        --------
        >>> import tensormoe
        >>> core = tensormoe.TTMMoE(4, 3, [5], ranks=2)
        >>> TTMMoE.from_layer(core).params["factor_1"].shape
        torch.Size([2, 5, 2])
        """
        if not isinstance(layer, cls.core_class):
            raise TypeError(f"layer must be a {cls.core_class.__name__}; got {type(layer).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        core = copy.copy(layer)  # configuration and routers shared, caches fresh (MMoE.__getstate__)
        core.params = _layer.convert_params(layer.params, _BACKEND)
        module._wrap(core, device)
        return module

    # -- forward ---------------------------------------------------------------------
    def _params(self) -> dict[str, torch.Tensor]:
        # the ParameterDict's own storage: its items() costs a few microseconds per forward
        return dict(self.params._parameters)

    def forward(
        self,
        x: torch.Tensor,
        coefficients: Sequence[torch.Tensor] | None = None,
        *,
        routing: Sequence[Any] | None = None,
        mask: torch.Tensor | None = None,
        training: bool = False,
        rng: Any = None,
        return_routing: bool = False,
    ) -> Any:
        """The factorized forward pass ``y[..., out_dim]`` (see :meth:`tensormoe.layers.MMoE.apply`).

        Parameters
        ----------
        x : torch.Tensor ``[..., in_dim]``
            On the module's device, in its dtype.
        coefficients : list of torch.Tensor ``[..., N_h]``, optional
            Expert coefficients to use instead of the gates'.
        routing, mask, training, rng, return_routing
            As in :meth:`tensormoe.layers.MMoE.apply`: a routing from
            :meth:`route` to use, a padding mask, the routers' training noise
            (``training=True`` with ``rng``), and ``(y, routing)`` returned.

        Examples
        --------
        >>> import torch
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> layer(torch.ones(2, 7, 4)).shape
        torch.Size([2, 7, 3])
        >>> onehot = torch.nn.functional.one_hot(torch.tensor([4, 4]), 5).float()
        >>> torch.allclose(layer(torch.ones(2, 4), [onehot]), torch.ones(2, 5) @ layer.expert_weight(4))
        True
        """
        return self.layer.apply(self._params(), x, coefficients, routing=routing, mask=mask, training=training, rng=rng,
                                return_routing=return_routing, backend=_BACKEND)

    def route(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, training: bool = False,
              rng: Any = None) -> tuple[Any, ...]:
        """Route ``x`` through every level, with the auxiliary losses (see :meth:`tensormoe.layers.MMoE.route`).

        Examples
        --------
        >>> import torch
        >>> (r,) = CPMMoE(4, 3, [5], rank=2, router="top2").route(torch.ones(6, 4))
        >>> r.indices.shape, float(r.load.sum())
        (torch.Size([6, 2]), 1.0)
        """
        return self.layer.route(self._params(), x, mask=mask, training=training, rng=rng, backend=_BACKEND)

    def coefficients(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The gates' expert coefficients of every level, ``[..., N_h]`` each.

        Examples
        --------
        >>> import torch
        >>> a, = CPMMoE(4, 3, [5], rank=2).coefficients(torch.ones(2, 4))
        >>> a.shape
        torch.Size([2, 5])
        """
        return self.layer.coefficients(self._params(), x, backend=_BACKEND)

    def dense_forward(
        self,
        x: torch.Tensor,
        coefficients: Sequence[torch.Tensor] | None = None,
        *,
        routing: Sequence[Any] | None = None,
        mask: torch.Tensor | None = None,
        training: bool = False,
        rng: Any = None,
    ) -> torch.Tensor:
        """The reference forward through the reconstructed weight tensor (tests, small layers).

        Keyword arguments as in :meth:`forward`.

        Examples
        --------
        >>> import torch
        >>> layer = CPMMoE(4, 3, [5], rank=2)
        >>> x = torch.randn(6, 4)
        >>> torch.allclose(layer.dense_forward(x), layer(x), atol=1e-5)
        True
        """
        return self.layer.dense_forward(self._params(), x, coefficients, routing=routing, mask=mask, training=training,
                                        rng=rng, backend=_BACKEND)

    def dense_weight(self) -> torch.Tensor:
        """The reconstructed ``W[N_1, ..., N_H, I(+1), O]`` (differentiable; small layers only).

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).dense_weight().shape
        torch.Size([5, 5, 3])
        """
        return self.layer.factorization.to_dense(self._params(), backend=_BACKEND)

    def expert_weight(self, index: int | Sequence[int]) -> torch.Tensor:
        """One expert's ``[I(+1), O]`` matrix without building ``W`` (see :meth:`tensormoe.layers.MMoE.expert_weight`).

        Examples
        --------
        >>> TRMMoE(4, 3, [5, 2], ranks=2).expert_weight((4, 1)).shape
        torch.Size([5, 3])
        """
        return self.layer.expert_weight(self._params(), index, backend=_BACKEND)

    # -- description -----------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The functional layer's configuration (:meth:`tensormoe.layers.MMoE.config`), dtype as the parameters are now.

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).bfloat16().config()["dtype"]
        'bfloat16'
        """
        config = self.layer.config()
        config["dtype"] = dtype_name(self.params[next(iter(self.params))])
        return config

    @property
    def in_dim(self) -> int:
        """Input features.

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).in_dim
        4
        """
        return self.layer.in_dim

    @property
    def out_dim(self) -> int:
        """Output features.

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).out_dim
        3
        """
        return self.layer.out_dim

    @property
    def expert_dims(self) -> tuple[int, ...]:
        """Experts per level ``(N_1, ..., N_H)``.

        Examples
        --------
        >>> CPMMoE(4, 3, [5, 2], rank=2).expert_dims
        (5, 2)
        """
        return self.layer.expert_dims

    @property
    def factorization(self) -> Any:
        """The weight tensor's format (:class:`tensormoe.Factorization`).

        Examples
        --------
        >>> TRMMoE(4, 3, [5], ranks=2).factorization
        TR(dims=[5, 5, 3], ranks=[2, 2, 2, 2])
        """
        return self.layer.factorization

    def extra_repr(self) -> str:
        """The functional layer's arguments, shown inside the module's ``repr``.

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).extra_repr()
        "in_dim=4, out_dim=3, expert_dims=[5], rank=2, bias=True, gate='entmax15'"
        """
        return repr(self.layer).split("(", 1)[1][:-1]

    # -- io protocol (tensormoe.io) ------------------------------------------------
    def _assign_params(self, arrays: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, value in arrays.items():
                target = self.params[name]
                target.copy_(torch.as_tensor(value).to(device=target.device, dtype=target.dtype))


class CPMMoE(MMoE):
    """CP MMoE layer as a module; arguments as :class:`tensormoe.CPMMoE`, plus ``device``.

    Examples
    --------
    >>> import torch
    >>> layer = CPMMoE(in_dim=16, out_dim=8, expert_dims=[32], rank=4)
    >>> sorted(name for name, _ in layer.named_parameters())
    ['params.factor_0', 'params.factor_1', 'params.factor_2', 'params.gate_0']
    """

    core_class = _layer.CPMMoE

    @property
    def rank(self) -> int:
        """The CP rank.

        Examples
        --------
        >>> CPMMoE(4, 3, [5], rank=2).rank
        2
        """
        return self.layer.rank


class TuckerMMoE(MMoE):
    """Tucker MMoE layer as a module; arguments as :class:`tensormoe.TuckerMMoE`, plus ``device``.

    Examples
    --------
    >>> TuckerMMoE(16, 8, [32], ranks=[4, 5, 6]).params["core"].shape
    torch.Size([4, 5, 6])
    """

    core_class = _layer.TuckerMMoE



class TTMMoE(MMoE):
    """Tensor-train MMoE layer as a module; arguments as :class:`tensormoe.TTMMoE`, plus ``device``.

    Examples
    --------
    >>> TTMMoE(16, 8, [32], ranks=3).params["factor_0"].shape
    torch.Size([1, 32, 3])
    """

    core_class = _layer.TTMMoE



class TRMMoE(MMoE):
    """Tensor-ring MMoE layer as a module; arguments as :class:`tensormoe.TRMMoE`, plus ``device``.

    Examples
    --------
    >>> TRMMoE(16, 8, [32], ranks=3).params["factor_0"].shape
    torch.Size([3, 32, 3])
    """

    core_class = _layer.TRMMoE



_MODULES: dict[str, type[MMoE]] = {cls.core_class.__name__: cls for cls in (CPMMoE, TuckerMMoE, TTMMoE, TRMMoE)}


def wrap(layer: _layer.MMoE, device: Any = None) -> MMoE:
    """The module of the right class for a functional layer, with a copy of its parameters.

    Examples
    --------
    >>> import tensormoe
    >>> type(wrap(tensormoe.TuckerMMoE(4, 3, [5], ranks=2))).__name__
    'TuckerMMoE'
    """
    name = type(layer).__name__
    if name not in _MODULES:
        raise TypeError(f"layer must be one of {sorted(_MODULES)}; got {name}")
    return _MODULES[name].from_layer(layer, device)


class MMoEMLP(nn.Module):
    """Two MMoE layers sharing one set of expert coefficients: ``y = L2(act(L1(x; a)); a)``.

    The coefficients ``a`` come from the first layer's gates and are reused by the
    second (the MLP replacement of the MMoE paper for GPT-2 and MLP-Mixer).  The
    second layer's own gates (every router parameter: ``gate_h``, or
    ``gate_down_h`` and ``gate_up_h`` with ``gate_rank``, ``gate_noise_h``) are
    unused: they stay in its parameters (so each layer remains complete, e.g. for
    :mod:`tensormoe.io`) but are frozen (``requires_grad=False``).

    Parameters
    ----------
    first, second : MMoE
        Modules with the same ``expert_dims`` and ``first.out_dim == second.in_dim``.
    activation : callable
        Elementwise nonlinearity between them (default GELU).

    Examples
    --------
    >>> import torch
    >>> mlp = MMoEMLP(CPMMoE(8, 32, [16], rank=4), CPMMoE(32, 8, [16], rank=4))
    >>> mlp(torch.ones(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    def __init__(
        self,
        first: MMoE,
        second: MMoE,
        activation: Callable[[torch.Tensor], torch.Tensor] = nn.functional.gelu,
    ) -> None:
        super().__init__()
        for name, value in (("first", first), ("second", second)):
            if not isinstance(value, MMoE):
                raise TypeError(f"{name} must be a tensormoe.torch MMoE module; got {type(value).__name__}")
        if first.expert_dims != second.expert_dims:
            raise ValueError(
                f"first.expert_dims={list(first.expert_dims)} and second.expert_dims={list(second.expert_dims)} "
                "must be equal: the second layer reuses the first layer's coefficients"
            )
        if first.out_dim != second.in_dim:
            raise ValueError(f"first.out_dim={first.out_dim} must equal second.in_dim={second.in_dim}")
        self.first = first
        self.second = second
        self.activation = activation
        factors = second.layer.factorization.param_shapes()
        for name, value in second.params.items():
            if name not in factors:  # the routers' parameters
                value.requires_grad_(False)

    def forward(
        self, x: torch.Tensor, *, mask: torch.Tensor | None = None, training: bool = False, rng: Any = None,
        return_routing: bool = False,
    ) -> Any:
        """``second(activation(first(x, a)), a)`` with ``a = first.coefficients(x)``.

        With the default dense routers and no ``mask``, ``a`` is the first layer's
        dense coefficients; otherwise (top-k, expert choice, Soft MoE, a mask,
        ``return_routing=True``) the first layer routes once
        (:meth:`MMoE.route`, with ``mask``, ``training`` and ``rng``) and both
        layers run the routed forward with that routing; ``return_routing=True``
        returns ``(y, routing)``.  While :func:`tensormoe.analysis.intervene`
        acts on the block, the coefficients it gives are used (as with dense routers).

        Examples
        --------
        >>> import torch
        >>> mlp = MMoEMLP(CPMMoE(8, 16, [4], rank=2), CPMMoE(16, 8, [4], rank=2))
        >>> x = torch.randn(3, 8)
        >>> a = mlp.first.coefficients(x)
        >>> torch.allclose(mlp(x), mlp.second(torch.nn.functional.gelu(mlp.first(x, a)), a))
        True
        >>> top = MMoEMLP(CPMMoE(8, 16, [4], rank=2, router="top1"), CPMMoE(16, 8, [4], rank=2, router="top1"))
        >>> y, (r,) = top(x, return_routing=True)
        >>> y.shape, r.indices.shape
        (torch.Size([3, 8]), torch.Size([3, 1]))
        """
        # an intervention (tensormoe.analysis.intervene) replaces the first layer's coefficients: they are used then
        replaced = "coefficients" in vars(self.first)
        if (self.first.layer.spec.dense_routing or replaced) and mask is None and not return_routing:
            a = self.first.coefficients(x)
            return self.second(self.activation(self.first(x, a)), a)
        routing = self.first.route(x, mask=mask, training=training, rng=rng)
        y = self.second(self.activation(self.first(x, routing=routing)), routing=routing)
        return (y, routing) if return_routing else y

    def coefficients(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The shared expert coefficients (the first layer's gates).

        Examples
        --------
        >>> import torch
        >>> mlp = MMoEMLP(CPMMoE(8, 16, [4], rank=2), CPMMoE(16, 8, [4], rank=2))
        >>> [a.shape for a in mlp.coefficients(torch.ones(3, 8))]
        [torch.Size([3, 4])]
        """
        return self.first.coefficients(x)
