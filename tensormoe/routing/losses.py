"""Auxiliary losses that train routers: load balancing (Switch, GShard) and the router z-loss (ST-MoE)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .routing import Routing

__all__ = ["aux_loss"]


def aux_loss(routings: Routing | Sequence[Routing], load_balancing: float = 1e-2, z: float = 1e-3) -> Any:
    """Weighted sum of the auxiliary losses of one or more levels.

    ``load_balancing * sum_h lb_h + z * sum_h z_h`` (defaults: Switch's
    ``1e-2`` and ST-MoE's ``1e-3``); add it to the task loss.

    Examples
    --------
    >>> import numpy as np
    >>> from tensormoe.routing import DenseRouter
    >>> r = DenseRouter("softmax", norm=None)({"gate": np.zeros((3, 4))}, np.ones((2, 3)))
    >>> round(float(aux_loss([r, r])), 6)  # 2 * (0.01 * 1 + 0.001 * log(4)**2)
    0.023844
    """
    if isinstance(routings, Routing):
        routings = [routings]
    total = 0.0
    for h, r in enumerate(routings):
        if r.load_balancing_loss is None or r.z_loss is None:
            raise ValueError(
                f"routings[{h}] carries no auxiliary losses; get it from Router.__call__, MMoE.route or "
                "MMoE.apply(..., return_routing=True)"
            )
        total = total + load_balancing * r.load_balancing_loss + z * r.z_loss
    return total
