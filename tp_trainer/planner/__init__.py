"""Shard planner: model -> :class:`Plan` (pure), and the function that applies a plan."""

from .apply import apply_tensor_parallel
from .plan import AttentionPatch, Plan, PlanEntry, Style
from .planner import PlanError, plan_tensor_parallel

__all__ = ["AttentionPatch", "Plan", "PlanEntry", "PlanError", "Style", "apply_tensor_parallel", "plan_tensor_parallel"]
