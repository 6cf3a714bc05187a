"""JAX's array code: ``jax.numpy``, ``lax.top_k``, ``.at[].add``, PRNG keys, ``lax.while_loop``, ``jax.jit``.

Imported when the JAX backend is first used (it imports JAX).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._array import register_array_type
from .base import Ops

__all__ = ["JaxOps"]

register_array_type(jax.Array, "jax")


class JaxOps(Ops):
    """The JAX backend's operations (see :class:`tensormoe.frameworks.Ops`).

    Examples
    --------
    >>> ops = JaxOps()
    >>> ops.while_loop(lambda s: s < 10, lambda s: 2 * s, jnp.asarray(1), 100)[0].tolist()
    16
    """

    name = "jax"
    einsum_backend = "jax"
    xp = jnp

    def is_array(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def dtype(self, name: str) -> Any:
        if name == "float64" and not jax.config.jax_enable_x64:
            raise TypeError(
                "dtype='float64' on the jax backend needs 64-bit mode, which is off "
                "(JAX would silently compute in float32); enable it with "
                "jax.config.update('jax_enable_x64', True) or use dtype='float32'"
            )
        return getattr(jnp, name)

    def asarray(self, x: Any, dtype: str | None = None, like: Any = None) -> Any:
        if dtype is None:
            return jnp.asarray(x)
        return jnp.asarray(x, dtype=self.dtype(dtype))

    def top_k(self, x: Any, k: int) -> tuple[Any, Any]:
        return jax.lax.top_k(x, k)  # the lower index first among equal values

    def scatter_add_last(self, index: Any, values: Any, n: int) -> Any:
        out = jnp.zeros((*index.shape[:-1], n), dtype=values.dtype)
        return out.at[(*jnp.indices(index.shape, sparse=True)[:-1], index)].add(values)

    def normal(self, rng: Any, shape: tuple[int, ...], like: Any) -> tuple[Any, Any]:
        if isinstance(rng, jax.Array):
            rng, key = jax.random.split(rng)
            return jax.random.normal(key, shape, dtype=like.dtype), rng
        return super().normal(rng, shape, like)

    def uniform(self, rng: Any, shape: tuple[int, ...], like: Any) -> tuple[Any, Any]:
        if isinstance(rng, jax.Array):
            rng, key = jax.random.split(rng)
            return jax.random.uniform(key, shape, dtype=like.dtype), rng
        return super().uniform(rng, shape, like)

    def gelu(self, x: Any) -> Any:
        return jax.nn.gelu(x, approximate=False)

    def stop_gradient(self, x: Any) -> Any:
        return jax.lax.stop_gradient(x)

    def while_loop(self, cond: Any, body: Any, state: Any, max_iterations: int) -> tuple[Any, Any]:
        def counted_cond(carry: Any) -> Any:
            return jnp.logical_and(carry[1] < max_iterations, cond(carry[0]))

        def counted_body(carry: Any) -> Any:
            return body(carry[0]), carry[1] + 1

        return jax.lax.while_loop(counted_cond, counted_body, (state, jnp.asarray(0, dtype=jnp.int32)))

    def is_tracer(self, x: Any) -> bool:
        return isinstance(x, jax.core.Tracer)

    def compile(self, fn: Any) -> Any:
        # eager JAX compiles every primitive for every new shape; one jit per forward compiles once
        return jax.jit(fn)

    def tune(self, plan: Any, operands: list[Any]) -> None:
        # XLA's speed differs between programs the cost model ranks alike (which side of a product reads a
        # transposed operand): compile each candidate and time it on stand-ins, outside any running trace
        rng = np.random.default_rng(0)
        with jax.ensure_compile_time_eval():
            stand_ins = [jnp.asarray(rng.standard_normal(shape), dtype=o.dtype) for o, shape in zip(operands, plan.shapes)]
            plan.tune(
                *stand_ins,
                backend=self.einsum_backend,
                sync=lambda out: out.block_until_ready(),
                wrap=lambda program: jax.jit(functools.partial(program, backend=self.einsum_backend)),
            )
