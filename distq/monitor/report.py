"""Plots of a run's monitor log (monitor-rank0.jsonl): loss, weight error, gradient blow-up
against the theory's bound, and bytes on the wire, one PNG each; and, for a sparsified run, the
degree distributions of its pruned layers with truncated power-law fits."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from distq.monitor.monitor import LOG_NAME


def read_log(run_dir: str | Path, rank: int = 0) -> list[dict]:
    """The monitor records of one rank, oldest first."""
    path = Path(run_dir) / LOG_NAME.format(rank=rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: was the run made with the monitor on?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _figure(title: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path, rank: int = 0) -> list[Path]:
    """Write loss.png, weight_error.png, grad_blowup.png and bytes.png into run_dir."""
    run_dir = Path(run_dir)
    records = read_log(run_dir, rank)
    written = []

    fig, ax = _figure("Training loss", "cross-entropy")
    ax.plot(*_series(records, "loss"), lw=0.8)
    written.append(_save(fig, run_dir / "loss.png"))

    fig, ax = _figure("Weight quantization error", "‖ŵ − w‖²_D / ‖w‖²_D")
    tensors = sorted({n for r in records for n in r.get("weights", {})})
    for name in tensors:
        steps = [r["step"] for r in records if name in r.get("weights", {})]
        values = [r["weights"][name]["relative"] for r in records if name in r.get("weights", {})]
        ax.plot(steps, values, marker=".", label=name)
    if tensors:
        ax.legend(fontsize=8)
    written.append(_save(fig, run_dir / "weight_error.png"))

    fig, ax = _figure("Gradient quantization: measured blow-up vs theory", "E‖Q(g)‖² / ‖g‖²")
    steps, measured = _series(records, "grad_blowup")
    ax.plot(steps, measured, marker=".", label="measured")
    bound_steps, bound = _series(records, "grad_blowup_bound")
    if bound:
        ax.plot(bound_steps, bound, ls="--", color="tab:red", label="theory bound")
    ax.legend(fontsize=8)
    written.append(_save(fig, run_dir / "grad_blowup.png"))

    fig, ax = _figure("Bytes on the wire (this rank)", "MB, cumulative")
    steps, sent = _series(records, "bytes_sent")
    ax.plot(steps, [b / 1e6 for b in sent], label="distq sent")
    steps32, fp32 = _series(records, "fp32_allreduce_bytes")
    ax.plot(steps32, [b / 1e6 for b in fp32], ls="--", label="fp32 all-reduce would send")
    ax.legend(fontsize=8)
    written.append(_save(fig, run_dir / "bytes.png"))
    return written


def write_degree_report(run_dir: str | Path) -> tuple[str, list[Path]]:
    """Degree distributions of the sparsified quantized tensors in run_dir/checkpoint.pt:
    a text table of truncated power-law fits and two log-log PNGs per tensor in run_dir/degrees.
    Returns ("", []) when the run has no checkpoint or no tensor with zeros."""
    import torch

    from distq.theory.powerlaw import degree_report, format_degree_report

    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        return "", []
    state = torch.load(path, map_location="cpu", weights_only=True)
    sparse = {
        name: state["model"][name]
        for name in state.get("quantized", {})
        if bool((state["model"][name] == 0).any())
    }
    if not sparse:
        return "", []
    plot_dir = Path(run_dir) / "degrees"
    report = degree_report(sparse, plot_dir=plot_dir)
    return format_degree_report(report), sorted(plot_dir.glob("*.png"))
