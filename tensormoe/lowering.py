"""Compatibility path: :mod:`tensormoe.network.lowering` holds this code."""

from .network.lowering import (
    Program,
    candidates,
    lower,
)

__all__ = [
    "Program",
    "candidates",
    "lower",
]
