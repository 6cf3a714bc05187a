"""Compatibility path: :mod:`tensormoe.tools.cli` holds this code."""

from .tools.cli import (  # noqa: F401
    main,
)

__all__ = [
    "main",
]
