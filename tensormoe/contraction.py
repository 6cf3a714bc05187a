"""Compatibility path: :mod:`tensormoe.network.contraction` holds this code."""

from .network.contraction import (
    OPTIMIZERS,
    Plan,
    SEARCH_FLOPS,
    SEARCH_ROWS,
    cache_info,
    cached_program,
    check_optimizer,
    clear_cache,
    contract,
    execute,
    get_plan,
)

__all__ = [
    "OPTIMIZERS",
    "Plan",
    "SEARCH_FLOPS",
    "SEARCH_ROWS",
    "cache_info",
    "cached_program",
    "check_optimizer",
    "clear_cache",
    "contract",
    "execute",
    "get_plan",
]
