"""What an array is, whatever its framework: its backend, its dtype name, its values in NumPy.

The leaf of the package: it imports NumPy only, and recognises PyTorch and JAX
arrays without importing either (by their classes once the framework's code in
:mod:`tensormoe.frameworks` is loaded, else by the name of their module).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["backend_of", "dtype_name", "register_array_type", "to_numpy"]

#: (array class, backend name) of the frameworks loaded so far: isinstance is traceable by torch.compile
_ARRAY_TYPES: list[tuple[type, str]] = []
#: dtype object -> name (NumPy computes ``dtype.name`` in Python on every access)
_NAMES: dict[Any, str] = {}


def register_array_type(cls: type, backend: str) -> None:
    """Recognise instances of ``cls`` as arrays of ``backend`` (called when a framework's code is loaded)."""
    if (cls, backend) not in _ARRAY_TYPES:
        _ARRAY_TYPES.append((cls, backend))


def backend_of(x: Any) -> str | None:
    """Name the backend an array belongs to, without importing any framework; ``None`` for non-arrays.

    Examples
    --------
    >>> backend_of(np.zeros(2)), backend_of([1.0])
    ('numpy', None)
    """
    if isinstance(x, np.ndarray):
        return "numpy"
    for cls, name in _ARRAY_TYPES:
        if isinstance(x, cls):
            return name
    module = type(x).__module__
    if module == "torch" or module.startswith("torch."):
        return "pytorch"
    if module.startswith(("jax.", "jaxlib.")) or module in ("jax", "jaxlib"):
        return "jax"
    return None


def dtype_name(x: Any) -> str:
    """The dtype name of an array of any backend, or of a dtype object: ``"float32"``, ``"bfloat16"``, ...

    Examples
    --------
    >>> dtype_name(np.zeros(2, dtype="float32")), dtype_name(np.dtype("int64"))
    ('float32', 'int64')
    """
    dtype = getattr(x, "dtype", x)
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = str(dtype).removeprefix("torch.") if type(dtype).__module__ == "torch" else dtype.name
    return name


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy array with the values of ``x`` (an array of any backend, or a nested list), cut from autograd.

    Half-precision ``bfloat16`` arrays of PyTorch and JAX come back as ``float32``
    (exactly: every bfloat16 value is a float32 value).

    Examples
    --------
    >>> to_numpy([1, 2])
    array([1, 2])
    """
    backend = backend_of(x)
    if backend == "pytorch":
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.cpu().numpy()
    if backend == "jax" and dtype_name(x) == "bfloat16":
        x = x.astype("float32")
    return np.asarray(x)
