"""Compatibility path: :mod:`tensormoe.network.factorizations` holds this code."""

from .network.factorizations import (
    CP,
    TR,
    TT,
    Factorization,
    Tucker,
    FACTORIZATIONS,
    OverparameterizedWarning,
)

__all__ = [
    "CP",
    "TR",
    "TT",
    "Factorization",
    "Tucker",
    "FACTORIZATIONS",
    "OverparameterizedWarning",
]
