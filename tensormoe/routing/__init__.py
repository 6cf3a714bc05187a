"""Routing: which experts each input uses, and with what weight.

* :mod:`~tensormoe.routing.gates`: gate activations (softmax, 1.5-entmax,
  sparsemax) and the logit normalisation;
* :mod:`~tensormoe.routing.batchnorm`: batch normalisation of the logits with
  running statistics (the reference implementation's default);
* :mod:`~tensormoe.routing.routers`: the routers of one expert level (dense,
  top-k with capacity and second-expert policies, expert choice, Soft MoE), the
  product-key router of two levels, and the registry of router names;
* :mod:`~tensormoe.routing.routing`: the :class:`Routing` a router returns, and
  how tokens are grouped;
* :mod:`~tensormoe.routing.levels`: routing across a layer's expert levels, the
  rows and weights the experts process, training noise and routing checks;
* :mod:`~tensormoe.routing.slots`: Soft MoE slots;
* :mod:`~tensormoe.routing.losses`: the auxiliary losses that train routers.

Examples
--------
>>> import numpy as np
>>> r = get_router("top2")(
...     {"gate": np.eye(3), "gate_noise": np.zeros((3, 3))}, np.array([[0.0, 2.0, 1.0]]))
>>> r.indices.tolist()
[[1, 2]]
"""

from .batchnorm import BatchNormState, batch_norm, batch_norm_state, gate_coefficients
from .gates import entmax15, layer_norm, softmax, sparsemax
from .levels import (
    Dispatch,
    check_routing,
    combine,
    dispatch,
    joint_levels,
    level_params,
    pass_through,
    route,
    training_noise,
)
from .losses import aux_loss
from .routers import (
    DenseRouter,
    ExpertChoiceRouter,
    ProductKeyRouter,
    Router,
    SoftRouter,
    TopKRouter,
    get_router,
    resolve_routers,
)
from .routing import Routing, group_shape, pair_to_dense

__all__ = [
    "BatchNormState",
    "DenseRouter",
    "Dispatch",
    "ExpertChoiceRouter",
    "ProductKeyRouter",
    "Router",
    "Routing",
    "SoftRouter",
    "TopKRouter",
    "aux_loss",
    "batch_norm",
    "batch_norm_state",
    "check_routing",
    "combine",
    "dispatch",
    "entmax15",
    "gate_coefficients",
    "get_router",
    "group_shape",
    "joint_levels",
    "layer_norm",
    "level_params",
    "pair_to_dense",
    "pass_through",
    "resolve_routers",
    "route",
    "softmax",
    "sparsemax",
    "training_noise",
]
