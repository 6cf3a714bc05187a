"""NumPy's array code: the array-API namespace of array-api-compat, stable top-k, ``np.add.at``."""

from __future__ import annotations

from typing import Any

import array_api_compat.numpy as _compat
import numpy as np

from . import _kernels
from .base import Ops, namespace

__all__ = ["NumpyOps"]


class NumpyOps(Ops):
    """The NumPy backend's operations (see :class:`tensormoe.frameworks.Ops`).

    Examples
    --------
    >>> NumpyOps().xp.sort(np.array([2.0, 1.0, 3.0]), descending=True, stable=False)
    array([3., 2., 1.])
    """

    name = "numpy"
    einsum_backend = "numpy"
    # array-api-compat's clip casts its bounds before calling np.clip: twice its time on a few thousand numbers
    xp = namespace(_compat, clip=lambda x, /, min=None, max=None: np.clip(x, min, max))
    fused_gates = True

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

    def sparse_gate(self, z: Any, gate: str) -> Any:
        return _kernels.numpy_sparse_gate(z, gate)

    def scatter_add_last(self, index: Any, values: Any, n: int) -> Any:
        out = np.zeros((*index.shape[:-1], n), dtype=values.dtype)
        np.add.at(out, (*np.indices(index.shape, sparse=True)[:-1], index), values)
        return out
