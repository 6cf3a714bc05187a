"""The fused CPU kernel of the sparse gates (``_sparse_gates.c``): loading it, its codes, its threads.

The C extension is optional (built by ``pip install``; absent where no compiler
was found): :data:`KERNEL` is ``None`` then, and :mod:`tensormoe.routing.gates` uses its
array methods.  NumPy calls it here; PyTorch through the custom operators that
:mod:`tensormoe.frameworks.torch` registers.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

try:
    from . import _sparse_gates as KERNEL
except ImportError:  # not built: the gates use their array methods
    KERNEL = None

#: The kernel's gate codes
GATES = {"entmax15": 0, "sparsemax": 1}
#: dtypes the kernel computes in (its dtype codes); other dtypes are cast to float32 by the gates
DTYPES = {"float32": 0, "float64": 1}
#: Logits per thread below which a second thread costs more than it saves (thread start-up, measured)
ELEMENTS_PER_THREAD = 2**16


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads(elements: int, available: int) -> int:
    """Threads for ``elements`` logits when ``available`` cores may run."""
    return max(1, min(available, elements // ELEMENTS_PER_THREAD))


def numpy_sparse_gate(z: np.ndarray, gate: str) -> np.ndarray:
    """``gate`` of the float32 or float64 NumPy array ``z`` over its last axis (threads: the usable CPUs)."""
    z = np.ascontiguousarray(z)
    out = np.empty_like(z)
    n = z.shape[-1]
    if z.size:
        KERNEL.forward(GATES[gate], DTYPES[z.dtype.name], z.__array_interface__["data"][0],
                       out.__array_interface__["data"][0], z.size // n, n, threads(z.size, _cpu_count()))
    return out
