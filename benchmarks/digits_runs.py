"""Shared by the digits benchmarks: one real `torchrun --nproc_per_node=2` run of `distq train`."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path


def run_digits(flags: list[str], seed: int, epochs: int, out: Path) -> dict:
    """Train with `flags`; returns the run's summary.json (accuracy, loss, sizes, traffic)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "distq.launch.train", *flags, "--seed", str(seed), "--epochs", str(epochs),
        "--out-dir", str(out), "--no-progress",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads((out / "summary.json").read_text())


def accuracy_cells(values: list[float]) -> tuple[str, str]:
    """("mean ± sd", "per seed") table cells of one configuration's accuracies (sd 0 for one)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}", ", ".join(f"{v:.2f}" for v in values)
