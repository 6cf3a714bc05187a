"""Compatibility path: :mod:`tensormoe.layers` holds this code."""

from .layers.mmoe import LAYERS, CPMMoE, MMoE, TRMMoE, TTMMoE, TuckerMMoE, layer_from_config, make_layer
from .layers.params import convert_params

__all__ = [
    "CPMMoE",
    "LAYERS",
    "MMoE",
    "TRMMoE",
    "TTMMoE",
    "TuckerMMoE",
    "convert_params",
    "layer_from_config",
    "make_layer",
]
