"""Compatibility path: :mod:`tensormoe.tools.analysis` holds this code."""

from .tools.analysis import (  # noqa: F401
    AblationCurve,
    AblationResult,
    EditReport,
    ExpertUsage,
    MODES,
    ablation_curve,
    ablation_effects,
    add_rank_one,
    class_accuracy,
    edit_expert,
    expert_usage,
    intervene,
    intervened_coefficients,
    polysemanticity,
    scale_coefficients,
    scale_expert,
)

__all__ = [
    "MODES",
    "AblationCurve",
    "AblationResult",
    "EditReport",
    "ExpertUsage",
    "ablation_curve",
    "ablation_effects",
    "add_rank_one",
    "class_accuracy",
    "edit_expert",
    "expert_usage",
    "intervene",
    "intervened_coefficients",
    "polysemanticity",
    "scale_coefficients",
    "scale_expert",
]
