"""ICLR 2019 "Analysis of Quantized Models", Figure 3a: linear regression, loss vs dimension d.

The paper's protocol, followed here: w* ~ U[−0.5, 0.5]^d, x ~ U[−0.5, 0.5]^d,
y = xᵀw* + ε with ε ~ N(0, 0.2²); 4 workers with a batch of B = 64 each; loss
f_t(w) = ‖X_t w − y_t‖²/(2B) (averaged over the workers); LAB (loss-aware binary) weights through
distq's QuantizedOptimizer over RMSprop with step η_t = η/√t, η = 0.03; gradients averaged in
full precision, or each worker's gradient sent through distq's 2-bit stochastic quantizer with
one scale per tensor (s = ‖g‖_∞); the reported loss is the running average Σ_{t≤T} f_t(ŵ_t)/T
(the regret's R(T)/T + f(w*) that the paper's Theorem bounds), taken where training stops.

Deviations, each flagged in the output and in benchmarks/README.md:
- Stop rule: training stops at the first T (a multiple of `--window`) at which Σf_t/T fell by
  less than `--tol` (relative) over the last `--window` steps, or at `--max-steps`. The
  parameters of this rule are this script's; a run that reaches the cap is marked.
- Data: every step draws a fresh batch (online), so the expected f_t is the population loss
  f(w) = (‖w − w*‖²/12 + 0.2²)/2 (Cov x = I/12), which the floor below is exact for.
- RMSprop's decay 0.99 and ε = 1e-8 are torch's defaults.
- Extra arm, not in the paper's figure: 2-bit gradients clipped at 2.5 times the clipping
  scale of `distq.comm.clipping` before quantization (the theory's clipped case).

Besides the paper's loss, the table gives two exact quantities. The binary-weight floor: the
smallest population loss any binary weight vector ŵ = α·b (α > 0, b ∈ {−1, +1}^d) reaches.
For fixed α, ‖αb − w*‖² is smallest at b = sign(w*); then α = ‖w*‖₁/d, so the floor is
((‖w*‖² − ‖w*‖₁²/d)/12 + 0.2²)/2 for the drawn w*, computed in float64 (≈ d/1152 + 0.02 on
average). And the population loss of the last ŵ_T, from the same formula. For the quantized
arms the measured gradient blow-up, the mean over steps and workers of ‖Q(x)‖²/‖g‖² (x the
vector quantized, g the worker's unclipped gradient: the normalization of the theory's clipped
bound), is shown beside distq.theory's bounds for Δ_g = 1.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/theory_linear_regression.py
    .venv/bin/python benchmarks/theory_linear_regression.py --render-only   # from the JSON

Raw runs go to benchmarks/theory_linear_regression.json; --render-only redraws the table and
the plot from it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from distq.comm import Key, StochasticQuantizer, clipping
from distq.optim import QuantizedOptimizer
from distq.theory import grad_blowup_clipped, grad_blowup_unclipped

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "theory_linear_regression.json"
PLOT = HERE / "theory_linear_regression.png"
ARMS: dict[str, float | None] = {  # name -> clip multiple (None: not clipped)
    "fp gradients": None,
    "2-bit": None,
    "2-bit clipped (extra)": 2.5,
}
WORKERS, BATCH, NOISE, X_VARIANCE = 4, 64, 0.2, 1 / 12
CLIP = 2.5


def population_loss(w: torch.Tensor, w_star: torch.Tensor) -> float:
    """E f(w) over fresh (x, y): (‖w − w*‖²·Var x + σ²)/2, exact because Cov x = I/12."""
    gap = (w.double() - w_star.double()).square().sum().item()
    return (gap * X_VARIANCE + NOISE**2) / 2


def binary_floor(w_star: torch.Tensor) -> float:
    """The smallest population loss over ŵ = α·b, b ∈ {±1}^d: b = sign(w*), α = ‖w*‖₁/d."""
    w = w_star.double()
    best = w.abs().mean() * torch.sign(w)
    return population_loss(best, w_star)


def run(d: int, arm: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one arm at dimension d until the stop rule; return its record."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.rand(d, generator=g) - 0.5
    torch.manual_seed(seed)
    model = nn.Linear(d, 1, bias=False)
    base = torch.optim.RMSprop(model.parameters(), lr=args.eta, alpha=0.99)
    opt = QuantizedOptimizer(base, model, scheme="binary", keep_full_precision=(), clip_latent=None)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / math.sqrt(t + 1))
    quantizer = StochasticQuantizer(bits=2, bucket_size=None)
    clip = ARMS[arm]
    total, averages, window_losses, blowups = 0.0, [], [], []
    started = time.perf_counter()
    steps, capped = 0, True
    while steps < args.max_steps:
        x = torch.rand(WORKERS, BATCH, d, generator=g) - 0.5
        y = x @ w_star + NOISE * torch.randn(WORKERS, BATCH, generator=g)
        residual = x @ model.weight.detach().reshape(-1) - y  # (workers, B), at ŵ_t
        loss = residual.square().sum().item() / (2 * BATCH * WORKERS)
        grads = torch.einsum("wbd,wb->wd", x, residual) / BATCH  # ∇ of ‖Xw − y‖²/2B per worker
        if arm != "fp gradients":
            sent = []
            for worker, grad in enumerate(grads):
                vector = grad.clone()
                if clip is not None:
                    clipping.clip_by_rms_(vector, clip)
                key = Key(seed=seed, step=steps, rank=worker)
                decoded = quantizer.decompress(quantizer.compress(vector, key), d)
                blowups.append((decoded.square().sum() / grad.square().sum()).item())
                sent.append(decoded)
            grads = torch.stack(sent)
        model.weight.grad = grads.mean(0).reshape(1, d)
        opt.step()
        schedule.step()
        steps += 1
        total += loss
        window_losses.append(loss)
        if steps % args.window == 0:
            averages.append(total / steps)
            if len(averages) >= 2 and averages[-2] - averages[-1] < args.tol * averages[-1]:
                capped = False
                break
            if steps < args.max_steps:
                window_losses.clear()
    return {
        "d": d,
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "capped": capped,
        "running_average": total / steps,
        "last_window_loss": statistics.mean(window_losses),
        "final_population_loss": population_loss(model.weight.detach().reshape(-1), w_star),
        "binary_floor": binary_floor(w_star),
        "blowup": statistics.mean(blowups) if blowups else None,
        "seconds": time.perf_counter() - started,
    }


def mean_of(records: list[dict], d: int, arm: str, key: str) -> float:
    return statistics.mean(r[key] for r in records if r["d"] == d and r["arm"] == arm)


def table(data: dict) -> str:
    """The markdown tables: the paper's loss and the exact quantities, then the blow-up."""
    records, meta = data["runs"], data["meta"]
    dims = sorted({r["d"] for r in records})
    lines = [
        f"Linear regression, LAB weights, {WORKERS} workers x batch {BATCH}, RMSprop "
        f"η = {meta['eta']}/√t, loss ‖Xw − y‖²/2B, stop: Σf_t/T fell < {meta['tol']:g} "
        f"(relative) over {meta['window']} steps or {meta['max_steps']} steps, seeds "
        f"{meta['seeds']}; mean over seeds; commit {meta['commit']}, {meta['date']}",
        "",
        "| d | arm | Σf_t/T at stop | f(ŵ_T) population | best binary ŵ (exact) | "
        "f(ŵ_T) − floor | steps (per seed) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for d in dims:
        for arm in ARMS:
            runs = [r for r in records if r["d"] == d and r["arm"] == arm]
            if not runs:
                continue
            final = mean_of(records, d, arm, "final_population_loss")
            floor = mean_of(records, d, arm, "binary_floor")
            steps = ", ".join(f"{r['steps']}{' (cap)' if r['capped'] else ''}" for r in runs)
            lines.append(
                f"| {d} | {arm} | {mean_of(records, d, arm, 'running_average'):.4f} | "
                f"{final:.4f} | {floor:.4f} | {final - floor:+.4f} | {steps} |"
            )
    lines += [
        "",
        f"Gradient blow-up E‖Q(x)‖²/‖g‖² (x: the vector quantized, g: the unclipped gradient), "
        f"mean over steps and workers, and distq.theory's bounds for Δ_g = 1 (2 bits), c = {CLIP}",
        "",
        "| d | 2-bit measured | bound (1+√d)/2+1 | clipped measured | bound √(2/π)c+1 | "
        "Σf_t/T: 2-bit ÷ fp | clipped ÷ fp |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for d in dims:
        fp = mean_of(records, d, "fp gradients", "running_average")
        raw = mean_of(records, d, "2-bit", "running_average")
        clipped = mean_of(records, d, "2-bit clipped (extra)", "running_average")
        lines.append(
            f"| {d} | {mean_of(records, d, '2-bit', 'blowup'):.2f} | "
            f"{float(grad_blowup_unclipped(d, 1.0)):.2f} | "
            f"{mean_of(records, d, '2-bit clipped (extra)', 'blowup'):.2f} | "
            f"{float(grad_blowup_clipped(CLIP, 1.0)):.2f} | {raw / fp:.3f} | {clipped / fp:.3f} |"
        )
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """Left: Σf_t/T and the exact binary floor vs d; right: measured blow-up and bounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = data["runs"]
    dims = sorted({r["d"] for r in records})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for arm in ARMS:
        left.plot(
            dims,
            [mean_of(records, d, arm, "running_average") for d in dims],
            marker="o",
            label=f"{arm}: Σf_t/T",
        )
    left.plot(
        dims,
        [mean_of(records, d, "fp gradients", "binary_floor") for d in dims],
        color="black",
        ls="--",
        label="best binary ŵ (exact)",
    )
    left.axhline(NOISE**2 / 2, color="gray", lw=0.8, label="noise floor σ²/2")
    right.plot(
        dims,
        [mean_of(records, d, "2-bit", "blowup") for d in dims],
        marker="o",
        label="2-bit, measured",
    )
    right.plot(
        dims,
        [mean_of(records, d, "2-bit clipped (extra)", "blowup") for d in dims],
        marker="o",
        label=f"2-bit clipped {CLIP}, measured",
    )
    right.plot(
        dims,
        [float(grad_blowup_unclipped(d, 1.0)) for d in dims],
        ls="--",
        color="tab:blue",
        label="bound 1 + (1+√d)/2",
    )
    right.axhline(
        float(grad_blowup_clipped(CLIP, 1.0)),
        ls="--",
        color="tab:orange",
        label="bound 1 + √(2/π)·c",
    )
    for ax, ylabel, title in (
        (left, "loss ‖Xw − y‖²/2B", "Running average loss at stop (LAB weights)"),
        (right, "E‖Q(x)‖² / ‖g‖²", "Gradient blow-up"),
    ):
        ax.set(xscale="log", yscale="log", xlabel="dimension d", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def git(*args: str) -> str:
    """The output of a git command in this repository."""
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, cwd=HERE, check=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eta", type=float, default=0.03, help="η of η_t = η/√t")
    parser.add_argument("--window", type=int, default=500, help="steps between stop checks")
    parser.add_argument(
        "--tol",
        type=float,
        default=1e-3,
        help="stop once Σf_t/T fell by less than this (relative) in a window",
    )
    parser.add_argument("--max-steps", type=int, default=5000, help="cap on steps")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="redraw the table and plot from the JSON, run nothing",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.render_only:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("diff", "--name-only", "HEAD", "--", ":/distq", ":/comm", ":/theory")
        if changed:  # library files that differ from the commit: part of the record
            commit += " + uncommitted " + ", ".join(changed.split())
        data = {
            "meta": {
                "eta": args.eta,
                "window": args.window,
                "tol": args.tol,
                "max_steps": args.max_steps,
                "seeds": args.seeds,
                "commit": commit,
                "date": time.strftime("%Y-%m-%d", time.gmtime()),
                "torch": torch.__version__,
            },
            "runs": [],
        }
        for d in args.dims:
            for seed in args.seeds:
                for arm in ARMS:
                    record = run(d, arm, seed, args)
                    data["runs"].append(record)
                    print(json.dumps(record), file=sys.stderr, flush=True)
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    data = json.loads(RESULTS.read_text())
    print(table(data))
    plot(data, PLOT)
    print(f"\nplot: {PLOT}")


if __name__ == "__main__":
    main()
