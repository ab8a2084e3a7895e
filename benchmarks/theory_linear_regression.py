"""ICLR 2019 "Analysis of Quantized Models", Figure 3a: final loss vs dimension, linear regression.

w* ~ U[−0.5, 0.5]^d, x ~ U[−0.5, 0.5]^d, y ~ N(xᵀw*, 0.2²); batch 64 per worker, 4 simulated
workers; LAB (loss-aware binary) weights through distq's QuantizedOptimizer over RMSprop with
step η/√t; gradients averaged in full precision, or each worker's gradient sent through distq's
2-bit stochastic quantizer with one scale per tensor (the paper's setting), unclipped or clipped
at 2.5σ. The theory: the unclipped quantization variance grows like √d, clipping removes that.
Reports the final training loss (mean of the last 10% of steps) per d, the theory's blow-up
bounds beside it, and a plot.

    .venv/bin/python benchmarks/theory_linear_regression.py --dims 10 100 1000 10000
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from distq.comm import Key, StochasticQuantizer
from distq.comm.clipping import clip_by_std_
from distq.optim import QuantizedOptimizer
from distq.theory import grad_blowup_clipped, grad_blowup_unclipped

OPTIONS = {"full precision": None, "2-bit": None, "2-bit clipped": 2.5}
WORKERS, BATCH, NOISE = 4, 64, 0.2


def run(d: int, option: str, steps: int, lr: float, seed: int) -> float:
    """Final training loss of one configuration."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.rand(d, generator=g) - 0.5
    model = nn.Linear(d, 1, bias=False)
    torch.manual_seed(seed)
    base = torch.optim.RMSprop(model.parameters(), lr=lr, alpha=0.99)
    opt = QuantizedOptimizer(base, model, scheme="binary", keep_full_precision=(),
                             clip_latent=None)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / math.sqrt(t + 1))
    quantizer = StochasticQuantizer(bits=2, bucket_size=None)
    losses = []
    for step in range(steps):
        grads, loss_sum = [], 0.0
        for worker in range(WORKERS):
            x = torch.rand(BATCH, d, generator=g) - 0.5
            y = x @ w_star + NOISE * torch.randn(BATCH, generator=g)
            model.zero_grad()
            loss = nn.functional.mse_loss(model(x).squeeze(1), y)
            loss.backward()
            loss_sum += loss.item()
            grad = model.weight.grad.reshape(-1).clone()
            if option != "full precision":
                if OPTIONS[option] is not None:
                    clip_by_std_(grad, OPTIONS[option])
                key = Key(seed=seed, step=step, rank=worker)
                grad = quantizer.decompress(quantizer.compress(grad, key), d)
            grads.append(grad)
        model.weight.grad = torch.stack(grads).mean(0).reshape(1, d)
        opt.step()
        schedule.step()
        losses.append(loss_sum / WORKERS)
    tail = losses[-max(1, steps // 10):]
    return statistics.mean(tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--plot", type=Path,
                        default=Path("benchmarks/theory_linear_regression.png"))
    args = parser.parse_args()
    results: dict[tuple[int, str], list[float]] = {}
    for d in args.dims:
        for seed in args.seeds:
            for option in OPTIONS:
                loss = run(d, option, args.steps, args.lr, seed)
                results.setdefault((d, option), []).append(loss)
                print(f"d={d} seed={seed} {option:<15} final loss {loss:.5f}", file=sys.stderr)
    print(f"\nLinear regression, LAB weights, {WORKERS} workers x batch {BATCH}, RMSprop "
          f"lr {args.lr}/√t, {args.steps} steps, seeds {args.seeds}; final training loss "
          f"(noise floor {NOISE ** 2:.2f})\n")
    print("| d | full precision | 2-bit | 2-bit clipped 2.5σ | 2-bit ÷ fp | clipped ÷ fp | "
          "bound unclipped | bound clipped |")
    print("|---|---|---|---|---|---|---|---|")
    for d in args.dims:
        fp, raw, clipped = (statistics.mean(results[(d, o)]) for o in OPTIONS)
        print(f"| {d} | {fp:.4f} | {raw:.4f} | {clipped:.4f} | {raw / fp:.2f} | "
              f"{clipped / fp:.2f} | {float(grad_blowup_unclipped(d, 1.0)):.1f} | "
              f"{float(grad_blowup_clipped(2.5, 1.0)):.2f} |")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for option in OPTIONS:
        losses = [statistics.mean(results[(d, option)]) for d in args.dims]
        left.plot(args.dims, losses, marker="o", label=option)
        if option != "full precision":
            full = [statistics.mean(results[(d, "full precision")]) for d in args.dims]
            right.plot(args.dims, [q / f for q, f in zip(losses, full, strict=True)],
                       marker="o", label=option)
    left.set(xscale="log", yscale="log", xlabel="dimension d", ylabel="final training loss",
             title="Final loss (LAB weights)")
    right.set(xscale="log", xlabel="dimension d", ylabel="loss ÷ full-precision gradients",
              title="Cost of 2-bit gradients")
    right.axhline(1.0, color="gray", lw=0.8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
