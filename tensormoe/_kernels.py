"""The fused CPU kernel of the sparse gates (``tensormoe/_sparse_gates.c``) on NumPy and PyTorch arrays.

The C extension is optional (built by ``pip install``; absent where no compiler
was found): :data:`KERNEL` is ``None`` then, and :mod:`tensormoe.gates` uses its
array methods.  On PyTorch the kernel is registered as the custom operators
``tensormoe::sparse_gate`` and ``tensormoe::sparse_gate_backward`` (with a fake
implementation and the closed-form backward), so it runs in eager mode and
inside ``torch.compile(fullgraph=True)`` graphs alike.  Nothing here imports
PyTorch until a PyTorch array reaches ``torch_sparse_gate``.
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


def _threads(elements: int, available: int) -> int:
    return max(1, min(available, elements // ELEMENTS_PER_THREAD))


def numpy_sparse_gate(z: np.ndarray, gate: str) -> np.ndarray:
    """``gate`` of the float32 or float64 NumPy array ``z`` over its last axis (threads: the usable CPUs)."""
    z = np.ascontiguousarray(z)
    out = np.empty_like(z)
    n = z.shape[-1]
    if z.size:
        KERNEL.forward(GATES[gate], DTYPES[z.dtype.name], z.__array_interface__["data"][0],
                       out.__array_interface__["data"][0], z.size // n, n, _threads(z.size, _cpu_count()))
    return out


#: PyTorch's pieces, made on first use: the plain forward and backward, the autograd.Function, the custom op
_TORCH: dict[str, Any] = {}


def torch_sparse_gate(z: Any, gate: str) -> Any:
    """``gate`` of the float32 or float64 CPU tensor ``z``, differentiable.

    Under ``torch.compile`` this is the custom operator ``tensormoe::sparse_gate``;
    in eager mode the same kernels are called directly (an ``autograd.Function``
    when a gradient is needed): the custom operator's dispatch costs more than the
    kernel itself on a few rows.
    """
    if not _TORCH:
        _setup_torch()
    torch = _TORCH["torch"]
    if torch.compiler.is_compiling():
        return _TORCH["op"](z, GATES[gate])
    if z.requires_grad and torch.is_grad_enabled():
        return _TORCH["function"].apply(z, GATES[gate])
    return _TORCH["forward"](z, GATES[gate])


def _setup_torch() -> None:
    """Make the PyTorch pieces; register ``tensormoe::sparse_gate`` (+ fake, + autograd) and its backward."""
    import torch

    def run(z: torch.Tensor, gate: int) -> torch.Tensor:
        z = z.contiguous()
        out = torch.empty_like(z)
        n = z.shape[-1]
        if z.numel():
            KERNEL.forward(gate, DTYPES[str(z.dtype)[6:]], z.data_ptr(), out.data_ptr(), z.numel() // n, n,
                           _threads(z.numel(), torch.get_num_threads()))
        return out

    def run_backward(p: torch.Tensor, dy: torch.Tensor, gate: int) -> torch.Tensor:
        p, dy = p.contiguous(), dy.contiguous()
        dz = torch.empty_like(p)
        n = p.shape[-1]
        if p.numel():
            KERNEL.backward(gate, DTYPES[str(p.dtype)[6:]], p.data_ptr(), dy.data_ptr(), dz.data_ptr(),
                            p.numel() // n, n, _threads(p.numel(), torch.get_num_threads()))
        return dz

    def differentiable_backward(p: torch.Tensor, grad: torch.Tensor, gate: int) -> torch.Tensor:
        """The vector-Jacobian product in tensor operations (for create_graph=True)."""
        s = p.sqrt() if gate == GATES["entmax15"] else (p > 0).to(p.dtype)
        q = grad * s
        return q - s * (q.sum(-1, keepdim=True) / s.sum(-1, keepdim=True))

    class SparseGate(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, z: torch.Tensor, gate: int) -> torch.Tensor:
            out = run(z, gate)
            ctx.gate = gate
            ctx.save_for_backward(out)
            return out

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            (p,) = ctx.saved_tensors
            if torch.is_grad_enabled():
                return differentiable_backward(p, grad, ctx.gate), None
            return run_backward(p, grad, ctx.gate), None

    forward = torch.library.custom_op("tensormoe::sparse_gate", run, mutates_args=(),
                                      schema="(Tensor z, int gate) -> Tensor")
    backward = torch.library.custom_op("tensormoe::sparse_gate_backward", run_backward, mutates_args=(),
                                       schema="(Tensor p, Tensor dy, int gate) -> Tensor")
    forward.register_fake(lambda z, gate: torch.empty_like(z, memory_format=torch.contiguous_format))
    backward.register_fake(lambda p, dy, gate: torch.empty_like(p, memory_format=torch.contiguous_format))

    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.gate = inputs[1]
        ctx.save_for_backward(output)

    def vjp(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (p,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return differentiable_backward(p, grad, ctx.gate), None
        return backward(p, grad, ctx.gate), None

    forward.register_autograd(vjp, setup_context=setup_context)
    _TORCH.update(torch=torch, forward=run, function=SparseGate, op=forward)
