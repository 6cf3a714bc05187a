"""Compatibility path: :mod:`tensormoe.tools.accounting` holds this code."""

from .tools.accounting import (  # noqa: F401
    Cost,
    bias_params,
    cost,
    data_parallel_bytes,
    factorization_cost,
    forward_plan,
    gate_flops,
    gate_params,
    linear_flops,
    linear_params,
    make_factorization,
    rank_parallel_bytes,
)

__all__ = [
    "Cost",
    "bias_params",
    "cost",
    "data_parallel_bytes",
    "factorization_cost",
    "forward_plan",
    "gate_flops",
    "gate_params",
    "linear_flops",
    "linear_params",
    "make_factorization",
    "rank_parallel_bytes",
]
