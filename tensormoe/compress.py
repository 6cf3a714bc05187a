"""Compatibility path: :mod:`tensormoe.tools.compress` holds this code."""

from .tools.compress import (  # noqa: F401
    Compressed,
    from_dense,
    from_linear,
)

__all__ = [
    "Compressed",
    "from_dense",
    "from_linear",
]
