"""Training beyond one device: the rank axis of a factorized layer, split over workers.

Two ways to spread an MMoE layer over several devices or processes:

* **Data parallel** (rows of the batch split, parameters replicated): the
  layers work unchanged under PyTorch's DDP and FSDP2 and under ``jax.jit``
  with a batch-sharded input.  Only the load-balancing statistics of top-k
  routing need the whole batch: :func:`tensormoe.distributed.torch.global_load`
  counts every worker's tokens.
* **Rank parallel** (one bond of the factorization split, the batch
  replicated): a factorized weight tensor is a sum over any one of its rank
  indices, so each worker holds a slice of the factors that carry that index,
  runs the ordinary forward of a smaller-rank layer, and one all-reduce of the
  partial outputs ``y[B, O]`` gives the whole layer's output.  The gates are
  replicated; in the backward pass the gradient of the expert coefficients
  ``[B, N_h]`` (``[B, k]`` for top-k) is all-reduced once per level.

This module is framework-neutral: which parameter axes carry the split index
(:func:`rank_axes`), the layer each worker runs (:func:`local_layer`), and
:func:`rank_sharding`, which returns the placements of a PyTorch module
(:mod:`tensormoe.distributed.torch`) or the shardings of a JAX layer
(:mod:`tensormoe.distributed.jax`) without the user writing index arithmetic.
Importing it imports neither PyTorch nor JAX.

Which index is split (``rank_index``, the ``k`` of the rank letters of
:meth:`tensormoe.network.factorizations.Factorization.network`; the default in brackets):

========  =====================================  ===========================================
format    choices of ``rank_index``               parameters split (default)
========  =====================================  ===========================================
CP        ``0``, the CP rank                      every factor, on its rank axis
Tucker    mode ``k``'s rank (``d - 1``: output)   ``factor_k`` axis 1 and the core's axis ``k``
TT        bond ``r_k``, ``1 .. d-1`` (``d - 1``)  ``factor_{k-1}`` axis 2, ``factor_k`` axis 0
TR        bond ``r_k``, ``0 .. d-1`` (``d - 1``)  as TT; ``r_0`` splits the first and last cores
========  =====================================  ===========================================

The defaults split the bond that meets the output mode: for Tucker the output
factor and the core, for TT and TR the input and output cores, usually the
largest.  Whatever the choice, what is communicated is the same: the partial
output ``y[B, O]`` forward, the coefficient gradients backward.

Examples
--------
>>> import tensormoe
>>> from tensormoe.distributed import rank_axes, local_layer
>>> layer = tensormoe.TRMMoE(16, 8, [32], ranks=[2, 3, 4])
>>> rank_axes(layer)
{'factor_1': 2, 'factor_2': 0}
>>> local_layer(layer, 2).factorization
TR(dims=[32, 17, 8], ranks=[2, 3, 2, 2])
"""

from __future__ import annotations

import sys
from typing import Any

from ..layers import MMoE, make_layer
from ..network.factorizations import CP, TT, Factorization, Tucker
from ..validation import check_positive_int

__all__ = ["default_rank_index", "local_layer", "rank_axes", "rank_index_size", "rank_sharding", "with_rank"]


def _core(layer: Any) -> MMoE:
    """The functional layer of a functional layer, a PyTorch module or a JAX layer."""
    if isinstance(layer, MMoE):
        return layer
    core = getattr(layer, "layer", None)
    if isinstance(core, MMoE):
        return core
    raise TypeError(
        "layer must be a tensormoe layer (tensormoe.CPMMoE, ..., a tensormoe.torch module or a "
        f"tensormoe.jax layer); got {type(layer).__name__}"
    )


def _factorization(layer: Any) -> Factorization:
    return layer if isinstance(layer, Factorization) else _core(layer).factorization


