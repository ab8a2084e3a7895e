"""Quantized LSTMs need normalization: bits per character of a 1-layer character LSTM on the
default corpus (the Python standard library's sources) at the same budget for full precision,
BinaryConnect, LAB and ternary (LATe) weights, each without and with weight / layer / batch-shared
normalization, the packed model size of each, and ‖∂ℓ/∂h_t‖ across time steps.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lstm_normalization.py [--jobs 2]

Each configuration trains in its own process (`distq.launch.train.run`, one worker, 1 thread)
and writes benchmarks/lstm_normalization_runs/<name>.json as it finishes; a rerun skips the
configurations that have a result (delete a JSON to redo it). Then the script prints the
markdown table and writes lstm_normalization.png (gradient norms across time steps at the end
of training, and the first step's over training) from the JSON files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "lstm_normalization_runs"
PLOT = HERE / "lstm_normalization.png"

CONFIGS: dict[str, tuple[str, str]] = {  # name -> (weight scheme, LSTM normalization)
    "fp32": ("none", "none"),
    "bc-none": ("binaryconnect", "none"),
    "bc-weight": ("binaryconnect", "weight"),
    "bc-layer": ("binaryconnect", "layer"),
    "bc-batch": ("binaryconnect", "batch-shared"),
    "lab-none": ("binary", "none"),
    "lab-weight": ("binary", "weight"),
    "lab-layer": ("binary", "layer"),
    "ternary-none": ("ternary", "none"),
    "ternary-weight": ("ternary", "weight"),
    "ternary-layer": ("ternary", "layer"),
    "lab-batch": ("binary", "batch-shared"),  # beyond the list: every scheme x norm
    "ternary-batch": ("ternary", "batch-shared"),
    "fp32-weight": ("none", "weight"),  # is it the normalization or the quantization?
    "fp32-layer": ("none", "layer"),
}
# The same budget for every configuration (see benchmarks/README.md for why these sizes).
BUDGET = {
    "recipe": "charlm",
    "hidden": 128,
    "depth": 1,
    "bptt": 100,
    "batch_size": 32,
    "epochs": 2,
    "lr": 0.005,
    "test_fraction": 0.1,
    "keep_full_precision": ["first", "last"],  # embedding and softmax layer
    "grad_bits": None,  # one worker: no gradient exchange
    "monitor_every": 10,
    "checkpoint_every": None,
    "metrics_port": None,
    "progress": False,
    "seed": 0,
}


def run_one(name: str, run_root: Path) -> dict:
    """Train configuration `name` in this process and return its result record."""
    import torch

    torch.set_num_threads(1)
    from distq.launch import checkpoint, config, train
    from distq.monitor.report import read_log

    scheme, norm = CONFIGS[name]
    out = run_root / name
    cfg = config.TrainConfig(**BUDGET, scheme=scheme, lstm_norm=norm, out_dir=str(out))
    started = time.perf_counter()
    result = train.run(cfg)
    state = checkpoint.load(out / "checkpoint.pt")
    records = read_log(out)
    recurrent = [
        {"step": r["step"], **r["recurrent"]["lstm.layers.0"]} for r in records if "recurrent" in r
    ]
    return {
        "name": name,
        "scheme": scheme,
        "norm": norm,
        "test_bpc": result.metrics["test_bpc"],
        "test_accuracy": result.test_accuracy,
        "final_train_loss_nats": result.final_loss,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "wall_seconds": time.perf_counter() - started,
        **export_sizes(out),
        "skipped_steps": state["optimizer"].get("skipped_steps", 0) if scheme != "none" else 0,
        "recurrent": recurrent,
        "budget": BUDGET,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": sys.version.split()[0],
    }


def export_sizes(out: Path) -> dict[str, int]:
    """Pack the run's final checkpoint (`distq export`'s code path); the file's size on disk and
    the LSTM matrices' packed bytes (codes + codebooks) against their fp32 bytes."""
    from distq.export import QuantSpec, export_packed
    from distq.launch import checkpoint

    state = checkpoint.load(out / "checkpoint.pt")
    specs = {n: QuantSpec(**s) for n, s in state["quantized"].items()}
    report = export_packed(state["model"], specs, out / "model.safetensors")
    lstm = [t for t in report.tensors if t.name.endswith(("ih.weight", "hh.weight"))]
    return {
        "packed_file_bytes": report.file_bytes,
        "fp32_tensor_bytes": report.total_fp32_bytes,
        "lstm_packed_bytes": sum(t.packed_bytes for t in lstm),
        "lstm_fp32_bytes": sum(t.fp32_bytes for t in lstm),
    }


