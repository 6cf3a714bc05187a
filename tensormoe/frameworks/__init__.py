"""The code that differs between NumPy, PyTorch and JAX: one small module per framework.

The gates, routers and layers are written once, with the framework's array-API
namespace ``ops.xp`` (array-api-compat's NumPy and PyTorch namespaces,
``jax.numpy``).  An :class:`Ops` holds that namespace and the operations no
standard spells the same way on every framework (:mod:`tensormoe.frameworks.base`);
:mod:`~tensormoe.frameworks.numpy`, :mod:`~tensormoe.frameworks.torch` and
:mod:`~tensormoe.frameworks.jax` hold each framework's code.  A framework's
module, and the framework itself, are imported when its backend is first used.

Examples
--------
>>> import numpy as np
>>> ops = get_ops("numpy")
>>> ops.xp.sum(ops.asarray([[1.0, 2.0]]), axis=-1, keepdims=True)
array([[3.]])
"""

from __future__ import annotations

import importlib

from ..backend import canonical_name, get_backend, load
from . import _kernels
from .base import Ops

__all__ = ["Ops", "get_ops", "kernel_built"]

#: The module of each backend's code, and its class
_CODE = {"numpy": ("numpy", "NumpyOps"), "pytorch": ("torch", "TorchOps"), "jax": ("jax", "JaxOps")}
# a plain dict rather than functools.cache: torch.compile traces dict look-ups, not cache wrappers
_INSTANCES: dict[str, Ops] = {}


def _ops(name: str) -> Ops:
    ops = _INSTANCES.get(name)
    if ops is None:
        load(name)
        module, cls = _CODE[name]
        ops = _INSTANCES.setdefault(name, getattr(importlib.import_module(f"{__name__}.{module}"), cls)())
    return ops


def get_ops(name: str | None = None) -> Ops:
    """The :class:`Ops` of backend ``name`` (default: the current backend).

    Examples
    --------
    >>> get_ops("numpy").name
    'numpy'
    """
    return _ops(get_backend() if name is None else canonical_name(name, "name"))


def kernel_built() -> bool:
    """Whether the fused C kernel of the sparse gates (the extension ``tensormoe.frameworks._sparse_gates``) is built.

    Examples
    --------
    >>> isinstance(kernel_built(), bool)
    True
    """
    return _kernels.KERNEL is not None
