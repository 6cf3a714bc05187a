"""Compatibility path: the framework code now lives in :mod:`tensormoe.frameworks`."""

from ._array import backend_of as ops_for_array
from .frameworks import Ops, get_ops

__all__ = ["Ops", "get_ops", "ops_for_array"]
