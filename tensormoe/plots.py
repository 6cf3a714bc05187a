"""Compatibility path: :mod:`tensormoe.tools.plots` holds this code."""

from .tools.plots import (  # noqa: F401
    ablation_curve,
    class_heatmap,
    top_experts,
    usage_histogram,
)

__all__ = [
    "ablation_curve",
    "class_heatmap",
    "top_experts",
    "usage_histogram",
]
