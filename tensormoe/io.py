"""Compatibility path: :mod:`tensormoe.tools.io` holds this code."""

from .tools.io import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    layer_from_file,
    load,
    read_config,
    save,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "load",
    "layer_from_file",
    "read_config",
    "save",
]
