"""Soft MoE slots (Puigcerver et al. 2024): tokens mixed into slots, slot outputs mixed back."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..frameworks import Ops
from .routing import Routing

__all__: list[str] = []


def soft_slots(ops: Ops, routing: Routing, x: Any) -> Any:
    """The slot inputs ``[G, S, I]`` of a grouped Soft MoE routing: ``dispatch^T @ x``."""
    return ops.xp.matrix_transpose(routing.dispatch) @ x


def soft_combine(ops: Ops, routing: Routing, y_slots: Any) -> Any:
    """Token outputs ``[G, T, O]`` from slot outputs ``[G, S, O]``: ``combine @ y``."""
    return routing.weights @ y_slots


def slot_experts(ops: Ops, n_groups: int, n_slots: int, slots_per_expert: int, like: Any) -> Any:
    """Expert index ``[G * S, 1]`` of every slot row (slot ``s`` belongs to expert ``s // p``)."""
    index = np.tile(np.arange(n_slots) // slots_per_expert, n_groups).reshape(-1, 1)
    return ops.asarray(index, like=like)
