"""Theory of quantized training, as plain functions (Python and numpy only, no torch): the
convergence terms of "Analysis of Quantized Models" (ICLR 2019) in `bounds`, and the
bytes/time/variance planner behind `distq plan` in `planner`."""

from distq.theory.bounds import (
    clip_bias_per_element,
    grad_blowup_clipped,
    grad_blowup_unclipped,
    lemma3_variance_bound,
    level_spacing,
    weight_error_floor,
)
from distq.theory.planner import Estimate, Plan, parse_bandwidth, plan

__all__ = [
    "Estimate",
    "Plan",
    "clip_bias_per_element",
    "grad_blowup_clipped",
    "grad_blowup_unclipped",
    "lemma3_variance_bound",
    "level_spacing",
    "parse_bandwidth",
    "plan",
    "weight_error_floor",
]
