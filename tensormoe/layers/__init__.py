"""The layers: configuration, parameters, the forward functions and the layer classes.

* :mod:`~tensormoe.layers.config`: the ``expert_dims`` parser and
  :class:`~tensormoe.layers.config.LayerSpec`, the structure the forward needs;
* :mod:`~tensormoe.layers.params`: parameter shapes (from the factorization's
  network and the routers), drawing, conversion between backends;
* :mod:`~tensormoe.layers.forward`: the forward as pure functions;
* :mod:`~tensormoe.layers.accounting`: parameters, FLOPs, memory and
  communication of a layer, from its network (what :meth:`MMoE.cost` reports);
* :mod:`~tensormoe.layers.mmoe`: :class:`MMoE` and its four formats, built by
  name (:func:`make_layer`) or from a configuration (:func:`layer_from_config`).

Examples
--------
>>> import numpy as np
>>> layer = make_layer("tr", 4, 3, [5], 2)
>>> layer(np.ones((2, 4), dtype="float32")).shape
(2, 3)
"""

from .config import LayerSpec, parse_expert_dims
from .mmoe import LAYERS, CPMMoE, MMoE, TRMMoE, TTMMoE, TuckerMMoE, layer_from_config, make_layer
from .params import convert_params

__all__ = [
    "CPMMoE",
    "LayerSpec",
    "MMoE",
    "TRMMoE",
    "TTMMoE",
    "TuckerMMoE",
    "convert_params",
    "layer_from_config",
    "make_layer",
    "parse_expert_dims",
]
