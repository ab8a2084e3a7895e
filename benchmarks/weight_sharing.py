"""Weight sharing (`shared`, D-weighted k-means) vs `linear` and `log` at equal bits on digits
(or, with --recipe cifar, the CIFAR-style CNN).

k = 4, 8, 16 shared values (2, 3, 4 bits) against the m-bit schemes at the same code width
(2^m − 1 levels: linear α·{0, ±1/k, …, ±1}, log α·{0, ±2^−j}), each (scheme, bits, seed) a
real `torchrun --nproc_per_node=2` run of the main job (fp32 gradients); configurations
alternate within each seed. Sizes: the bytes `export_packed` stores for the quantized tensors
(codes + codebooks; their fp32 size beside), and the whole packed model from the run's summary.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/weight_sharing.py --seeds 0 1 --epochs 8
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/weight_sharing.py --recipe cifar \
        --hidden 128 --epochs 4 --seeds 0 1

Every accuracy and size goes to weight_sharing-<recipe>.json as well.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from distq.export import QuantSpec, export_packed
from distq.quant import get_scheme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.digits_runs import accuracy_cells, run_digits

SCHEMES = ("linear", "log", "shared")
BITS = (2, 3, 4)


def quantized_bytes(checkpoint: Path, out: Path) -> tuple[int, int]:
    """(fp32 bytes, packed bytes) of the checkpoint's quantized tensors, as export stores them."""
    state = torch.load(checkpoint, weights_only=True)
    names = list(state["quantized"])
    tensors = {n: state["model"][n].contiguous() for n in names}
    specs = {n: QuantSpec(**state["quantized"][n]) for n in names}
    report = export_packed(tensors, specs, out)
    return report.quantized_fp32_bytes, report.quantized_packed_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--recipe", default="digits", choices=("digits", "cifar"))
    parser.add_argument("--hidden", type=int, default=256, help="the recipe's width")
    args = parser.parse_args()
    task = ["--recipe", args.recipe, "--hidden", str(args.hidden)]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()  # the code the runs start from
    configs = [(bits, scheme) for bits in BITS for scheme in SCHEMES]
    accuracy: dict[tuple[int, str], list[float]] = {c: [] for c in configs}
    sizes: dict[tuple[int, str], tuple[int, int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in args.seeds:
            for bits, scheme in configs:
                started = time.perf_counter()
                out = work / f"{scheme}{bits}-{seed}"
                flags = [*task, "--scheme", scheme, "--bits", str(bits), "--grad-bits", "none"]
                result = run_digits(flags, seed, args.epochs, out)
                accuracy[bits, scheme].append(100 * result["test_accuracy"])
                fp32, packed = quantized_bytes(out / "checkpoint.pt", out / "q.safetensors")
                sizes[bits, scheme] = (fp32, packed, result["packed_bytes"])
                print(
                    f"seed {seed} {scheme:<6} {bits} bit {accuracy[bits, scheme][-1]:6.2f}%  "
                    f"({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                )
    h = args.hidden
    model = (
        f"Digits, MLP 64-{h}-{h}-{h}-10"
        if args.recipe == "digits"
        else f"CIFAR-style synthetic set, VGG-style CNN (hidden {h})"
    )
    print(
        f"\n{model}, 2 workers (gloo), {args.epochs} epochs, seeds {args.seeds}, commit {commit}\n"
    )
    record = {
        "commit": commit, "date": time.strftime("%Y-%m-%d", time.gmtime()), "recipe": args.recipe,
        "hidden": h, "epochs": args.epochs, "seeds": args.seeds,
        "runs": [
            {"bits": b, "scheme": sc, "accuracy": accuracy[b, sc], "quantized_fp32_bytes":
             sizes[b, sc][0], "quantized_packed_bytes": sizes[b, sc][1],
             "model_packed_bytes": sizes[b, sc][2]}
            for b, sc in configs
        ],
    }  # fmt: skip
    out = Path(__file__).resolve().parent / f"weight_sharing-{args.recipe}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(
        "| bits | scheme | values per tensor | test accuracy % (mean ± sd) | per seed "
        "| quantized tensors packed B (fp32 B) | whole model packed B |"
    )
    print("|---|---|---|---|---|---|---|")
    for bits, scheme in configs:
        mean_sd, per_seed = accuracy_cells(accuracy[bits, scheme])
        levels = 2**bits if get_scheme(scheme).codebook else 2**bits - 1
        fp32, packed, model = sizes[bits, scheme]
        print(
            f"| {bits} | {scheme} | {levels} | {mean_sd} | {per_seed} "
            f"| {packed} ({fp32}) | {model} |"
        )


if __name__ == "__main__":
    main()
