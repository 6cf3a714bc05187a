"""PyTorch's array code: autograd-keeping conversion, devices, stable top-k, ``scatter_add``, ``torch.compile``.

Imported when the PyTorch backend is first used (it imports PyTorch).  Where the
fused gate kernel is built, it is registered here as the custom operators
``tensormoe::sparse_gate`` and ``tensormoe::sparse_gate_backward`` (with a fake
implementation and the closed-form backward), so that it runs in eager mode and
inside ``torch.compile(fullgraph=True)`` graphs alike.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.torch as _compat
import numpy as np
import torch

from .._array import register_array_type
from . import _kernels
from .base import Ops, namespace

__all__ = ["TorchOps"]

register_array_type(torch.Tensor, "pytorch")


def _cumulative_sum(x: Any, /, *, axis: int | None = None, dtype: Any = None, include_initial: bool = False) -> Any:
    # array-api-compat's looks its namespace up through an lru_cache, which torch.compile warns about
    if include_initial or axis is None:
        return _compat.cumulative_sum(x, axis=axis, dtype=dtype, include_initial=include_initial)
    return torch.cumsum(x, dim=axis, dtype=dtype)


def _kernel(z: torch.Tensor, gate: int) -> torch.Tensor:
    z = z.contiguous()
    out = torch.empty_like(z)
    n = z.shape[-1]
    if z.numel():
        _kernels.KERNEL.forward(gate, _kernels.DTYPES[str(z.dtype)[6:]], z.data_ptr(), out.data_ptr(), z.numel() // n,
                                n, _kernels.threads(z.numel(), torch.get_num_threads()))
    return out


def _kernel_backward(p: torch.Tensor, dy: torch.Tensor, gate: int) -> torch.Tensor:
    p, dy = p.contiguous(), dy.contiguous()
    dz = torch.empty_like(p)
    n = p.shape[-1]
    if p.numel():
        _kernels.KERNEL.backward(gate, _kernels.DTYPES[str(p.dtype)[6:]], p.data_ptr(), dy.data_ptr(), dz.data_ptr(),
                                 p.numel() // n, n, _kernels.threads(p.numel(), torch.get_num_threads()))
    return dz


def _differentiable_backward(p: torch.Tensor, grad: torch.Tensor, gate: int) -> torch.Tensor:
    """The vector-Jacobian product in tensor operations (for create_graph=True)."""
    s = p.sqrt() if gate == _kernels.GATES["entmax15"] else (p > 0).to(p.dtype)
    q = grad * s
    return q - s * (q.sum(-1, keepdim=True) / s.sum(-1, keepdim=True))


class _SparseGate(torch.autograd.Function):
    """The kernel in eager mode: its dispatch costs less than the custom operator's on a few rows."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, gate: int) -> torch.Tensor:
        out = _kernel(z, gate)
        ctx.gate = gate
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (p,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _differentiable_backward(p, grad, ctx.gate), None
        return _kernel_backward(p, grad, ctx.gate), None


def _register_operators() -> Any:
    """``tensormoe::sparse_gate`` (+ fake, + autograd) and its backward; returns the forward operator."""
    forward = torch.library.custom_op("tensormoe::sparse_gate", _kernel, mutates_args=(),
                                      schema="(Tensor z, int gate) -> Tensor")
    backward = torch.library.custom_op("tensormoe::sparse_gate_backward", _kernel_backward, mutates_args=(),
                                       schema="(Tensor p, Tensor dy, int gate) -> Tensor")
    forward.register_fake(lambda z, gate: torch.empty_like(z, memory_format=torch.contiguous_format))
    backward.register_fake(lambda p, dy, gate: torch.empty_like(p, memory_format=torch.contiguous_format))

    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.gate = inputs[1]
        ctx.save_for_backward(output)

    def vjp(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (p,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _differentiable_backward(p, grad, ctx.gate), None
        return backward(p, grad, ctx.gate), None

    forward.register_autograd(vjp, setup_context=setup_context)
    return forward


_SPARSE_GATE_OP = _register_operators() if _kernels.KERNEL is not None else None


class TorchOps(Ops):
    """The PyTorch backend's operations (see :class:`tensormoe.frameworks.Ops`).

    Examples
    --------
    >>> ops = TorchOps()
    >>> ops.asarray([1.0, 2.0], "float16").dtype, ops.xp.cumulative_sum(torch.ones(3), axis=-1).tolist()
    (torch.float16, [1.0, 2.0, 3.0])
    """

    name = "pytorch"
    einsum_backend = "torch"
    xp = namespace(_compat, cumulative_sum=_cumulative_sum)
    fused_gates = True

    def is_array(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def dtype(self, name: str) -> Any:
        return getattr(torch, name)

    def asarray(self, x: Any, dtype: str | None = None, like: Any = None) -> Any:
        device = like.device if isinstance(like, torch.Tensor) else None
        if isinstance(x, torch.Tensor):
            out = x
            if device is not None and out.device != device:
                out = out.to(device)
        else:
            # np.asarray first so that foreign arrays (JAX, lists) convert; never tl.tensor,
            # which would detach a tensor from autograd
            out = torch.as_tensor(np.asarray(x), device=device)
        if dtype is not None and out.dtype != self.dtype(dtype):
            out = out.to(self.dtype(dtype))
        return out

    def device(self, x: Any) -> Any:
        return x.device

    def concat_ones(self, x: Any) -> Any:
        return torch.nn.functional.pad(x, (0, 1), value=1.0)  # one operation (cat needs an array of ones)

    def layer_norm(self, x: Any, eps: float) -> Any:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)

    def gelu(self, x: Any) -> Any:
        return torch.nn.functional.gelu(x)

    def top_k(self, x: Any, k: int) -> tuple[Any, Any]:
        n = x.shape[-1]
        if 4 * k > n:
            # a stable sort, not torch.topk, whose order among ties is unspecified
            values, index = torch.sort(x, dim=-1, descending=True, stable=True)
            return values[..., :k], index[..., :k]
        # few of many: torch.topk finds the k largest (a full sort of every row costs far more: PyTorch's CPU
        # sort is slow); its choice among values tied at the k-th is unspecified, so ties there go to the
        # lower indices below
        top, index = torch.topk(x, k + 1, dim=-1)
        kth = top[..., k - 1:k]
        if not torch.compiler.is_compiling() and bool((top[..., k] < top[..., k - 1]).all()):
            # eager, and every row's k-th value beats the rest: topk's set is the right one, and only the
            # order among equal values in it needs settling (by index)
            index = torch.sort(index[..., :k], dim=-1).values
            values, order = torch.sort(torch.gather(x, -1, index), dim=-1, descending=True, stable=True)
            return values, torch.gather(index, -1, order)
        above, tied = x > kth, x == kth
        room = k - above.sum(dim=-1, keepdim=True)
        chosen = above | (tied & (torch.cumsum(tied, dim=-1, dtype=torch.int32) <= room))  # k per row of numbers
        position = torch.arange(n, 0, -1, dtype=torch.int32, device=x.device)  # n - index: largest at the lowest index
        index = torch.topk(torch.where(chosen, position, 0), k, dim=-1).indices  # ascending index
        values, order = torch.sort(torch.gather(x, -1, index), dim=-1, descending=True, stable=True)
        return values, torch.gather(index, -1, order)

    def gather(self, x: Any, index: tuple[Any, ...]) -> Any:
        return x[tuple(i.long() for i in index)]

    def scatter_add_last(self, index: Any, values: Any, n: int) -> Any:
        out = torch.zeros((*index.shape[:-1], n), dtype=values.dtype, device=values.device)
        return out.scatter_add(-1, index.long(), values)

    def normal(self, rng: Any, shape: tuple[int, ...], like: Any) -> tuple[Any, Any]:
        if isinstance(rng, torch.Generator):
            draw = torch.randn(shape, generator=rng, dtype=like.dtype, device=rng.device)
            return draw.to(like.device), rng
        return super().normal(rng, shape, like)

    def uniform(self, rng: Any, shape: tuple[int, ...], like: Any) -> tuple[Any, Any]:
        if isinstance(rng, torch.Generator):
            draw = torch.rand(shape, generator=rng, dtype=like.dtype, device=rng.device)
            return draw.to(like.device), rng
        return super().uniform(rng, shape, like)

    def sparse_gate(self, z: Any, gate: str) -> Any:
        code = _kernels.GATES[gate]
        if torch.compiler.is_compiling():
            return _SPARSE_GATE_OP(z, code)
        if z.requires_grad and torch.is_grad_enabled():
            return _SparseGate.apply(z, code)
        return _kernel(z, code)

    def stop_gradient(self, x: Any) -> Any:
        return x.detach()

    def is_compiling(self) -> bool:
        return bool(torch.compiler.is_compiling())

    def tune(self, plan: Any, operands: list[Any]) -> None:
        sync = (lambda _: torch.cuda.synchronize()) if operands[0].is_cuda else None
        with torch.no_grad():
            plan.tune(*plan.stand_ins(operands, self._zeros), backend=self.einsum_backend, sync=sync)
