"""Compatibility path: :mod:`tensormoe.routing.gates` holds this code."""

from .routing.gates import ACTIVATIONS, KERNEL_AVAILABLE, METHODS, NORMS, entmax15, layer_norm, softmax, sparsemax

__all__ = ["ACTIVATIONS", "KERNEL_AVAILABLE", "METHODS", "NORMS", "entmax15", "layer_norm", "sparsemax", "softmax"]
