"""Compatibility path: :mod:`tensormoe.tools.ranks` holds this code."""

from .tools.ranks import (  # noqa: F401
    KINDS,
    Match,
    match_rank,
    match_ranks,
    minimum_params,
    resolve_budget,
)

__all__ = [
    "KINDS",
    "Match",
    "match_rank",
    "match_ranks",
    "minimum_params",
    "resolve_budget",
]
