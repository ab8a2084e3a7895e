"""Theory of quantized training, as plain functions (Python and numpy only, no torch): the
convergence terms of "Analysis of Quantized Models" (ICLR 2019) in `bounds`, and the
bytes/time/variance planner behind `distq plan` in `planner`; the degree distribution of a pruned
network's units and its truncated power-law fit in `powerlaw` (its plot imports matplotlib)."""

from distq._layout import require_package_name
from distq.theory.bounds import (
    clip_bias_per_element,
    clip_bias_relative,
    grad_blowup_clipped,
    grad_blowup_clipped_bound,
    grad_blowup_unclipped,
    lemma3_variance_bound,
    level_spacing,
    sign_blowup_bound,
    weight_error_floor,
)
from distq.theory.planner import Estimate, Plan, parse_bandwidth, plan
from distq.theory.powerlaw import (
    LayerDegrees,
    PowerLawFit,
    degree_report,
    fit_truncated_power_law,
    format_degree_report,
    plot_degree_distribution,
    unit_degrees,
)

require_package_name(__name__, "distq.theory")

__all__ = [
    "Estimate",
    "LayerDegrees",
    "Plan",
    "PowerLawFit",
    "clip_bias_per_element",
    "clip_bias_relative",
    "degree_report",
    "fit_truncated_power_law",
    "format_degree_report",
    "grad_blowup_clipped",
    "grad_blowup_clipped_bound",
    "grad_blowup_unclipped",
    "lemma3_variance_bound",
    "level_spacing",
    "parse_bandwidth",
    "plan",
    "plot_degree_distribution",
    "sign_blowup_bound",
    "unit_degrees",
    "weight_error_floor",
]
