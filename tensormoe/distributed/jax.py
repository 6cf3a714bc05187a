"""Rank parallelism on JAX: factors sharded on their rank axis, one ``psum`` per forward.

Data parallelism needs nothing from here: jit the layer with the input's rows
sharded (``NamedSharding(mesh, P("data"))``) and its parameters replicated, and
XLA all-reduces the parameter gradients (the whole batch's routing statistics
included, since the program is global).

For rank parallelism, :func:`rank_sharding` places each factor that carries the
split rank with ``NamedSharding(mesh, P(..., axis, ...))`` on that rank's axis
and replicates the rest (gates, other factors); :func:`rank_parallel` returns
the forward to jit: the routers run replicated, then inside ``jax.shard_map``
each device runs the forward of the smaller-rank layer
(:func:`tensormoe.distributed.local_layer`) on its slices, and one
``jax.lax.psum`` of ``y[B, O]`` sums the shares.  Differentiated, the only
other collective is the all-reduce of the coefficients' gradient (``[B, N_h]``
per level, ``[B, k]`` for top-k).

Importing this module imports JAX.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> from jax.sharding import Mesh
>>> from tensormoe.jax import CPMMoE
>>> from tensormoe.distributed.jax import rank_parallel, rank_sharding
>>> mesh = Mesh(jax.devices()[:1], ("rank",))
>>> layer = CPMMoE(8, 4, [6], rank=4)
>>> sharded = jax.device_put(layer, rank_sharding(layer, mesh))
>>> y = jax.jit(rank_parallel(layer, mesh))(sharded, jnp.ones((3, 8)))
>>> bool(jnp.allclose(y, layer(jnp.ones((3, 8))), atol=1e-6))
True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..jax import MMoE as _Layer
from ..routing import Routing
from . import _core, local_layer, rank_axes

__all__ = ["rank_parallel", "rank_sharding", "rank_specs"]


def _mesh_axis(mesh: Any, axis: str | None) -> str:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    if axis is None:
        if len(names) != 1:
            raise ValueError(f"mesh has the axes {names}: name the one to split the rank over (axis=...)")
        return names[0]
    if axis not in names:
        raise ValueError(f"axis={axis!r} is not an axis of the mesh; expected one of {names}")
    return axis


def _check_layer(layer: Any) -> _Layer:
    if not isinstance(layer, _Layer):
        raise TypeError(f"layer must be a tensormoe.jax layer (CPMMoE, ...); got {type(layer).__name__}")
    return layer


def rank_specs(layer: Any, axis: str, rank_index: int | None = None) -> dict[str, PartitionSpec]:
    """The ``PartitionSpec`` of every parameter: ``axis`` on the rank axis of the split factors, else replicated.

    Parameters
    ----------
    layer : tensormoe.jax.MMoE
    axis : str
        Mesh axis name.
    rank_index : int, optional
        Which rank to split (:func:`tensormoe.distributed.rank_axes`).

    Examples
    --------
    >>> from tensormoe.jax import TTMMoE
    >>> rank_specs(TTMMoE(8, 4, [6], ranks=2), "rank")
    {'factor_0': P(), 'factor_1': P(None, None, 'rank'), 'factor_2': P('rank',), 'gate_0': P()}
    """
    axes = rank_axes(_check_layer(layer), rank_index)
    specs = {}
    for name in layer.params:
        if name in axes:
            specs[name] = PartitionSpec(*([None] * axes[name]), axis)
        else:
            specs[name] = PartitionSpec()
    return specs


def rank_sharding(layer: Any, mesh: Mesh, axis: str | None = None, rank_index: int | None = None) -> Any:
    """A layer of ``NamedSharding`` leaves: the factors split on their rank over ``axis``, the rest replicated.

    ``jax.device_put(layer, rank_sharding(layer, mesh))`` places the layer.

    Parameters
    ----------
    layer : tensormoe.jax.MMoE
    mesh : jax.sharding.Mesh
    axis : str, optional
        The mesh axis to split over (default: the mesh's only axis).  Other
        mesh axes replicate the parameters.
    rank_index : int, optional
        Which rank to split (default :func:`tensormoe.distributed.default_rank_index`).

    Raises
    ------
    ValueError
        If the mesh axis size does not divide the rank.

    Examples
    --------
    >>> import jax
    >>> from jax.sharding import Mesh
    >>> from tensormoe.jax import TuckerMMoE
    >>> layer = TuckerMMoE(8, 4, [6], ranks=2)
    >>> placed = jax.device_put(layer, rank_sharding(layer, Mesh(jax.devices()[:1], ("rank",))))
    >>> placed.params["core"].sharding.spec
    P(None, None, 'rank')
    """
    axis = _mesh_axis(mesh, axis)
    local_layer(_check_layer(layer), mesh.shape[axis], rank_index)  # the split must divide the rank
    specs = rank_specs(layer, axis, rank_index)
    _, aux = layer.tree_flatten()
    return type(layer).tree_unflatten(aux, [NamedSharding(mesh, specs[name]) for name in aux[1]])


def _per_token(routing: Routing) -> Routing:
    """What the forward reads of a routing (the statistics stay outside the ``shard_map``)."""
    return Routing(weights=routing.weights, indices=routing.indices, dispatch=routing.dispatch)


def rank_parallel(
    layer: Any,
    mesh: Mesh,
    axis: str | None = None,
    rank_index: int | None = None,
    batch_axis: str | None = None,
) -> Callable[..., Any]:
    """The rank-parallel forward of ``layer`` over ``mesh``: ``apply(layer_or_params, x, **kwargs)``.

    The returned function takes the layer placed with :func:`rank_sharding` (or
    its ``params`` dict) and the input, and returns what
    :meth:`tensormoe.layers.MMoE.apply` returns (``mask``, ``training``, ``rng``
    and ``return_routing`` are passed on).  Jit it and differentiate it as
    usual (keyword arguments static: ``jax.jit(f, static_argnames="return_routing")``);
    gradients come back as a layer with the same shardings.

    What runs: the routers on every device (replicated), then per device the
    forward of :func:`tensormoe.distributed.local_layer` on its slice of the
    factors, then one ``psum`` of ``y`` over ``axis``.  The compiled program
    holds one all-reduce of ``y`` forward and, when differentiated, one of the
    coefficients' gradient per level (XLA may merge them).

    Parameters
    ----------
    layer : tensormoe.jax.MMoE
        The layer (its configuration; its parameters are the ones you pass to
        the returned function).
    mesh : jax.sharding.Mesh
    axis : str, optional
        The mesh axis the rank is split over (default: the mesh's only axis).
    rank_index : int, optional
        Which rank to split (default :func:`tensormoe.distributed.default_rank_index`).
    batch_axis : str, optional
        A second mesh axis over which the rows of ``x`` are sharded (data
        parallel times rank parallel); default: ``x`` replicated.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import Mesh
    >>> from tensormoe.jax import TRMMoE
    >>> mesh = Mesh(jax.devices()[:1], ("rank",))
    >>> layer = TRMMoE(8, 4, [6], ranks=2, router="top2")
    >>> forward = jax.jit(rank_parallel(layer, mesh), static_argnames="return_routing")
    >>> y, (routing,) = forward(jax.device_put(layer, rank_sharding(layer, mesh)), jnp.ones((3, 8)), return_routing=True)
    >>> y.shape, routing.indices.shape
    ((3, 4), (3, 2))
    """
    axis = _mesh_axis(mesh, axis)
    if batch_axis is not None:
        batch_axis = _mesh_axis(mesh, batch_axis)
        if batch_axis == axis:
            raise ValueError(f"batch_axis={batch_axis!r} must differ from the rank axis {axis!r}")
    core = _core(_check_layer(layer))
    local = local_layer(core, mesh.shape[axis], rank_index)
    specs = rank_specs(layer, axis, rank_index)
    rows = PartitionSpec(batch_axis)

    def shard(params: Mapping[str, Any], x: Any, routing: tuple[Routing, ...]) -> Any:
        return jax.lax.psum(local.apply(params, x, routing=routing, backend="jax"), axis)

    def apply(
        params: Any,
        x: Any,
        *,
        mask: Any = None,
        training: bool = False,
        rng: Any = None,
        return_routing: bool = False,
    ) -> Any:
        params = params.params if isinstance(params, _Layer) else params
        routing = core.route(params, x, mask=mask, training=training, rng=rng, backend="jax")
        carried = tuple(_per_token(r) for r in routing)
        local_params = {name: params[name] for name in specs}
        y = jax.shard_map(shard, mesh=mesh, in_specs=(specs, rows, rows), out_specs=rows)(local_params, x, carried)
        return (y, routing) if return_routing else y

    return apply
