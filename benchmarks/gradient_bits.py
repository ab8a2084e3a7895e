"""Gradient widths by sensitivity vs uniform gradient bits at the same bytes on the wire (issue 24
item 4): real 2-rank gloo DDP with distq's hook, ternary weights (QuantizedOptimizer over Adam).

Per seed and option a `torchrun --nproc_per_node=2` job of this script (--worker):
- uniform: every gradient at `--uniform-bits` (3) from the start;
- loss / update: a calibration run of `--calibrate` steps at the uniform width collects each rank's
  own gradient at its last `--samples` steps and the optimizer's curvature d;
  `comm/gradient_bits.py` turns them into C_i(m) (weight 1/d: metric 'loss'; 1/d²: 'update') and
  widths from `--candidates`; the budget is the
  largest (in steps of 0.001 bits) whose predicted bytes a step (`bytes_sent`, one DDP bucket) do
  not exceed the uniform width's; then training restarts from the same initialization with those
  widths (`bits_by_name`) from step 0.
Both report the bytes the hook counted (CompressionStats.bytes_sent of rank 0), which the run checks
against the prediction. DISTQ_COMPILE=0 (eager codec kernels).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/gradient_bits.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.digits_runs import accuracy_cells

OPTIONS = ("uniform", "loss", "update")  # uniform widths, or allocated with weight 1/d, 1/d²


def run_worker(args: argparse.Namespace) -> None:
    """One 2-rank run (under torchrun): train, score rank 0's replica, write the record."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from distq.comm import QuantizedCommState, quantized_hook
    from distq.comm.exchange import ExchangeSettings
    from distq.comm.gradient_bits import allocate_gradient_bits, bytes_sent, gradient_costs
    from distq.launch import recipes
    from distq.launch.data import ShardedBatches
    from distq.optim import QuantizedOptimizer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = recipes.load(args.recipe, 0.2, args.seed)
    hook = {"clip": 2.5, "bucket_size": 512, "collective": "scatter", "seed": args.seed}
    settings = ExchangeSettings(bits=args.uniform_bits, **hook)
    batches = ShardedBatches(len(data.train_y), args.batch_size, rank, world, args.seed)
    total = args.epochs * batches.steps_per_epoch

    def start(bits_by_name: dict[str, int]):
        torch.manual_seed(args.seed)
        model = recipes.build_model(args.recipe, args.hidden, args.depth)
        ddp = DistributedDataParallel(model, bucket_cap_mb=100)  # one bucket after the rebuild
        state = QuantizedCommState(
            bits=args.uniform_bits, bits_by_name=bits_by_name, model=model, **hook
        )
        ddp.register_comm_hook(state, quantized_hook)
        base = torch.optim.Adam(model.parameters(), lr=args.lr)
        opt = QuantizedOptimizer(base, model, "ternary")
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
        return model, ddp, state, opt, schedule

    def steps():
        for epoch in range(args.epochs):
            yield from batches.epoch(epoch)

    def train_step(ddp, opt, schedule, idx) -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ddp(data.train_x[idx]), data.train_y[idx]).backward()
        opt.step()
        schedule.step()

    record: dict = {"option": args.option, "seed": args.seed}
    widths: dict[str, int] = {}
    model, ddp, state, opt, schedule = start({})
    numel = {n: p.numel() for n, p in model.named_parameters()}

    def layout_of(bits: dict[str, int]) -> list[list[tuple[int, int]]]:
        return [[(numel[n], bits.get(n, args.uniform_bits)) for n in numel]]

    if args.option != "uniform":
        names, sizes = list(numel), list(numel.values())
        samples = []
        for i, idx in enumerate(steps()):
            if i == args.calibrate:
                break
            if i >= args.calibrate - args.samples:  # this rank's own gradient, no exchange
                model.zero_grad(set_to_none=True)
                x, y = data.train_x[idx], data.train_y[idx]
                nn.functional.cross_entropy(model(x), y).backward()
                own = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                gathered = [torch.empty_like(own) for _ in range(world)]
                dist.all_gather(gathered, own)
                samples.append([dict(zip(names, g.split(sizes), strict=True)) for g in gathered])
            train_step(ddp, opt, schedule, idx)
        curvature = {n: opt.curvature(p) for n, p in model.named_parameters()}
        costs = gradient_costs(samples, curvature, args.candidates, settings, args.option)
        uniform_bytes = bytes_sent(layout_of({}), settings, world)
        budget = float(args.uniform_bits)
        while True:  # the largest budget whose bytes fit the uniform width's
            chosen = allocate_gradient_bits(costs, numel, budget)
            if bytes_sent(layout_of(chosen.bits), settings, world) <= uniform_bytes:
                break
            budget = round(budget - 0.001, 3)
        widths = chosen.bits
        record.update(budget=budget, widths=widths, average_bits=chosen.average_bits,
                      costs=chosen.record()["costs"])  # fmt: skip
    state.close()
    del ddp
    model, ddp, state, opt, schedule = start(widths)
    for idx in steps():
        train_step(ddp, opt, schedule, idx)
    quantized_steps = total - state.start_iter
    record.update(
        bytes_per_step=state.stats.bytes_sent / quantized_steps,
        fp32_bytes_per_step=state.stats.fp32_allreduce_bytes / quantized_steps,
        test_accuracy=recipes.accuracy(model, data.test_x, data.test_y),
        test_loss=test_loss(model, data.test_x, data.test_y),
        steps=total,
    )
    record["predicted_bytes_per_step"] = bytes_sent(layout_of(widths), settings, world)
    if rank == 0:
        Path(args.out).write_text(json.dumps(record, indent=1))
    state.close()
    dist.destroy_process_group()


