"""Plots of a run's monitor log (monitor-rank0.jsonl): loss, weight error, gradient blow-up
against the theory's bound, and bytes on the wire, one PNG each (for an LSTM also its gradient
norms across time steps and recurrent spectral norms); for a sparsified run, the
degree distributions of its pruned layers with truncated power-law fits; and, from the run's
records of them, the weight bit widths a --weight-bits-budget allocation chose per tensor and
the channels a --channel-sparsity run kept per layer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from distq.launch.allocation import BIT_WIDTHS_NAME, GRAD_BIT_WIDTHS_NAME
from distq.monitor.monitor import LOG_NAME

BIT_WIDTHS_PLOT = "bit_widths.png"
GRAD_BIT_WIDTHS_PLOT = "grad_bit_widths.png"
CHANNELS_PLOT = "channels.png"


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
    """Write loss.png, weight_error.png, grad_blowup.png and bytes.png into run_dir, and
    lstm_gradients.png when the log holds LSTM records."""
    run_dir = Path(run_dir)
    records = read_log(run_dir, rank)
    written = []

    fig, ax = _figure("Training loss", "nats")
    ax.plot(*_series(records, "loss"), lw=0.8, label="loss")
    parts = [k for k in ("loss_ce", "loss_kl") if any(k in r for r in records)]
    for key, label in zip(parts, ("cross-entropy part", "KL part (unweighted)"), strict=False):
        ax.plot(*_series(records, key), lw=0.8, label=label)
    if parts:  # --distill: the loss and its two parts
        ax.legend(fontsize=8)
    written.append(_save(fig, run_dir / "loss.png"))

    fig, ax = _figure("Weight quantization error", "‖ŵ − w‖²_D / ‖w‖²_D")
    tensors = sorted({n for r in records for n in r.get("weights", {})})
    for name in tensors:
        steps = [r["step"] for r in records if name in r.get("weights", {})]
        values = [r["weights"][name]["relative_D"] for r in records if name in r.get("weights", {})]
        ax.plot(steps, values, marker=".", label=name)
    if tensors:
        ax.legend(fontsize=8)
    written.append(_save(fig, run_dir / "weight_error.png"))

    fig, ax = _figure("Gradient quantization: measured blow-up vs theory", "‖Q(Clip g)‖² / ‖g‖²")
    steps, measured = _series(records, "grad_blowup")
    ax.plot(steps, measured, marker=".", label="measured")
    bound_steps, bound = _series(records, "grad_blowup_bound")
    if bound:
        ax.plot(bound_steps, bound, ls="--", color="tab:red", label="proven bound")
    gaussian_steps, gaussian = _series(records, "grad_blowup_gaussian")
    if gaussian:
        ax.plot(gaussian_steps, gaussian, ls=":", color="tab:gray", label="Gaussian g (paper)")
    ax.legend(fontsize=8)
    written.append(_save(fig, run_dir / "grad_blowup.png"))

    fig, ax = _figure("Bytes on the wire (this rank)", "MB, cumulative")
    steps, sent = _series(records, "bytes_sent")
    ax.plot(steps, [b / 1e6 for b in sent], label="distq sent")
    steps32, fp32 = _series(records, "fp32_allreduce_bytes")
    ax.plot(steps32, [b / 1e6 for b in fp32], ls="--", label="fp32 all-reduce would send")
    ax.legend(fontsize=8)
    written.append(_save(fig, run_dir / "bytes.png"))
    if any("recurrent" in r for r in records):
        written.append(write_lstm_plot(records, run_dir / "lstm_gradients.png"))
    return written


def write_lstm_plot(records: list[dict], path: Path, curves: int = 6) -> Path:
    """Two panels per LSTM run: ‖∂ℓ/∂h_t‖ across time steps t at up to `curves` moments of
    training (log scale; exploding gradients grow towards t = 1), and the spectral norms of
    the recurrent matrices (whole and per gate) over steps."""
    checks = [r for r in records if "recurrent" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), dpi=110)
    with_grads = [r for r in checks if any("grad_norms" in v for v in r["recurrent"].values())]
    picks = with_grads[:: max(1, len(with_grads) // curves)][:curves]
    if with_grads and with_grads[-1] not in picks:
        picks.append(with_grads[-1])
    colors = plt.cm.viridis([i / max(1, len(picks) - 1) for i in range(len(picks))])
    for color, r in zip(colors, picks, strict=True):
        for name, v in r["recurrent"].items():
            if "grad_norms" in v:
                t = range(1, len(v["grad_norms"]) + 1)
                left.plot(t, v["grad_norms"], color=color, lw=1, label=f"step {r['step']} {name}")
    left.set_yscale("log")
    left.set(title="‖∂ℓ/∂h_t‖ across time steps", xlabel="time step t", ylabel="norm")
    if picks:
        left.legend(fontsize=7)
    steps = [r["step"] for r in checks]
    for name in sorted({n for r in checks for n in r["recurrent"]}):
        values = [r["recurrent"][name] for r in checks]
        right.plot(steps, [v["spectral_norm"] for v in values], lw=1.5, label=f"{name} W_h")
        for g, gate in enumerate("ifgo"):
            blocks = [v["spectral_norm_blocks"][g] for v in values]
            right.plot(steps, blocks, lw=0.8, ls="--", label=f"{name} W_h{gate}")
    right.set(title="Spectral norm of the recurrent matrices", xlabel="step", ylabel="‖W‖₂")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _checkpoint(run_dir: str | Path) -> dict[str, Any] | None:
    """run_dir/checkpoint.pt (the newest of a distq train run), None when there is none."""
    import torch

    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def write_degree_report(run_dir: str | Path) -> tuple[str, list[Path]]:
    """Degree distributions of the sparsified quantized tensors in run_dir/checkpoint.pt:
    a text table of truncated power-law fits and two log-log PNGs per tensor in run_dir/degrees.
    Returns ("", []) when the run has no checkpoint or no tensor with zeros."""
    from distq.theory.powerlaw import degree_report, format_degree_report

    state = _checkpoint(run_dir)
    if state is None:
        return "", []
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


@dataclass(frozen=True)
class LayerWidths:
    """The weight width each quantized tensor was given and its size, with the allocation's
    budget, method and step when run_dir/bit_widths.json recorded them."""

    bits: dict[str, int]
    numel: dict[str, int]
    budget: float | None = None
    method: str | None = None
    step: int | None = None

    @property
    def average_bits(self) -> float:
        """Σ n_i·m_i / Σ n_i: bits per weight over the quantized tensors (what a budget caps)."""
        return sum(self.numel[n] * b for n, b in self.bits.items()) / sum(self.numel.values())


def layer_widths(run_dir: str | Path) -> LayerWidths | None:
    """Per-tensor weight widths of a run that allocated them: run_dir/bit_widths.json (written
    at the allocation step), else the checkpoint's optimizer state `tensor_bits` (sizes from
    its model). None for a run of one width for all tensors."""
    path = Path(run_dir) / BIT_WIDTHS_NAME
    if path.is_file():
        record = json.loads(path.read_text())
        return LayerWidths(
            record["bits"], record["numel"], record["budget"], record["method"], record["step"]
        )
    state = _checkpoint(run_dir)
    bits = (state or {}).get("optimizer", {}).get("tensor_bits")
    if not bits:
        return None
    return LayerWidths(dict(bits), {n: state["model"][n].numel() for n in bits})


def gradient_widths(run_dir: str | Path) -> LayerWidths | None:
    """Per-tensor gradient widths of a --grad-bits-budget run (run_dir/grad_bit_widths.json,
    written at the allocation step; `method` is the cost's weighting); None for other runs."""
    path = Path(run_dir) / GRAD_BIT_WIDTHS_NAME
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return LayerWidths(
        record["bits"], record["numel"], record["budget"], record["metric"], record["step"]
    )


def channel_counts(run_dir: str | Path) -> dict[str, tuple[int, int]] | None:
    """producer layer -> (output channels kept, channels) of a --channel-sparsity run, in the
    model's order, from the channel pruner's state in run_dir/checkpoint.pt (its masks are what
    distq export removes). None when the run has no checkpoint or prunes no channels."""
    state = _checkpoint(run_dir)
    if state is None or "channels" not in state:
        return None
    channels = state["channels"]
    return {
        g["producer"]: (int(channels["keep"][g["producer"]].sum()), g["channels"])
        for g in channels["groups"]
    }


def write_layer_report(run_dir: str | Path) -> tuple[list[str], list[Path]]:
    """bit_widths.png (each quantized tensor's width, the budget and the average),
    grad_bit_widths.png (the same for gradient widths) and channels.png (channels kept of each
    prunable layer) into run_dir, each when the run has such data; returns a line per plot left
    out, saying why, and the plots written."""
    run_dir = Path(run_dir)
    notes, written = [], []
    widths = layer_widths(run_dir)
    if widths is None:
        notes.append("no bit_widths.png: the run gave every quantized tensor one width")
    else:
        written.append(write_widths_plot(widths, run_dir / BIT_WIDTHS_PLOT))
    widths = gradient_widths(run_dir)
    if widths is None:
        notes.append("no grad_bit_widths.png: the run had no --grad-bits-budget")
    else:
        written.append(write_widths_plot(widths, run_dir / GRAD_BIT_WIDTHS_PLOT, "gradient"))
    counts = channel_counts(run_dir)
    if counts is None:
        notes.append("no channels.png: the run has no checkpoint of a --channel-sparsity run")
    else:
        written.append(write_channels_plot(counts, run_dir / CHANNELS_PLOT))
    return notes, written


def write_widths_plot(widths: LayerWidths, path: Path, of: str = "weight") -> Path:
    """One bar per tensor at its `of` (weight or gradient) width, labelled with its size, the
    budget as a dashed line and the size-weighted average in the title."""
    names = list(widths.bits)
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(names)), 4), dpi=110)
    bars = ax.bar(range(len(names)), [widths.bits[n] for n in names], color="tab:blue")
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(range(len(names)), [f"{n}\n{widths.numel[n]:,}" for n in names], fontsize=7)
    unit = "weight" if of == "weight" else "element"
    title = f"{of.capitalize()} bit widths per tensor: {widths.average_bits:.3f} bits per {unit}"
    if widths.budget is not None:
        ax.axhline(widths.budget, ls="--", color="tab:red", label=f"budget {widths.budget}")
        ax.legend(fontsize=8)
        title += f" ({widths.method}, step {widths.step})"
    ax.set_title(title)
    ax.set_xlabel("quantized tensor (elements)" if of == "weight" else "tensor (elements)")
    ax.set_ylabel(f"bits per {unit}")
    ax.set_yticks(range(max(widths.bits.values()) + 2))
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def write_channels_plot(counts: dict[str, tuple[int, int]], path: Path) -> Path:
    """Per prunable layer, its channels (light) and those kept (dark), labelled kept/total;
    the title gives the totals."""
    names = list(counts)
    kept = [counts[n][0] for n in names]
    total = [counts[n][1] for n in names]
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(names)), 4), dpi=110)
    x = range(len(names))
    ax.bar(x, total, color="tab:gray", alpha=0.35, label="channels")
    bars = ax.bar(x, kept, color="tab:blue", label="kept")
    ax.bar_label(bars, [f"{k}/{t}" for k, t in zip(kept, total, strict=True)], fontsize=8)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_title(
        f"Channels kept per layer: {sum(kept)} of {sum(total)} ({sum(kept) / sum(total):.0%})"
    )
    ax.set_xlabel("layer whose output channels are pruned (its name in the model)")
    ax.set_ylabel("output channels")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
