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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import layers as _layer
from ._array import dtype_name, to_numpy
from .backend import backend_context
from .routing.batchnorm import BatchNormState
from .tools import reference as _reference

__all__ = ["CPMMoE", "MMoE", "MMoEMLP", "MuMoE", "TRMMoE", "TTMMoE", "TuckerMMoE", "from_reference", "wrap"]

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
    norms : torch.nn.ModuleList
        With ``gate_norm="batchnorm"`` only: each level's running statistics as
        buffers (``norms.h.running_mean``, ``running_var``,
        ``num_batches_tracked``); training mode (``module.train()``) normalises
        with the batch's statistics and updates them, evaluation mode uses them.

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
        if layer.gate_norm == "batchnorm":
            # one module of buffers per level: state_dict keys norms.{h}.running_mean / running_var / num_batches_tracked
            self.norms = nn.ModuleList(_RunningStats(state, device) for state in layer.norm_state)

    def _norm_state(self) -> tuple[BatchNormState, ...]:
        return tuple(BatchNormState(m.running_mean, m.running_var, m.num_batches_tracked) for m in self.norms)

    def _keep_norm_state(self, state: Sequence[BatchNormState]) -> None:
        with torch.no_grad():
            for module, level in zip(self.norms, state):
                module.running_mean.copy_(level.mean)
                module.running_var.copy_(level.var)
                module.num_batches_tracked.copy_(level.count)

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
        if self.layer.gate_norm == "batchnorm" and coefficients is None and routing is None:
            coefficients = self.coefficients(x)  # BatchNorm gates: train/eval follow module.train()/.eval()
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
        if self.layer.gate_norm == "batchnorm":
            a, state = self.layer.coefficients(self._params(), x, norm_state=self._norm_state(), training=self.training,
                                               return_norm_state=True, backend=_BACKEND)
            if self.training:
                self._keep_norm_state(state)
            return a
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

    # -- io protocol (tensormoe.tools.io) ------------------------------------------------
    def _assign_params(self, arrays: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, value in arrays.items():
                target = self.params[name]
                target.copy_(torch.as_tensor(value).to(device=target.device, dtype=target.dtype))


class _RunningStats(nn.Module):
    """One level's BatchNorm statistics as buffers, named as ``torch.nn.BatchNorm1d`` names them."""

    def __init__(self, state: BatchNormState, device: Any) -> None:
        super().__init__()
        for name, value in zip(("running_mean", "running_var", "num_batches_tracked"), state):
            # a copy: the functional layer's state (shared by copies of it) is never written through a buffer
            self.register_buffer(name, torch.tensor(np.array(to_numpy(value)), device=device))


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
    :mod:`tensormoe.tools.io`) but are frozen (``requires_grad=False``).

    Parameters
    ----------
    first, second : MMoE
        Modules with the same ``expert_dims`` and ``first.out_dim == second.in_dim``.
    activation : callable
        Elementwise nonlinearity between them (default GELU).
    apply_ln : bool
        The reference's ``apply_ln``: a LayerNorm with weight and bias
        (``input_ln``, ``eps=1e-5``) of the input that only the experts read; the
        gates still read the input itself.

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
        *,
        apply_ln: bool = False,
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
        if not isinstance(apply_ln, bool):
            raise TypeError(f"apply_ln must be True or False; got {apply_ln!r}")
        # apply_ln: a LayerNorm (weight and bias) of the input that only the experts read: the gates read x
        first_param = next(iter(first.params.values()))
        self.input_ln = (nn.LayerNorm(first.in_dim, eps=1e-5, device=first_param.device, dtype=first_param.dtype)
                         if apply_ln else None)
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
        returns ``(y, routing)``.  While :func:`tensormoe.tools.analysis.intervene`
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
        # an intervention (tensormoe.tools.analysis.intervene) replaces the first layer's coefficients: they are used then
        replaced = "coefficients" in vars(self.first)
        if (self.first.layer.spec.dense_routing or replaced) and mask is None and not return_routing:
            a = self.first.coefficients(x)
            return self.second(self.activation(self.first(self._experts_input(x), a)), a)
        routing = self.first.route(x, mask=mask, training=training, rng=rng)
        y = self.second(self.activation(self.first(self._experts_input(x), routing=routing)), routing=routing)
        return (y, routing) if return_routing else y

    def _experts_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_ln is None else self.input_ln(x)

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