def test_loss(model, x, y) -> float:
    """Mean cross-entropy of the model (quantized weights, eval mode) on the test set."""
    import torch
    from torch import nn

    model.eval()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def launch(args: argparse.Namespace, option: str, seed: int, out: Path) -> dict:
    """The worker for one option and seed as a real 2-rank torchrun job; its record."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        __file__, "--worker", "--option", option, "--seed", str(seed), "--out", str(out),
        *shared_flags(args),
    ]  # fmt: skip
    env = {**os.environ, "DISTQ_COMPILE": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(out.read_text())


def shared_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--recipe", args.recipe, "--hidden", str(args.hidden), "--depth", str(args.depth),
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--uniform-bits", str(args.uniform_bits), "--calibrate", str(args.calibrate),
        "--samples", str(args.samples),
        "--candidates", *map(str, args.candidates),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--recipe", default="digits", choices=("digits", "cifar"))
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--uniform-bits", type=int, default=3)
    parser.add_argument("--candidates", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--calibrate", type=int, default=20, help="calibration steps")
    parser.add_argument("--samples", type=int, default=4, help="gradients sampled (last steps)")
    parser.add_argument("--json", type=Path, default=None, help="write every record here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--option", choices=OPTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for option in OPTIONS:
                record = launch(args, option, seed, Path(tmp) / f"{option}-{seed}.json")
                records.append(record)
                if record["bytes_per_step"] != record["predicted_bytes_per_step"]:
                    raise RuntimeError(f"hook bytes differ from bytes_sent: {record}")
                print(f"seed {seed} {option:<12} {100 * record['test_accuracy']:.2f}% "
                      f"{record['bytes_per_step']:.0f} B/step", file=sys.stderr)  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps({"flags": shared_flags(args), "runs": records}, indent=1))
    print(f"\n{args.recipe}, ternary weights, 2 ranks, {args.epochs} epochs, seeds {args.seeds}\n")
    print("| gradients | bytes sent a step, rank 0 (per seed) | average bits | test accuracy % "
          "(mean ± sd) | per seed | test loss (mean ± sd) | per seed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for option in OPTIONS:
        runs = [r for r in records if r["option"] == option]
        mean_sd, per_seed = accuracy_cells([100 * r["test_accuracy"] for r in runs])
        sent = ", ".join(f"{r['bytes_per_step']:.0f}" for r in runs)
        bits = ", ".join(f"{r.get('average_bits', args.uniform_bits):.3f}" for r in runs)
        loss = [r["test_loss"] for r in runs]
        loss_sd = statistics.stdev(loss) if len(loss) > 1 else 0.0
        print(f"| {option} | {sent} | {bits} | {mean_sd} | {per_seed} | "
              f"{statistics.mean(loss):.4f} ± {loss_sd:.4f} | "
              f"{', '.join(f'{v:.4f}' for v in loss)} |")  # fmt: skip


if __name__ == "__main__":
    main()
