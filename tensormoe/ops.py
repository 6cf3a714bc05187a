"""The few array operations tensormoe needs, one small class per framework.

Each class is created on first use of its backend, so no framework is imported
unless its backend is in use.  The math (gates, layers) is written once against
this interface; the classes only translate names (``axis``/``dim``,
``keepdims``/``keepdim``) and array creation (device, dtype).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._array import backend_of, dtype_name, register_array_type, to_numpy
from .backend import canonical_name, get_backend, load
from .contraction import cached_program, get_plan

__all__ = ["Ops", "get_ops", "ops_for_array"]

_DTYPES = ("float16", "bfloat16", "float32", "float64")


class Ops:
    """Array operations of one backend (abstract).

    The gates and the layer are written once against this interface; one
    subclass per framework translates names (``axis``/``dim``,
    ``keepdims``/``keepdim``) and array creation (device, dtype).  Reductions
    work on the last axis and keep it, so results broadcast against the input.
    Use :func:`get_ops` to get the instance of a backend; a new backend is one
    more subclass.

    Examples
    --------
    >>> ops = get_ops("numpy")
    >>> ops.name, ops.einsum_backend
    ('numpy', 'numpy')
    """

    name: str
    #: the ``backend=`` argument opt_einsum expects for this framework
    einsum_backend: str
    xp: Any

    # --- arrays -----------------------------------------------------------------
    def is_array(self, x: Any) -> bool:
        """Whether ``x`` is an array of this backend.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").is_array(np.zeros(2)), get_ops("numpy").is_array([0.0])
        (True, False)
        """
        raise NotImplementedError

    def dtype(self, name: str) -> Any:
        """The framework's dtype object for a dtype name (``"float32"``, ...).

        Examples
        --------
        >>> get_ops("numpy").dtype("float32")
        dtype('float32')
        """
        raise NotImplementedError

    def dtype_name(self, x: Any) -> str:
        """The dtype name of an array, without the framework's prefix.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").dtype_name(np.zeros(2, dtype="float32"))
        'float32'
        """
        return dtype_name(x)

    def asarray(self, x: Any, dtype: str | None = None, like: Any = None) -> Any:
        """An array of this backend from ``x`` (any array or nested list).

        ``dtype`` is a dtype name (default: keep ``x``'s); ``like`` is an array whose
        device the result should share (PyTorch).  Never cuts autograd: a tensor of
        this backend is returned as is (cast if needed), not copied through TensorLy.

        Examples
        --------
        >>> get_ops("numpy").asarray([1, 2], "float32")
        array([1., 2.], dtype=float32)
        """
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy array with the values of ``x``, detached from autograd.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").to_numpy(np.ones(2))
        array([1., 1.])
        """
        return to_numpy(x)

    def concat_ones(self, x: Any) -> Any:
        """Append a column of ones on the last axis (the bias input).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").concat_ones(np.zeros((2, 2)))
        array([[0., 0., 1.],
               [0., 0., 1.]])
        """
        ones = self.xp.ones((*x.shape[:-1], 1), dtype=x.dtype)
        return self.xp.concatenate([x, ones], axis=-1)

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        """``x`` with a new shape.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").reshape(np.zeros((2, 3, 4)), (6, 4)).shape
        (6, 4)
        """
        return self.xp.reshape(x, shape)

    # --- reductions and elementwise --------------------------------------------
    def max(self, x: Any, axis: int = -1) -> Any:
        """Maximum over ``axis``, keeping it (size one).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").max(np.array([[3.0, 1.0, 2.0]]))
        array([[3.]])
        """
        return self.xp.max(x, axis=axis, keepdims=True)

    def sum(self, x: Any, axis: int = -1) -> Any:
        """Sum over ``axis``, keeping it (size one).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").sum(np.array([[3.0, 1.0, 2.0]]))
        array([[6.]])
        """
        return self.xp.sum(x, axis=axis, keepdims=True)

    def mean(self, x: Any, axis: int = -1) -> Any:
        """Mean over ``axis``, keeping it (size one).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").mean(np.array([[3.0, 1.0, 2.0]]))
        array([[2.]])
        """
        return self.xp.mean(x, axis=axis, keepdims=True)

    def layer_norm(self, x: Any, eps: float) -> Any:
        """``x`` normalised over the last axis to zero mean and unit variance (no affine; the framework's fused op).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").layer_norm(np.array([[1.0, 3.0]]), 0.0)
        array([[-1.,  1.]])
        """
        centred = x - self.mean(x)
        return centred / self.sqrt(self.mean(centred * centred) + eps)

    def exp(self, x: Any) -> Any:
        """Elementwise exponential.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").exp(np.zeros(2))
        array([1., 1.])
        """
        return self.xp.exp(x)

    def sqrt(self, x: Any) -> Any:
        """Elementwise square root.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").sqrt(np.array([4.0, 9.0]))
        array([2., 3.])
        """
        return self.xp.sqrt(x)

    def clip_min(self, x: Any, low: float) -> Any:
        """Elementwise ``max(x, low)``.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").clip_min(np.array([3.0, 1.0, 2.0]), 2.0)
        array([3., 2., 2.])
        """
        return self.xp.maximum(x, low)

    def relu(self, x: Any) -> Any:
        """Elementwise ``max(x, 0)``.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").relu(np.array([-1.0, 2.0]))
        array([0., 2.])
        """
        return self.clip_min(x, 0)

    def sort_descending(self, x: Any) -> Any:
        """``x`` sorted in descending order along the last axis.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").sort_descending(np.array([[3.0, 1.0, 2.0]]))
        array([[3., 2., 1.]])
        """
        return -self.xp.sort(-x, axis=-1)

    def cumsum(self, x: Any) -> Any:
        """Cumulative sum along the last axis.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").cumsum(np.array([[3.0, 1.0, 2.0]]))
        array([[3., 4., 6.]])
        """
        return self.xp.cumsum(x, axis=-1)

    def arange_like(self, x: Any, start: int, stop: int) -> Any:
        """``start, ..., stop - 1`` in ``x``'s dtype (and on its device).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").arange_like(np.zeros(1, dtype="float32"), 1, 4)
        array([1., 2., 3.], dtype=float32)
        """
        return self.xp.arange(start, stop, dtype=x.dtype)

    def take_last(self, x: Any, index: Any) -> Any:
        """``x[..., index[..., 0]]`` keeping a trailing axis of size one.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").take_last(np.array([[3.0, 1.0, 2.0]]), np.array([[2]]))
        array([[2.]])
        """
        return self.xp.take_along_axis(x, index, axis=-1)

    def count_true(self, mask: Any) -> Any:
        """Number of true entries along the last axis, keeping it (size one).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").count_true(np.array([[True, False, True]]))
        array([[2]])
        """
        return self.xp.sum(mask, axis=-1, keepdims=True)

    def cast_like(self, x: Any, like: Any) -> Any:
        """``x`` converted to the dtype of ``like``.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").cast_like(np.ones(2), np.zeros(1, dtype="float32")).dtype
        dtype('float32')
        """
        return x.astype(like.dtype)

    def cast(self, x: Any, name: str) -> Any:
        """``x`` converted to the dtype named ``name``.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").cast(np.ones(2), "float16").dtype
        dtype('float16')
        """
        return x.astype(self.dtype(name))

    def is_finite_all(self, x: Any) -> bool:
        """Whether every entry of ``x`` is finite (a Python bool).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").is_finite_all(np.array([1.0, np.inf]))
        False
        """
        return bool(self.xp.all(self.xp.isfinite(x)))

    # --- routing: selection, gathers and scatters --------------------------------
    def log(self, x: Any) -> Any:
        """Natural logarithm.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").log(np.array([1.0]))
        array([0.])
        """
        return self.xp.log(x)

    def softplus(self, x: Any) -> Any:
        """``log(1 + exp(x))`` without overflow.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").softplus(np.array([0.0, 1000.0])).round(4).tolist()
        [0.6931, 1000.0]
        """
        return self.relu(x) + self.xp.log1p(self.xp.exp(-self.xp.abs(x)))

    def where(self, condition: Any, x: Any, y: Any) -> Any:
        """``x`` where ``condition`` holds, else ``y`` (broadcast).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").where(np.array([True, False]), np.array([1.0, 2.0]), -1.0)
        array([ 1., -1.])
        """
        return self.xp.where(condition, x, y)

    def swap_last(self, x: Any) -> Any:
        """Swap the last two axes.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").swap_last(np.zeros((2, 3, 4))).shape
        (2, 4, 3)
        """
        return self.xp.swapaxes(x, -1, -2)

    def moveaxis(self, x: Any, source: Sequence[int], destination: Sequence[int]) -> Any:
        """Move axes ``source`` to positions ``destination``.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").moveaxis(np.zeros((2, 3, 4)), [1], [0]).shape
        (3, 2, 4)
        """
        return self.xp.moveaxis(x, tuple(source), tuple(destination))

    def zeros(self, shape: tuple[int, ...], like: Any) -> Any:
        """Zeros of ``shape`` with the dtype (and device) of ``like``.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").zeros((2,), like=np.ones(1, dtype="float32"))
        array([0., 0.], dtype=float32)
        """
        return self.xp.zeros(shape, dtype=like.dtype)

    def top_k(self, x: Any, k: int) -> tuple[Any, Any]:
        """The ``k`` largest entries of the last axis, descending, and their indices.

        Ties go to the lower index on every backend, so equal logits (e.g. zero
        gates) select the same experts everywhere.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").top_k(np.array([[1.0, 3.0, 3.0, 0.0]]), 2)
        (array([[3., 3.]]), array([[1, 2]]))
        """
        raise NotImplementedError

    def gather(self, x: Any, index: tuple[Any, ...]) -> Any:
        """``x[index]``: the leading axes indexed by broadcastable integer arrays.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").gather(np.arange(6.0).reshape(3, 2), (np.array([[2, 0]]),))
        array([[[4., 5.],
                [0., 1.]]])
        """
        return x[index]

    def scatter_add_last(self, index: Any, values: Any, n: int) -> Any:
        """Zeros ``[..., n]`` with ``values[..., j]`` added at ``index[..., j]`` (duplicates add up).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").scatter_add_last(np.array([[2, 0, 2]]), np.array([[1.0, 2.0, 3.0]]), 4)
        array([[2., 0., 4., 0.]])
        """
        raise NotImplementedError

    def normal(self, rng: Any, shape: tuple[int, ...], like: Any) -> tuple[Any, Any]:
        """Standard normal draws of ``shape`` in the dtype of ``like``, and the generator to use next.

        ``rng`` is an integer seed or a ``numpy.random.Generator`` (drawn in
        NumPy in float64 and cast, so every backend gets the same numbers), or on
        PyTorch a ``torch.Generator`` and on JAX a PRNG key (drawn natively).

        Examples
        --------
        >>> import numpy as np
        >>> ops = get_ops("numpy")
        >>> draw, rng = ops.normal(0, (2,), like=np.zeros(1))
        >>> bool(np.array_equal(draw, np.random.default_rng(0).standard_normal(2)))
        True
        """
        if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
            rng = np.random.default_rng(int(rng))
        if isinstance(rng, np.random.Generator):
            return self.asarray(rng.standard_normal(shape), self.dtype_name(like), like=like), rng
        raise TypeError(
            f"rng must be an integer seed or a numpy.random.Generator on the {self.name} backend; "
            f"got {type(rng).__name__}"
        )

    def is_concrete(self, x: Any) -> bool:
        """Whether ``x`` holds values that can be inspected now (not a JAX tracer).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").is_concrete(np.zeros(1))
        True
        """
        return True

    def count_nonfinite(self, x: Any) -> int:
        """Number of NaN and infinite entries of ``x`` (a Python int).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").count_nonfinite(np.array([1.0, np.nan, np.inf]))
        2
        """
        return int(self.xp.sum(~self.xp.isfinite(x)))

    def is_tracer(self, x: Any) -> bool:
        """Whether ``x`` is an abstract value being traced (JAX under ``jit``/``grad``).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").is_tracer(np.zeros(1))
        False
        """
        return False

    def device(self, x: Any) -> Any:
        """The device ``x`` lives on, where the framework has several (PyTorch); else ``None``.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").device(np.zeros(1)) is None
        True
        """
        return None

    def compile(self, fn: Any) -> Any:
        """Return ``fn`` compiled for this backend (``jax.jit`` on JAX; unchanged elsewhere).

        Examples
        --------
        >>> get_ops("numpy").compile(len) is len
        True
        """
        return fn

    # --- iterative solvers (the gates' sort-free thresholds) -----------------------
    def stop_gradient(self, x: Any) -> Any:
        """``x`` cut from autograd: the same values, no gradient flows back through them.

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").stop_gradient(np.ones(2))
        array([1., 1.])
        """
        return x

    def any_true(self, mask: Any) -> Any:
        """Whether any entry of ``mask`` is true, as a scalar of this backend (a tracer under ``jax.jit``).

        Examples
        --------
        >>> import numpy as np
        >>> bool(get_ops("numpy").any_true(np.array([[False, True]])))
        True
        """
        return self.xp.any(mask)

    def while_loop(self, cond: Any, body: Any, state: Any, max_iterations: int) -> tuple[Any, int]:
        """Apply ``state = body(state)`` while ``cond(state)`` holds, at most ``max_iterations`` times.

        ``cond`` returns a scalar boolean array of this backend (e.g. from
        :meth:`any_true`).  Eager backends run a Python loop; JAX runs
        ``jax.lax.while_loop`` (traceable under ``jax.jit``, not
        reverse-differentiable: apply :meth:`stop_gradient` to its inputs).
        Returns the final state and the number of iterations run (a Python int,
        or a traced integer under ``jax.jit``).

        Examples
        --------
        >>> get_ops("numpy").while_loop(lambda s: s < 10, lambda s: 2 * s, 1, 100)
        (16, 4)
        """
        count = 0
        while count < max_iterations and bool(cond(state)):
            state = body(state)
            count += 1
        return state, count

    def is_compiling(self) -> bool:
        """Whether the call is being traced into a graph where a data-dependent Python loop would break it.

        True only under ``torch.compile`` (Dynamo); ``jax.jit`` traces
        :meth:`while_loop` natively, so it is False there.

        Examples
        --------
        >>> get_ops("numpy").is_compiling()
        False
        """
        return False

    # --- contraction --------------------------------------------------------------
    def contract(self, equation: str, operands: list[Any], optimize: str = "auto", batch: str | None = None) -> Any:
        """Contract ``operands`` along ``equation`` with the cached plan of their shapes.

        ``batch`` names the index of the rows, whose number may change from call
        to call: one plan then serves every number of rows (see
        :func:`tensormoe.contraction.get_plan`).

        Examples
        --------
        >>> import numpy as np
        >>> get_ops("numpy").contract("ab,bc->ac", [np.ones((2, 3)), np.ones((3, 4))]).shape
        (2, 4)
        >>> get_ops("numpy").contract("ab,bc->ac", [np.ones((5, 3)), np.ones((3, 4))], batch="a").shape
        (5, 4)
        """
        plan = get_plan(
            equation,
            *(tuple(o.shape) for o in operands),
            backend=self.name,
            dtype=self.dtype_name(operands[-1]),
            optimize=optimize,
            batch=batch,
        )
        if not plan.tuned:
            self._tune(plan, operands)
        program = plan.program  # the operands have the plan's shapes: no need for Plan.__call__'s checks
        if program is None:
            return plan.expression(*operands, backend=self.einsum_backend)
        return program(*operands, backend=self.einsum_backend)

    def _tune(self, plan: Any, operands: list[Any]) -> None:
        """Time the plan's candidate programs once on (stand-ins of) these operands."""
        plan.tune(*plan.stand_ins(operands, self._zeros), backend=self.einsum_backend)

    def _zeros(self, shape: tuple[int, ...], like: Any) -> Any:
        return self.zeros(shape, like)


class NumpyOps(Ops):
    name = "numpy"
    einsum_backend = "numpy"
    xp = np

    def is_array(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def dtype(self, name: str) -> Any:
        if name == "bfloat16":
            raise TypeError("dtype='bfloat16' is not supported on the numpy backend; use float32")
        return np.dtype(name)

    def asarray(self, x: Any, dtype: str | None = None, like: Any = None) -> Any:
        return np.asarray(x, dtype=None if dtype is None else self.dtype(dtype))

    def top_k(self, x: Any, k: int) -> tuple[Any, Any]:
        index = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        return np.take_along_axis(x, index, axis=-1), index

    def scatter_add_last(self, index: Any, values: Any, n: int) -> Any:
        out = np.zeros((*index.shape[:-1], n), dtype=values.dtype)
        np.add.at(out, (*np.indices(index.shape, sparse=True)[:-1], index), values)
        return out


class TorchOps(Ops):
    name = "pytorch"
    einsum_backend = "torch"

    def __init__(self) -> None:
        import torch

        self.xp = torch
        self._torch = torch
        register_array_type(torch.Tensor, "pytorch")

    def is_array(self, x: Any) -> bool:
        return isinstance(x, self._torch.Tensor)

    def dtype(self, name: str) -> Any:
        return getattr(self._torch, name)

    def asarray(self, x: Any, dtype: str | None = None, like: Any = None) -> Any:
        torch = self._torch
        device = like.device if like is not None and isinstance(like, torch.Tensor) else None
        if isinstance(x, torch.Tensor):
            out = x
            if device is not None and out.device != device:
                out = out.to(device)
        else:
            # np.asarray first so that foreign arrays (JAX, lists) convert; never
            # tl.tensor, which would detach a tensor from autograd.
            out = torch.as_tensor(np.asarray(x), device=device)
        if dtype is not None and out.dtype != self.dtype(dtype):
            out = out.to(self.dtype(dtype))
        return out

    def concat_ones(self, x: Any) -> Any:
        return self._torch.nn.functional.pad(x, (0, 1), value=1.0)  # one operation (cat needs a ones array)

    def max(self, x: Any, axis: int = -1) -> Any:
        return self._torch.amax(x, dim=axis, keepdim=True)

    def sum(self, x: Any, axis: int = -1) -> Any:
        return self._torch.sum(x, dim=axis, keepdim=True)

    def mean(self, x: Any, axis: int = -1) -> Any:
        return self._torch.mean(x, dim=axis, keepdim=True)

    def clip_min(self, x: Any, low: float) -> Any:
        return self._torch.clamp(x, min=low)

    def layer_norm(self, x: Any, eps: float) -> Any:
        return self._torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)

    def sort_descending(self, x: Any) -> Any:
        return self._torch.sort(x, dim=-1, descending=True).values

    def cumsum(self, x: Any) -> Any:
        return self._torch.cumsum(x, dim=-1)

    def arange_like(self, x: Any, start: int, stop: int) -> Any:
        return self._torch.arange(start, stop, dtype=x.dtype, device=x.device)

    def take_last(self, x: Any, index: Any) -> Any:
        return self._torch.take_along_dim(x, index.long(), dim=-1)

    def count_true(self, mask: Any) -> Any:
        return self._torch.sum(mask, dim=-1, keepdim=True)

    def where(self, condition: Any, x: Any, y: Any) -> Any:
        return self._torch.where(condition, x, y)

    def zeros(self, shape: tuple[int, ...], like: Any) -> Any:
        return self._torch.zeros(shape, dtype=like.dtype, device=like.device)

    def top_k(self, x: Any, k: int) -> tuple[Any, Any]:
        # a stable sort, not torch.topk, whose order among ties is unspecified
        values, index = self._torch.sort(x, dim=-1, descending=True, stable=True)
        return values[..., :k], index[..., :k]

    def gather(self, x: Any, index: tuple[Any, ...]) -> Any:
        return x[tuple(i.long() for i in index)]

    def scatter_add_last(self, index: Any, values: Any, n: int) -> Any:
        out = self.zeros((*index.shape[:-1], n), like=values)
        return out.scatter_add(-1, index.long(), values)

    def normal(self, rng: Any, shape: tuple[int, ...], like: Any) -> tuple[Any, Any]:
        if isinstance(rng, self._torch.Generator):
            draw = self._torch.randn(shape, generator=rng, dtype=like.dtype, device=rng.device)
            return draw.to(like.device), rng
        return super().normal(rng, shape, like)

    def contract(self, equation: str, operands: list[Any], optimize: str = "auto", batch: str | None = None) -> Any:
        if not self._torch.compiler.is_compiling():
            return super().contract(equation, operands, optimize, batch)
        # Under torch.compile the lowered program of a plan found before (any eager call of these
        # shapes, or of any batch size for a batch-free plan) is traced like hand-written code; the
        # plan search itself cannot run in a trace, so a contraction never planned goes to
        # torch.einsum, which plans its path with opt_einsum once, when tracing.
        program = cached_program(equation, operands, self.name, self.dtype_name(operands[-1]), optimize, batch,
                                 self.einsum_backend)
        if program is not None:
            return program(*operands, backend=self.einsum_backend)
        return self._torch.einsum(equation, *operands)

    def _tune(self, plan: Any, operands: list[Any]) -> None:
        cuda = operands[0].is_cuda
        with self._torch.no_grad():
            sync = (lambda _: self._torch.cuda.synchronize()) if cuda else None
            plan.tune(*plan.stand_ins(operands, self._zeros), backend=self.einsum_backend, sync=sync)

    def stop_gradient(self, x: Any) -> Any:
        return x.detach()

    def is_compiling(self) -> bool:
        return bool(self._torch.compiler.is_compiling())

    def device(self, x: Any) -> Any:
        return x.device

    def cast_like(self, x: Any, like: Any) -> Any:
        return x.to(like.dtype)

    def cast(self, x: Any, name: str) -> Any:
        return x.to(self.dtype(name))


class JaxOps(Ops):
    name = "jax"
    einsum_backend = "jax"

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        self.xp = jnp
        self._jax = jax
        register_array_type(jax.Array, "jax")

    def is_array(self, x: Any) -> bool:
        return isinstance(x, self._jax.Array)

    def dtype(self, name: str) -> Any:
        if name == "float64" and not self._jax.config.jax_enable_x64:
            raise TypeError(
                "dtype='float64' on the jax backend needs 64-bit mode, which is off "
                "(JAX would silently compute in float32); enable it with "
                "jax.config.update('jax_enable_x64', True) or use dtype='float32'"
            )
        return getattr(self.xp, name)

    def asarray(self, x: Any, dtype: str | None = None, like: Any = None) -> Any:
        if dtype is None:
            return self.xp.asarray(x)
        return self.xp.asarray(x, dtype=self.dtype(dtype))

    def top_k(self, x: Any, k: int) -> tuple[Any, Any]:
        # lax.top_k puts the lower index first among equal values
        return self._jax.lax.top_k(x, k)

    def scatter_add_last(self, index: Any, values: Any, n: int) -> Any:
        out = self.xp.zeros((*index.shape[:-1], n), dtype=values.dtype)
        return out.at[(*self.xp.indices(index.shape, sparse=True)[:-1], index)].add(values)

    def normal(self, rng: Any, shape: tuple[int, ...], like: Any) -> tuple[Any, Any]:
        if isinstance(rng, self._jax.Array):
            rng, key = self._jax.random.split(rng)
            return self._jax.random.normal(key, shape, dtype=like.dtype), rng
        return super().normal(rng, shape, like)

    def stop_gradient(self, x: Any) -> Any:
        return self._jax.lax.stop_gradient(x)

    def while_loop(self, cond: Any, body: Any, state: Any, max_iterations: int) -> tuple[Any, Any]:
        lax, jnp = self._jax.lax, self.xp

        def counted_cond(carry: Any) -> Any:
            return jnp.logical_and(carry[1] < max_iterations, cond(carry[0]))

        def counted_body(carry: Any) -> Any:
            return body(carry[0]), carry[1] + 1

        return lax.while_loop(counted_cond, counted_body, (state, jnp.asarray(0, dtype=jnp.int32)))

    def is_concrete(self, x: Any) -> bool:
        return not isinstance(x, self._jax.core.Tracer)

    def is_tracer(self, x: Any) -> bool:
        return isinstance(x, self._jax.core.Tracer)

    def _tune(self, plan: Any, operands: list[Any]) -> None:
        # XLA's speed differs between programs the cost model ranks alike (which side of
        # a product reads a transposed operand): compile each candidate and time it on
        # stand-ins of the operands' shapes and dtype, outside any trace that is running
        jax, jnp = self._jax, self.xp
        rng = np.random.default_rng(0)
        with jax.ensure_compile_time_eval():
            stand_ins = [jnp.asarray(rng.standard_normal(shape), dtype=o.dtype) for o, shape in zip(operands, plan.shapes)]
            plan.tune(
                *stand_ins,
                backend=self.einsum_backend,
                sync=lambda out: out.block_until_ready(),
                wrap=lambda program: jax.jit(functools.partial(program, backend=self.einsum_backend)),
            )

    def compile(self, fn: Any) -> Any:
        # eager JAX compiles every primitive for every new shape; one jit per
        # forward compiles once and runs as one program
        return self._jax.jit(fn)


_CLASSES = {"numpy": NumpyOps, "pytorch": TorchOps, "jax": JaxOps}


_INSTANCES: dict[str, Ops] = {}


def _ops(name: str) -> Ops:
    # a plain dict rather than functools.cache: torch.compile traces dict look-ups
    # but not through cache wrappers
    ops = _INSTANCES.get(name)
    if ops is None:
        load(name)
        ops = _INSTANCES.setdefault(name, _CLASSES[name]())
    return ops


def get_ops(name: str | None = None) -> Ops:
    """Return the :class:`Ops` of backend ``name`` (default: the current backend).

    Examples
    --------
    >>> get_ops("numpy").name
    'numpy'
    """
    return _ops(get_backend() if name is None else canonical_name(name, "name"))


def ops_for_array(x: Any) -> str | None:
    """Name the backend an array belongs to, without importing any framework.

    Returns ``None`` for objects that are not NumPy, PyTorch or JAX arrays.

    Examples
    --------
    >>> import numpy as np
    >>> ops_for_array(np.zeros(2))
    'numpy'
    >>> ops_for_array([1.0]) is None
    True
    """
    return backend_of(x)
