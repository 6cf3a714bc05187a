"""Compatibility path: :mod:`tensormoe.tools.numerics` holds this code."""

from .tools.numerics import (  # noqa: F401
    UNIT_ROUNDOFF,
    forward_error_bound,
    rounding_count,
    unit_roundoff,
)

__all__ = [
    "UNIT_ROUNDOFF",
    "forward_error_bound",
    "rounding_count",
    "unit_roundoff",
]