#: the reference's normalization= values -> gate_norm
_NORMALIZATION = {"bn": "batchnorm", "ln": "layernorm"}


def MuMoE(  # noqa: N802  (the reference's name)
    MuMoE_layer: type[MMoE],  # noqa: N803
    input_dim: int,
    output_dim: int,
    expert_dims: Sequence[int],
    ranks: Any,
    second_dim: int = 0,
    normalization: str = "bn",
    act: Any = "entmax15",
    use_bias: bool = True,
    hierarchy: int = 1,
    apply_ln: bool = False,
    *,
    device: Any = None,
    dtype: str = "float32",
) -> nn.Module:
    """The reference implementation's ``MuMoE`` wrapper, with its arguments, as tensormoe modules.

    For code written for the reference's ``MuMoE.py``: the same signature (the
    layer class first), giving an :class:`MMoE` module, or an :class:`MMoEMLP`
    with ``second_dim > 0`` (GELU between the layers, the second reusing the
    first's coefficients) or ``apply_ln`` (the experts read ``LayerNorm(x)``, the
    gates ``x``).

    Parameters
    ----------
    MuMoE_layer : class
        :class:`CPMMoE` (the reference's ``CPMuMoE``), :class:`TRMMoE` (its
        ``TRMuMoE``), or another layer class of this module.
    input_dim, output_dim, expert_dims, second_dim, hierarchy
        As the reference's.
    ranks : int or list
        The CP rank, or the layer class's ``ranks`` (reference spellings accepted).
    normalization : {"bn", "ln"}
        ``gate_norm="batchnorm"`` or ``"layernorm"``.
    act : str or callable
        The gate activation: a name, or a function named ``entmax15``, ``softmax``
        or ``sparsemax`` (such as the ``entmax`` package's ``entmax15``).
    use_bias : bool
        ``bias``.
    apply_ln : bool
        The experts read a LayerNorm (with weight and bias) of the input.
    device, dtype
        Of the parameters.

    Returns
    -------
    MMoE or MMoEMLP
        Outputs ``[..., O]``: the reference's ``MuMoE`` returns ``[B, 1, O]`` for
        ``[B, I]`` inputs.

    Examples
    --------
    >>> import torch
    >>> model = MuMoE(input_dim=4, output_dim=8, MuMoE_layer=CPMMoE, expert_dims=[6], ranks=3)
    >>> model(torch.randn(5, 4)).shape, model.layer.gate_norm
    (torch.Size([5, 8]), 'batchnorm')
    >>> block = MuMoE(CPMMoE, 4, 16, [6], 3, second_dim=4, normalization="ln", apply_ln=True)
    >>> type(block).__name__, block(torch.randn(2, 3, 4)).shape
    ('MMoEMLP', torch.Size([2, 3, 4]))
    """
    if not (isinstance(MuMoE_layer, type) and issubclass(MuMoE_layer, MMoE) and MuMoE_layer is not MMoE):
        raise TypeError(f"MuMoE_layer must be a tensormoe.torch layer class such as CPMMoE or TRMMoE; got {MuMoE_layer!r}")
    if normalization not in _NORMALIZATION:
        raise ValueError(f"normalization={normalization!r} is not supported; expected 'bn' or 'ln'")
    gate = getattr(act, "__name__", act)
    rank = {"rank": ranks} if MuMoE_layer.core_class is _layer.CPMMoE else {"ranks": ranks}
    common = dict(expert_dims=expert_dims, hierarchy=hierarchy, bias=use_bias, gate=gate,
                  gate_norm=_NORMALIZATION[normalization], dtype=dtype, device=device, **rank)
    first = MuMoE_layer(input_dim, output_dim, **common)
    if not second_dim and not apply_ln:
        return first
    if not second_dim:
        raise ValueError(
            "apply_ln=True without second_dim: tensormoe's LayerNorm of the experts' input belongs to the two-layer "
            "block (MMoEMLP); load such a checkpoint with tensormoe.tools.reference.from_reference"
        )
    # the second layer's gates are never read (it takes the first layer's coefficients): no statistics for them
    second = MuMoE_layer(output_dim, second_dim, **{**common, "gate_norm": None})
    return MMoEMLP(first, second, apply_ln=apply_ln)


