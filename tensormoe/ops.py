"""The few array operations tensormoe needs, one small class per framework.

Each class is created on first use of its backend, so no framework is imported
unless its backend is in use.  The math (gates, layers) is written once against
this interface; the classes only translate names (``axis``/``dim``,
``keepdims``/``keepdim``) and array creation (device, dtype).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .backend import _load, _normalise, get_backend

__all__ = ["Ops", "get_ops", "ops_for_array"]

_DTYPES = ("float16", "bfloat16", "float32", "float64")


class Ops:
    """Array operations of one backend (abstract).

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
        raise NotImplementedError

    def dtype(self, name: str) -> Any:
        raise NotImplementedError

    def dtype_name(self, x: Any) -> str:
        return str(x.dtype).replace("torch.", "")

    def asarray(self, x: Any, dtype: str | None = None, like: Any = None) -> Any:
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def concat_ones(self, x: Any) -> Any:
        """Append a column of ones on the last axis (the bias input)."""
        ones = self.xp.ones((*x.shape[:-1], 1), dtype=x.dtype)
        return self.xp.concatenate([x, ones], axis=-1)

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return self.xp.reshape(x, shape)

    # --- reductions and elementwise --------------------------------------------
    def max(self, x: Any, axis: int = -1) -> Any:
        return self.xp.max(x, axis=axis, keepdims=True)

    def sum(self, x: Any, axis: int = -1) -> Any:
        return self.xp.sum(x, axis=axis, keepdims=True)

    def mean(self, x: Any, axis: int = -1) -> Any:
        return self.xp.mean(x, axis=axis, keepdims=True)

    def exp(self, x: Any) -> Any:
        return self.xp.exp(x)

    def sqrt(self, x: Any) -> Any:
        return self.xp.sqrt(x)

    def clip_min(self, x: Any, low: float) -> Any:
        return self.xp.maximum(x, low)

    def relu(self, x: Any) -> Any:
        return self.clip_min(x, 0)

    def sort_descending(self, x: Any) -> Any:
        return -self.xp.sort(-x, axis=-1)

    def cumsum(self, x: Any) -> Any:
        return self.xp.cumsum(x, axis=-1)

    def arange_like(self, x: Any, start: int, stop: int) -> Any:
        return self.xp.arange(start, stop, dtype=x.dtype)

    def take_last(self, x: Any, index: Any) -> Any:
        """``x[..., index[..., 0]]`` keeping a trailing axis of size one."""
        return self.xp.take_along_axis(x, index, axis=-1)

    def count_true(self, mask: Any) -> Any:
        return self.xp.sum(mask, axis=-1, keepdims=True)

    def cast_like(self, x: Any, like: Any) -> Any:
        """``x`` converted to the dtype of ``like``."""
        return x.astype(like.dtype)

    def cast(self, x: Any, name: str) -> Any:
        """``x`` converted to the dtype named ``name``."""
        return x.astype(self.dtype(name))

    def is_finite_all(self, x: Any) -> bool:
        return bool(self.xp.all(self.xp.isfinite(x)))

    def count_nonfinite(self, x: Any) -> int:
        """Number of NaN and infinite entries of ``x`` (a Python int)."""
        return int(self.xp.sum(~self.xp.isfinite(x)))

    def is_tracer(self, x: Any) -> bool:
        """Whether ``x`` is an abstract value being traced (JAX under ``jit``/``grad``)."""
        return False

    def device(self, x: Any) -> Any:
        """The device ``x`` lives on, where the framework has several (PyTorch); else ``None``."""
        return None

    def compile(self, fn: Any) -> Any:
        """Return ``fn`` compiled for this backend (``jax.jit`` on JAX; unchanged elsewhere)."""
        return fn


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


class TorchOps(Ops):
    name = "pytorch"
    einsum_backend = "torch"

    def __init__(self) -> None:
        import torch

        self.xp = torch
        self._torch = torch

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

    def to_numpy(self, x: Any) -> np.ndarray:
        if x.dtype == self._torch.bfloat16:
            x = x.float()
        return x.detach().cpu().numpy()

    def concat_ones(self, x: Any) -> Any:
        ones = self._torch.ones((*x.shape[:-1], 1), dtype=x.dtype, device=x.device)
        return self._torch.cat([x, ones], dim=-1)

    def max(self, x: Any, axis: int = -1) -> Any:
        return self._torch.amax(x, dim=axis, keepdim=True)

    def sum(self, x: Any, axis: int = -1) -> Any:
        return self._torch.sum(x, dim=axis, keepdim=True)

    def mean(self, x: Any, axis: int = -1) -> Any:
        return self._torch.mean(x, dim=axis, keepdim=True)

    def clip_min(self, x: Any, low: float) -> Any:
        return self._torch.clamp(x, min=low)

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

    def to_numpy(self, x: Any) -> np.ndarray:
        if x.dtype == self.xp.bfloat16:
            x = x.astype(self.xp.float32)
        return np.asarray(x)

    def is_tracer(self, x: Any) -> bool:
        return isinstance(x, self._jax.core.Tracer)

    def compile(self, fn: Any) -> Any:
        # eager JAX compiles every primitive for every new shape; one jit per
        # forward compiles once and runs as one program
        return self._jax.jit(fn)


_CLASSES = {"numpy": NumpyOps, "pytorch": TorchOps, "jax": JaxOps}


@functools.cache
def _ops(name: str) -> Ops:
    _load(name)
    return _CLASSES[name]()


def get_ops(name: str | None = None) -> Ops:
    """Return the :class:`Ops` of backend ``name`` (default: the current backend).

    Examples
    --------
    >>> get_ops("numpy").name
    'numpy'
    """
    return _ops(get_backend() if name is None else _normalise(name, "name"))


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
    if isinstance(x, np.ndarray):
        return "numpy"
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        return "pytorch"
    if module in ("jax", "jaxlib"):
        return "jax"
    return None