def default_rank_index(layer: Any) -> int:
    """The rank index :func:`rank_sharding` splits unless told otherwise.

    CP: ``0`` (its only rank).  Tucker: ``d - 1``, the output mode's rank.  TT and
    TR: ``d - 1``, the bond between the input core and the output core.

    Parameters
    ----------
    layer : layer, module or Factorization
        A tensormoe layer (functional, PyTorch or JAX) or its factorization.

    Examples
    --------
    >>> import tensormoe
    >>> default_rank_index(tensormoe.CPMMoE(8, 4, [6], rank=4)), default_rank_index(tensormoe.TTMMoE(8, 4, [6], ranks=3))
    (0, 2)
    """
    return _factorization(layer).default_rank_index()


def rank_index_size(layer: Any, rank_index: int | None = None) -> int:
    """The size of rank index ``rank_index``: how many terms the weight tensor sums over it.

    Parameters
    ----------
    layer : layer, module or Factorization
    rank_index : int, optional
        Default :func:`default_rank_index`.

    Examples
    --------
    >>> import tensormoe
    >>> rank_index_size(tensormoe.TuckerMMoE(8, 4, [6], ranks=[2, 3, 4]))
    4
    """
    f = _factorization(layer)
    k = f.check_rank_index(rank_index)
    if isinstance(f, CP):
        return f.rank
    if isinstance(f, Tucker):
        return f.ranks[k]
    return f.bonds[k]


def rank_axes(layer: Any, rank_index: int | None = None) -> dict[str, int]:
    """The parameters that carry rank index ``rank_index``, and on which axis.

    Read from the tensor network (:meth:`tensormoe.network.factorizations.Factorization.network`): the
    parameters listed hold the rank's letter; the others (the gates, and the
    factors without it) are replicated by rank parallelism.

    Parameters
    ----------
    layer : layer, module or Factorization
        A tensormoe layer (functional, PyTorch or JAX) or its factorization.
    rank_index : int, optional
        Which rank to split (see the module's table); default
        :func:`default_rank_index`.

    Returns
    -------
    dict of str to int
        Parameter name to axis.

    Raises
    ------
    ValueError
        If ``rank_index`` names no rank of the format.

    Examples
    --------
    >>> import tensormoe
    >>> rank_axes(tensormoe.CPMMoE(8, 4, [6], rank=4))
    {'factor_0': 1, 'factor_1': 1, 'factor_2': 1}
    >>> rank_axes(tensormoe.TuckerMMoE(8, 4, [6], ranks=2))
    {'factor_2': 1, 'core': 2}
    >>> rank_axes(tensormoe.TRMMoE(8, 4, [6], ranks=2), rank_index=0)
    {'factor_0': 0, 'factor_2': 2}
    """
    return _factorization(layer).rank_axes(rank_index)


def _local_ranks(f: Factorization, k: int, size: int) -> Any:
    if isinstance(f, CP):
        return size
    if isinstance(f, Tucker):
        ranks = list(f.ranks)
        ranks[k] = size
        return ranks
    bonds = list(f.bonds)
    bonds[k] = size
    if k == 0:
        bonds[-1] = size
    return bonds