def from_reference(
    state_dict: Mapping[str, Any], *, gate: str = "entmax15", prefix: str = "", dtype: str | None = None,
    device: Any = None,
) -> nn.Module:
    """A reference muMoE checkpoint as a module: :class:`MMoE`, or :class:`MMoEMLP` for a two-layer block.

    Every tensor is read by name and shape (:func:`tensormoe.tools.reference.read_state_dict`:
    anything else is refused, naming it): the factors and gates, the BatchNorm
    statistics into the module's buffers (train/eval then follow
    ``module.train()``/``.eval()`` as in the reference), ``input_ln`` into the
    block's LayerNorm.  A single layer with ``apply_ln`` is not a module here: use
    :func:`tensormoe.tools.reference.from_reference`.

    Parameters
    ----------
    state_dict : mapping of str to array
        The reference module's ``state_dict()``.
    gate : {"entmax15", "softmax", "sparsemax"}
        The reference module's ``act``.
    prefix : str
        Read only the names under this prefix.
    dtype : str, optional
        Default: the checkpoint's.
    device : torch.device or str, optional

    Examples
    --------
    >>> import torch
    >>> state = {"factors.0": torch.randn(6, 3), "factors.1": torch.randn(5, 3), "factors.2": torch.randn(8, 3),
    ...          "projs.0": torch.randn(4, 6), "bn.0.running_mean": torch.zeros(6),
    ...          "bn.0.running_var": torch.ones(6), "bn.0.num_batches_tracked": torch.tensor(0)}
    >>> model = from_reference(state).eval()
    >>> model(torch.randn(2, 4)).shape, sorted(model.state_dict())[:3]
    (torch.Size([2, 8]), ['norms.0.num_batches_tracked', 'norms.0.running_mean', 'norms.0.running_var'])
    """
    checkpoint = _reference.read_state_dict(state_dict, gate=gate, prefix=prefix)
    dtype = checkpoint.dtype if dtype is None else dtype
    if checkpoint.input_ln is not None and len(checkpoint.configs) == 1:
        raise ValueError(
            "the checkpoint has input_ln.* but no second layer: a single layer whose experts read LayerNorm(x) is "
            "not a tensormoe.torch module; load it with tensormoe.tools.reference.from_reference"
        )
    classes = {cls.__name__: cls for cls in (CPMMoE, TuckerMMoE, TTMMoE, TRMMoE)}
    modules = []
    for k, (config, params) in enumerate(zip(checkpoint.configs, checkpoint.params)):
        kwargs = {key: value for key, value in config.items() if key != "class"}
        if k:
            kwargs["gate_norm"] = None  # the second layer's gates are never read
        module = classes[config["class"]](**kwargs, dtype=dtype, device=device)
        arrays = {name: to_numpy(value) for name, value in params.items()}
        if k:  # not in the reference: zeros, frozen by MMoEMLP
            arrays.update({name: np.zeros(shape) for name, shape in module.layer.param_shapes().items()
                           if name not in arrays})
        module._assign_params(arrays)
        modules.append(module)
    first = modules[0]
    if checkpoint.gate_norm_state is not None:
        first._keep_norm_state(tuple(BatchNormState(*(torch.as_tensor(to_numpy(a)) for a in s))
                                     for s in checkpoint.gate_norm_state))
    if len(modules) == 1:
        return first
    block = MMoEMLP(first, modules[1], apply_ln=checkpoint.input_ln is not None)
    if checkpoint.input_ln is not None:
        with torch.no_grad():
            for target, value in zip((block.input_ln.weight, block.input_ln.bias), checkpoint.input_ln):
                target.copy_(torch.as_tensor(to_numpy(value)))
    return block
