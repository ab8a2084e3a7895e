"""Convergence monitor: weight and gradient quantization errors against the theory's bounds,
logged as JSONL, exported to Prometheus, plotted by `distq report`."""

from distq.monitor.exporter import MetricsExporter
from distq.monitor.monitor import ConvergenceMonitor, GradientSetup
from distq.monitor.recurrent import RecurrentProbe, spectral_norm
from distq.monitor.weights import WeightError, weight_errors

__all__ = [
    "ConvergenceMonitor",
    "GradientSetup",
    "MetricsExporter",
    "RecurrentProbe",
    "WeightError",
    "spectral_norm",
    "weight_errors",
]