def backfill(results: list[dict], run_root: Path) -> None:
    """Add export sizes to results written before they were recorded (run dirs still there)."""
    for r in results:
        if "lstm_packed_bytes" not in r and (run_root / r["name"] / "checkpoint.pt").exists():
            r.update(export_sizes(run_root / r["name"]))
            (RESULTS / f"{r['name']}.json").write_text(json.dumps(r, indent=1) + "\n")


def run_missing(names: list[str], jobs: int, run_root: Path) -> None:
    """Train every configuration without a result JSON, `jobs` processes at a time."""
    RESULTS.mkdir(exist_ok=True)
    todo = [n for n in names if not (RESULTS / f"{n}.json").exists()]
    running: list[tuple[str, subprocess.Popen]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    while todo or running:
        while todo and len(running) < jobs:
            name = todo.pop(0)
            log = (RESULTS / f"{name}.log").open("w")
            cmd = [sys.executable, __file__, "--one", name, "--run-root", str(run_root)]
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=log, env=env)))
            print(f"started {name}", flush=True)
        time.sleep(2)
        for name, proc in list(running):
            if proc.poll() is not None:
                running.remove((name, proc))
                print(f"finished {name} (exit {proc.returncode})", flush=True)


def table(results: list[dict]) -> str:
    """The markdown BPC / size table."""
    fp = next((r["test_bpc"] for r in results if r["name"] == "fp32"), None)
    lines = [
        "| weights | normalization | test BPC | Δ vs fp32 (none) | packed file | vs fp32 file | "
        "LSTM matrices packed | vs fp32 | skipped steps | train time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fp_bytes = next((r["packed_file_bytes"] for r in results if r["name"] == "fp32"), None)
    for r in results:
        delta = f"{r['test_bpc'] - fp:+.3f}" if fp is not None else "-"
        ratio = f"{fp_bytes / r['packed_file_bytes']:.1f}x" if fp_bytes else "-"
        lines.append(
            f"| {r['scheme']} | {r['norm']} | {r['test_bpc']:.3f} | {delta} | "
            f"{r['packed_file_bytes'] / 1024:.1f} KiB | {ratio} | "
            f"{r.get('lstm_packed_bytes', 0) / 1024:.1f} KiB | "
            f"{r.get('lstm_fp32_bytes', 0) / max(r.get('lstm_packed_bytes', 0), 1):.1f}x | "
            f"{r['skipped_steps']} | "
            f"{r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Left: ‖∂ℓ/∂h_t‖ across t at the last check of each run; right: ‖∂ℓ/∂h_1‖ over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 5), dpi=110)
    styles = {"none": "-", "weight": "--", "layer": ":", "batch-shared": "-."}
    colors = {
        "none": "black",
        "binaryconnect": "tab:red",
        "binary": "tab:blue",
        "ternary": "tab:green",
    }
    for r in results:
        checks = [c for c in r["recurrent"] if "grad_norms" in c]
        if not checks:
            continue
        style = {"ls": styles[r["norm"]], "color": colors[r["scheme"]], "lw": 1.2}
        last = checks[-1]["grad_norms"]
        axes[0].plot(range(1, len(last) + 1), last, label=r["name"], **style)
        axes[1].plot([c["step"] for c in checks], [c["grad_norms"][0] for c in checks], **style)
        axes[2].plot(
            [c["step"] for c in r["recurrent"]],
            [c["spectral_norm"] for c in r["recurrent"]],
            label=r["name"],
            **style,
        )
    axes[0].set(title="‖∂ℓ/∂h_t‖ across time steps (end of training)", xlabel="t", yscale="log")
    axes[1].set(title="‖∂ℓ/∂h_1‖ over training", xlabel="step", yscale="log")
    axes[2].set(title="‖W_h‖₂ (quantized recurrent matrix)", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="configurations trained at once")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="a subset of configs")
    parser.add_argument("--run-root", default="/tmp/distq-lstm-bench", help="run directories")
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    run_root = Path(args.run_root)
    if args.one:
        record = run_one(args.one, run_root)
        (RESULTS / f"{args.one}.json").write_text(json.dumps(record, indent=1) + "\n")
        return 0
    run_missing(args.only or list(CONFIGS), args.jobs, run_root)
    results = [
        json.loads((RESULTS / f"{n}.json").read_text())
        for n in CONFIGS
        if (RESULTS / f"{n}.json").exists()
    ]
    backfill(results, run_root)
    print(table(results))
    plot(results, PLOT)
    print(f"plot: {PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
