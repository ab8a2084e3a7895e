"""Ternary weights under joint quantization + sparsification on digits: test accuracy against
total compression, loss-aware (d from Adam) and not (d = 1), with the real export size.

Each (κ, weighting, seed) is a real `torchrun --nproc_per_node=2` run of the main job with a
cubic sparsity ramp to κ over the first 75% of the steps and 2-bit quantized gradients (with
`--sparse-gradients`, pruned entries stay off the wire); settings alternate within each seed.
"density" is the measured share of non-zeros in the final quantized tensors. Each checkpoint's
quantized tensors are exported alone (distq's smallest layout per tensor) and compared with the
same tensors saved fp32 by safetensors, both sizes read from disk.

    .venv/bin/python benchmarks/sparsity.py --seeds 0 1 2
    .venv/bin/python benchmarks/sparsity.py --recipe cifar --seeds 0 --epochs 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.digits_runs import run_digits
from benchmarks.weight_schemes import export_sizes


def flags(recipe: str, sparsity: float, loss_aware: bool, sparse_gradients: bool) -> list[str]:
    out = ["--recipe", recipe, "--scheme", "ternary", "--grad-bits", "2"]
    if sparsity:
        out += ["--sparsity", str(sparsity), "--sparsity-schedule", "cubic"]
        if sparse_gradients:
            out.append("--sparse-gradients")
    if not loss_aware:
        out.append("--no-loss-aware")
    return out


def nonzero_share(checkpoint: Path) -> float:
    """Non-zeros over all elements of the checkpoint's quantized tensors."""
    state = torch.load(checkpoint, weights_only=True)
    tensors = [state["model"][n] for n in state["quantized"]]
    return sum(int((t != 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits", choices=("digits", "cifar"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9])
    parser.add_argument(
        "--sparse-gradients", action="store_true", help="leave pruned entries off the wire"
    )
    args = parser.parse_args()
    settings = [(k, la) for k in args.sparsities for la in (True, False)]
    accuracy: dict[tuple, list[float]] = {s: [] for s in settings}
    sizes: dict[tuple, tuple[int, int]] = {}
    density: dict[tuple, list[float]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in args.seeds:
            for sparsity, loss_aware in settings:
                started = time.perf_counter()
                out = work / f"k{sparsity}-la{int(loss_aware)}-{seed}"
                result = run_digits(
                    flags(args.recipe, sparsity, loss_aware, args.sparse_gradients),
                    seed,
                    args.epochs,
                    out,
                )
                accuracy[sparsity, loss_aware].append(100 * result["test_accuracy"])
                density[sparsity, loss_aware].append(nonzero_share(out / "checkpoint.pt"))
                if seed == args.seeds[0]:
                    sizes[sparsity, loss_aware] = export_sizes(out / "checkpoint.pt", out)
                print(
                    f"seed {seed} sparsity {sparsity:<4} loss-aware {loss_aware!s:<5} "
                    f"{accuracy[sparsity, loss_aware][-1]:6.2f}%  "
                    f"({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                )
    dense = statistics.mean(accuracy[0.0, True]) if (0.0, True) in accuracy else float("nan")
    model = {
        "digits": "digits, MLP 64-256-256-256-10 (2 ternary hidden layers)",
        "cifar": "synthetic CIFAR-style set, VGG-style CNN 32-64-128 (5 ternary convolutions)",
    }[args.recipe]
    print(
        f"\n{model}, 2 workers, {args.epochs} epochs, seeds {args.seeds}; export of seed "
        f"{args.seeds[0]}'s quantized tensors\n"
    )
    print(
        "| sparsity κ | weighting | density | test accuracy % (mean ± sd) | vs dense loss-aware "
        "| per seed | export B | fp32 B | smaller | bits/weight |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sparsity, loss_aware in settings:
        values = accuracy[sparsity, loss_aware]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        fp32, packed = sizes[sparsity, loss_aware]
        weights = fp32 / 4  # elements (the fp32 file's header is a few hundred bytes)
        print(
            f"| {sparsity} | {'d from Adam' if loss_aware else 'd = 1'} | "
            f"{statistics.mean(density[sparsity, loss_aware]):.3f} | "
            f"{statistics.mean(values):.2f} ± {sd:.2f} | {statistics.mean(values) - dense:+.2f} | "
            f"{', '.join(f'{v:.2f}' for v in values)} | {packed} | {fp32} | "
            f"{fp32 / packed:.1f}x | {8 * packed / weights:.2f} |"
        )


if __name__ == "__main__":
    main()
