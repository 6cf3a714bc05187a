"""Compatibility path: :mod:`tensormoe.routing` holds this code (routers, routings, losses)."""

from .routing.routers import ROUTERS
from .routing import (
    DenseRouter,
    ExpertChoiceRouter,
    Router,
    Routing,
    SoftRouter,
    TopKRouter,
    aux_loss,
    get_router,
    group_shape,
    resolve_routers,
)

__all__ = [
    "ROUTERS",
    "DenseRouter",
    "ExpertChoiceRouter",
    "Router",
    "Routing",
    "SoftRouter",
    "TopKRouter",
    "aux_loss",
    "get_router",
    "group_shape",
    "resolve_routers",
]