def local_layer(layer: Any, parts: int, rank_index: int | None = None) -> MMoE:
    """The functional layer each of ``parts`` workers runs: the rank ``rank_index`` divided by ``parts``.

    Same configuration (gates and routers included), only the split rank is
    ``size / parts``; its forward on one slice of the factors is that slice's
    share of the output, and the shares sum to the whole layer's output.  Its
    own parameters are a fresh draw (replace them with the slices).

    Parameters
    ----------
    layer : layer or module
        A tensormoe layer (functional, PyTorch or JAX).
    parts : int
        Number of workers the rank is split over; must divide its size.
    rank_index : int, optional
        Which rank to split; default :func:`default_rank_index`.

    Raises
    ------
    ValueError
        If ``parts`` does not divide the rank's size, or the rank is a TT
        boundary (size 1).

    Examples
    --------
    >>> import numpy as np, tensormoe
    >>> layer = tensormoe.CPMMoE(8, 4, [6], rank=4)
    >>> half = local_layer(layer, 2)
    >>> half.rank
    2
    >>> x = np.random.default_rng(0).normal(size=(3, 8)).astype("float32")
    >>> shares = [half.apply({**layer.params, **{n: layer.params[n][:, p * 2:(p + 1) * 2] for n in rank_axes(layer)}}, x)
    ...           for p in range(2)]
    >>> bool(np.allclose(sum(shares), layer(x), atol=1e-6))
    True
    """
    core = _core(layer)
    f = core.factorization
    k = f.check_rank_index(rank_index)
    parts = check_positive_int(parts, "parts")
    size = rank_index_size(f, k)
    if size % parts:
        what = "a TT boundary rank (always 1)" if isinstance(f, TT) and k == 0 else f"{size}"
        raise ValueError(
            f"rank_index={k} of {f!r} has size {what}, which {parts} parts do not divide; expected a rank that is a "
            f"multiple of {parts} (or another rank_index, or fewer parts)"
        )
    return with_rank(core, k, size // parts)


def with_rank(layer: Any, rank_index: int, size: int) -> MMoE:
    """A functional layer configured like ``layer`` but with rank ``rank_index`` of size ``size``.

    Parameters drawn afresh; :func:`local_layer` is this with the size divided.

    Examples
    --------
    >>> import tensormoe
    >>> with_rank(tensormoe.TuckerMMoE(8, 4, [6], ranks=2), 0, 1).factorization.ranks
    (1, 2, 2)
    """
    core = _core(layer)
    f = core.factorization
    k = f.check_rank_index(rank_index)
    size = check_positive_int(size, "size")
    kwargs = {
        "bias": core.bias, "gate": core.gate, "gate_norm": core.gate_norm, "init_std": core.init_std,
        "dtype": core.dtype, "seed": core.seed, "optimize": core.optimize, "router": list(core.routers),
        "check_finite": core.check_finite, "gate_rank": core.gate_rank,
    }
    return make_layer(f.name, core.in_dim, core.out_dim, list(core.expert_dims), _local_ranks(f, k, size), **kwargs)


def rank_sharding(layer: Any, mesh: Any, axis: str | None = None, rank_index: int | None = None) -> Any:
    """Where each parameter goes when ``layer`` is split on its rank over ``mesh``.

    * For a :mod:`tensormoe.torch` module and a ``torch.distributed`` ``DeviceMesh``:
      a dict of parameter name to DTensor placements (``Shard(axis)`` for the
      split factors, ``Replicate()`` for the rest), see
      :func:`tensormoe.distributed.torch.rank_sharding`.
    * For a :mod:`tensormoe.jax` layer and a ``jax.sharding.Mesh``: a layer of the
      same structure whose leaves are ``NamedSharding``, ready for
      ``jax.device_put(layer, shardings)``, see
      :func:`tensormoe.distributed.jax.rank_sharding`.

    Parameters
    ----------
    layer : tensormoe.torch.MMoE or tensormoe.jax.MMoE
    mesh : DeviceMesh or jax.sharding.Mesh
    axis : str, optional
        The mesh axis to split over (default: the mesh's only axis).
    rank_index : int, optional
        Which rank to split; default :func:`default_rank_index`.

    Examples
    --------
    >>> import jax
    >>> from jax.sharding import Mesh
    >>> from tensormoe.jax import CPMMoE
    >>> layer = CPMMoE(8, 4, [6], rank=4)
    >>> shardings = rank_sharding(layer, Mesh(jax.devices()[:1], ("rank",)))
    >>> shardings.params["factor_0"].spec, shardings.params["gate_0"].spec
    (P(None, 'rank'), P())
    """
    torch_shell = sys.modules.get("tensormoe.torch")
    if torch_shell is not None and isinstance(layer, torch_shell.MMoE):
        from . import torch as _torch

        return _torch.rank_sharding(layer, mesh, axis, rank_index)
    jax_shell = sys.modules.get("tensormoe.jax")
    if jax_shell is not None and isinstance(layer, jax_shell.MMoE):
        from . import jax as _jax

        return _jax.rank_sharding(layer, mesh, axis, rank_index)
    raise TypeError(
        f"layer must be a tensormoe.torch module or a tensormoe.jax layer; got {type(layer).__name__} "
        "(a functional layer has no device: use rank_axes for its parameter axes)"
    )
