"""The layers the sections time, built through tensormoe's public API, and the pieces of their forward."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

import tensormoe
from tensormoe import contraction, gates

from chains import coefficients, limit_forward, namespace
from harness import EINSUM_NAMES, Backend

#: The layer class of each format, by name (in ``tensormoe``, ``tensormoe.torch`` and ``tensormoe.jax`` alike)
CLASSES = {"cp": "CPMMoE", "tucker": "TuckerMMoE", "tt": "TTMMoE", "tr": "TRMMoE"}


def make_layer(kind: str, in_dim: int, out_dim: int, dims: list[int], ranks: Any, shell: Any = tensormoe,
               **kwargs: Any) -> Any:
    """The layer of format ``kind`` from the module ``shell``; ``ranks`` is CP's ``rank`` or the others' ``ranks``."""
    cls = getattr(shell, CLASSES[kind])
    if kind == "cp":
        return cls(in_dim, out_dim, dims, rank=ranks, **kwargs)
    return cls(in_dim, out_dim, dims, ranks=ranks, **kwargs)


def make_case(kind: str, in_dim: int, out_dim: int, dims: list[int], ranks: Any, batch: int, seed: int = 0,
              **kwargs: Any) -> tuple[Any, dict[str, np.ndarray], np.ndarray]:
    """A NumPy-built layer, its parameters as NumPy arrays (random gates) and an input ``x[batch, I]``.

    The gates are drawn at random (the layers start them at zero, i.e. uniform
    coefficients) so the sparse activations do real work.
    """
    with tensormoe.backend_context("numpy"):
        layer = make_layer(kind, in_dim, out_dim, dims, ranks, seed=seed, **kwargs)
        params = {k: np.asarray(v) for k, v in layer.params.items()}
    rng = np.random.default_rng(seed + 1)
    for name, shape in layer.param_shapes().items():
        if name.startswith("gate"):
            params[name] = rng.normal(0.0, 1.0 / math.sqrt(in_dim), size=shape).astype("float32")
    x = rng.normal(size=(batch, in_dim)).astype("float32")
    return layer, params, x


def million_rank(in_dim: int, out_dim: int, dims: list[int], flops_factor: float = 4.0) -> int:
    """CP rank making the layer's forward (gates included) about ``flops_factor`` linear layers, in steps of 32."""
    gate_flops = in_dim * sum(dims)
    per_rank = sum(dims) + in_dim + 1 + out_dim
    r = (flops_factor * in_dim * out_dim - gate_flops) / per_rank
    step = 32 if r >= 64 else 1
    return max(1, int(round(r / step)) * step)


def tensormoe_gates(layer: Any) -> tuple[Callable, Callable]:
    """The layer's activation and LayerNorm from ``tensormoe.routing.gates``, on the backend in force."""
    return gates.ACTIVATIONS[layer.gate], gates.layer_norm


def same_gates_forward(layer: Any, params: dict, x: Any) -> Any:
    """The hand chain with tensormoe's own gates: the limit of the contraction alone."""
    return limit_forward(layer, params, x, *tensormoe_gates(layer))


def with_ones(x: Any) -> Any:
    """``[x, 1]``: a column of ones appended (the bias input)."""
    xp = namespace(x)
    if xp.__name__ == "torch":
        return xp.nn.functional.pad(x, (0, 1), value=1.0)
    return xp.concatenate([x, xp.ones((*x.shape[:-1], 1), dtype=x.dtype)], axis=-1)


def unplanned_operands(layer: Any, params: dict, x: Any) -> list[Any]:
    """The forward equation's operands: gates' coefficients (tensormoe's gates), ``[x, 1]``, the parameters."""
    coeffs = coefficients(layer, params, x, *tensormoe_gates(layer))
    return [*coeffs, with_ones(x) if layer.bias else x, *(params[k] for k in layer.factorization.network())]


def planned_contraction(be: Backend, equation: str, operands: list[Any], optimize: str) -> Callable[[], Any]:
    """A call contracting ``operands`` as a layer's forward does: the cached plan of their shapes (searched and
    tuned here, once), looked up and its program run (the operands have the plan's shapes: no checks)."""
    shapes = [tuple(o.shape) for o in operands]
    be.tune(contraction.get_plan(equation, *shapes, backend=be.name, dtype="float32", optimize=optimize), operands)
    name = EINSUM_NAMES[be.name]

    def call() -> Any:
        plan = contraction.get_plan(equation, *(tuple(o.shape) for o in operands), backend=be.name,
                                    dtype="float32", optimize=optimize)
        program = plan.program
        if program is None:
            return plan.expression(*operands, backend=name)
        return program(*operands, backend=name)

    return call
