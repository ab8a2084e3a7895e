"""Digits test accuracy of every weight scheme after the same budget, 2 workers, and export sizes.

Each (scheme, seed) is a real `torchrun --nproc_per_node=2` run of the main job; schemes
alternate within each seed so machine noise spreads evenly. Then the 2-bit checkpoint's
quantized tensors are exported alone and their file size is compared with the same tensors
saved fp32 by safetensors (both sizes read from disk).

    .venv/bin/python benchmarks/weight_schemes.py --seeds 0 1 2 --epochs 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from distq.export import QuantSpec, export_packed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.digits_runs import run_digits

SCHEMES = [
    ("full precision", ["--scheme", "none"]),
    ("LAB (binary)", ["--scheme", "binary"]),
    ("ternary (exact)", ["--scheme", "ternary"]),
    ("ternary-approx", ["--scheme", "ternary-approx"]),
    ("ternary2", ["--scheme", "ternary2"]),
    ("linear 3-bit", ["--scheme", "linear", "--bits", "3"]),
    ("log 3-bit", ["--scheme", "log", "--bits", "3"]),
    ("BWN", ["--scheme", "bwn"]),
    ("TWN", ["--scheme", "twn"]),
    ("BinaryConnect", ["--scheme", "binaryconnect"]),
]


def export_sizes(checkpoint: Path, workdir: Path) -> tuple[int, int]:
    """On-disk bytes of the quantized tensors: fp32 safetensors vs distq's packed export."""
    state = torch.load(checkpoint, weights_only=True)
    names = list(state["quantized"])
    tensors = {n: state["model"][n].contiguous() for n in names}
    save_file(tensors, workdir / "fp32.safetensors")
    specs = {n: QuantSpec(**state["quantized"][n]) for n in names}
    export_packed(tensors, specs, workdir / "packed.safetensors")
    return (workdir / "fp32.safetensors").stat().st_size, (
        workdir / "packed.safetensors"
    ).stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    accuracy: dict[str, list[float]] = {name: [] for name, _ in SCHEMES}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in args.seeds:
            for name, flags in SCHEMES:
                started = time.perf_counter()
                out = work / f"{name.replace(' ', '_')}-{seed}"
                result = run_digits([*flags, "--grad-bits", "none"], seed, args.epochs, out)
                accuracy[name].append(100 * result["test_accuracy"])
                print(
                    f"seed {seed} {name:<16} {accuracy[name][-1]:6.2f}%  "
                    f"({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                )
        fp32_bytes, packed_bytes = export_sizes(
            work / f"ternary_(exact)-{args.seeds[0]}" / "checkpoint.pt", work
        )
    reference = statistics.mean(accuracy["full precision"])
    print(
        f"\nDigits, MLP 64-256-256-256-10, 2 workers (gloo), {args.epochs} epochs, "
        f"seeds {args.seeds}\n"
    )
    print("| weights | test accuracy % (mean ± sd) | vs full precision | per seed |")
    print("|---|---|---|---|")
    for name, _ in SCHEMES:
        values = accuracy[name]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        per_seed = ", ".join(f"{v:.2f}" for v in values)
        print(
            f"| {name} | {statistics.mean(values):.2f} ± {sd:.2f} | "
            f"{statistics.mean(values) - reference:+.2f} | {per_seed} |"
        )
    print(
        f"\nQuantized tensors of the ternary model on disk: fp32 safetensors {fp32_bytes} B, "
        f"distq packed {packed_bytes} B: {fp32_bytes / packed_bytes:.2f}x smaller"
    )


if __name__ == "__main__":
    main()
