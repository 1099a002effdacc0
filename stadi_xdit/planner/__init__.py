"""STADI planner: heterogeneity-aware bands (spatial) and strides (temporal) for patch-parallel DiTs.

Pure standard library (no torch/numpy), so plans can be computed, inspected and tested anywhere.
See docs/method.md for the method.
"""

from .cost import LatencyBreakdown, predict_latency
from .plan_types import MODES, Plan, Prediction, RankPlan
from .planning import plan, plan_warmup

__all__ = [
    "MODES",
    "LatencyBreakdown",
    "Plan",
    "Prediction",
    "RankPlan",
    "plan",
    "plan_warmup",
    "predict_latency",
]
