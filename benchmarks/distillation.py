"""Self-distillation while compressing (`--distill λ`): ternary weights at 75% and 90% sparsity,
with and without the latent weights as teacher, and what the teacher's forward costs.

Each (κ, λ, seed) is a real `torchrun --nproc_per_node=2` run of the main job (ternary weights,
cubic sparsity ramp to κ over the first 75% of the steps, 2-bit `scatter` gradients, as
benchmarks/sparsity.py), λ = 0 and λ > 0 alternating within each seed; ms/step is the run's
training time over its steps (gradient exchange, projection and the teacher included).

The teacher's cost is also measured side by side in one process (1 thread, no DDP): the
recipe's model with the same optimizer, blocks of steps with plain cross-entropy and with
distillation alternating on the same batches, and the teacher's forward alone (swap w in,
forward, copy ŵ and the buffers back); medians over the blocks.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/distillation.py --seeds 0 1
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/distillation.py --recipe cifar \
        --seeds 0 1 --epochs 6
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.digits_runs import accuracy_cells, run_digits
from distq.distill import SelfDistillation, teacher_logits
from distq.launch import config, recipes
from distq.launch.build import build_optimizer

HERE = Path(__file__).resolve().parent


def flags(recipe: str, sparsity: float, weight: float, temperature: float) -> list[str]:
    out = ["--recipe", recipe, "--scheme", "ternary", "--grad-bits", "2"]
    out += ["--sparsity", str(sparsity), "--sparsity-schedule", "cubic"]
    return [*out, "--distill", str(weight), "--distill-temperature", str(temperature)]


def step_times(recipe: str, sparsity: float, weight: float, blocks: int, steps: int) -> dict:
    """Median ms per step without and with distillation, and of the teacher's forward alone,
    over `blocks` alternating blocks of `steps` steps in this process."""
    torch.set_num_threads(1)
    cfg = config.TrainConfig(recipe=recipe, scheme="ternary", sparsity=sparsity)
    torch.manual_seed(0)
    data = recipes.load(recipe, cfg.run.test_fraction, 0)
    model = recipes.build_model(recipe, cfg.run.hidden, cfg.run.depth, classes=data.classes)
    optimizer = build_optimizer(cfg, model, blocks * steps * 3)
    distill = SelfDistillation(optimizer, weight)
    batch = torch.arange(cfg.run.batch_size)
    x, y = data.train_x[batch], data.train_y[batch]

    def plain(net, inputs, targets):
        return nn.functional.cross_entropy(net(inputs), targets)

    def train_step(loss):
        optimizer.zero_grad(set_to_none=True)
        loss(model, x, y).backward()
        optimizer.step()

    kinds = {
        "plain": lambda: train_step(plain),
        "distill": lambda: train_step(distill.loss),
        "teacher": lambda: teacher_logits(model, optimizer, x),
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for kind in kinds:  # warm-up
        kinds[kind]()
    for _ in range(blocks):
        for kind, run in kinds.items():
            started = time.perf_counter()
            for _ in range(steps):
                run()
            times[kind].append(1e3 * (time.perf_counter() - started) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits", choices=("digits", "cifar"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.75, 0.9])
    parser.add_argument("--distill", type=float, default=0.5, help="λ of the distilled runs")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--timing-blocks", type=int, default=7)
    parser.add_argument("--timing-steps", type=int, default=10)
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    settings = [(k, lam) for k in args.sparsities for lam in (0.0, args.distill)]
    runs: list[dict] = []
    record = {
        "recipe": args.recipe,
        "epochs": args.epochs,
        "temperature": args.temperature,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "runs": runs,
        "step_ms_one_process": None,
    }
    path = HERE / f"distillation_{args.recipe}.json"
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for sparsity, weight in settings:
                out = Path(tmp) / f"k{sparsity}-l{weight}-{seed}"
                result = run_digits(
                    flags(args.recipe, sparsity, weight, args.temperature), seed, args.epochs, out
                )
                runs.append({
                    "sparsity": sparsity, "distill": weight, "seed": seed,
                    "test_accuracy": 100 * result["test_accuracy"],
                    "final_loss": result["final_loss"], "steps": result["steps"],
                    "seconds": result["seconds"],
                })  # fmt: skip
                print(f"{runs[-1]}", file=sys.stderr)
                path.write_text(json.dumps(record, indent=2) + "\n")  # what a cut run keeps
    record["step_ms_one_process"] = step_times(
        args.recipe, args.sparsities[-1], args.distill, args.timing_blocks, args.timing_steps
    )
    path.write_text(json.dumps(record, indent=2) + "\n")
    print_tables(record)


def print_tables(record: dict) -> None:
    runs = record["runs"]
    seeds = sorted({r["seed"] for r in runs})
    print(
        f"\n{record['recipe']}, ternary, 2 workers (gloo), 2-bit scatter gradients, "
        f"{record['epochs']} epochs, T = {record['temperature']}, seeds {seeds}, "
        f"commit {record['commit']}, {record['date']}\n"
    )
    print(
        "| sparsity κ | distill λ | test accuracy % (mean ± sd) | vs λ = 0 | per seed | ms/step |"
    )
    print("|---|---|---|---|---|---|")
    for sparsity in sorted({r["sparsity"] for r in runs}):
        base = None
        for weight in sorted({r["distill"] for r in runs}):
            mine = [r for r in runs if (r["sparsity"], r["distill"]) == (sparsity, weight)]
            accuracies = [r["test_accuracy"] for r in mine]
            mean = statistics.mean(accuracies)
            base = mean if base is None else base
            mean_sd, per_seed = accuracy_cells(accuracies)
            ms = 1e3 * sum(r["seconds"] for r in mine) / sum(r["steps"] for r in mine)
            print(
                f"| {sparsity} | {weight} | {mean_sd} | {mean - base:+.2f} | {per_seed} "
                f"| {ms:.1f} |"
            )
    t = record["step_ms_one_process"]
    if t is None:
        return
    print(
        f"\none process, 1 thread, batch 32: a step {t['plain']:.2f} ms plain, "
        f"{t['distill']:.2f} ms with distillation ({t['distill'] - t['plain']:+.2f} ms, "
        f"{t['distill'] / t['plain']:.2f}x); the teacher's forward alone {t['teacher']:.2f} ms"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:  # reprint a committed result: --table FILE
        print_tables(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
