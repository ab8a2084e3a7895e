"""Step time and bytes per step: each engine's own gradient exchange against distq's, 2 ranks.

    .venv/bin/python -m benchmarks.integrations [--steps 40] [--repeats 2] [--rate 1gbit]
        [--engines ...] [--eval-steps 150 --seeds 0 1]

The same 4.2 M-parameter MLP (Adam, batch 64 per rank) trains under plain DDP, Lightning's
DDPStrategy, DeepSpeed ZeRO-0 and Horovod, each once with the engine's default exchange (fp32
all-reduce) and once with distq's (2-bit stochastic codes, 512-element buckets, `scatter`, clip
2.5σ); Horovod a third time with distq's exchange after backward (`overlap=False`), which shows
what overlapping it with backward saves (Horovod's distq runs use 4 MB buckets, so there is
something to overlap). The Hugging Face Trainer (`transformers`) trains a 3.2 M-parameter GPT-2 (4
layers, width 256, AdamW, 4 sequences of 64 byte tokens per rank) instead, with distq's exchange
through `QuantizedCommCallback`. `--eval-steps N` also trains that GPT-2 for N steps per seed with
the Trainer's fp32 exchange, with distq's 2-bit exchange, and with distq's exchange plus ternary
weights, and reports the loss on held-out bytes. Both ranks run in a network namespace of their own
(needs root), so the namespace's loopback counter holds exactly their traffic: bytes per step per
rank = Δ tx_bytes / 2 / steps, headers included. Without root the counter is the host's (other
traffic leaks in; flagged). `--rate` shapes that loopback with a token bucket (both ranks share
it), a slow link. distq's own count of payload bytes is reported beside it. Runs alternate default
/ distq and repeat, because the machine's 2 cores are shared: the table gives the median of the
per-run median step times and the range over repeats.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import typing
from pathlib import Path

import torch
from torch import nn

ENGINES = ("ddp", "lightning", "deepspeed", "horovod", "transformers")
EVAL_MODES = ("default", "distq", "distq-ternary")
MODES = ("default", "distq")
# Horovod also runs distq's exchange after backward (overlap=False), to measure the overlap
ENGINE_MODES = {"horovod": ("default", "distq", "distq-serial")}
NAMESPACE = "distq-integrations"
WARMUP = 5
BATCH, FEATURES, HIDDEN, CLASSES = 64, 1024, 2048, 10
GPT_BATCH, GPT_SEQUENCE = 4, 64
LO_TX = Path("/sys/class/net/lo/statistics/tx_bytes")
BIN = Path(sys.executable).parent


# -- one run (a rank) ----------------------------------------------------------------------------
def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, FEATURES), nn.ReLU(),
        nn.Linear(FEATURES, CLASSES),
    )  # fmt: skip


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, FEATURES, generator=g)
    return x, torch.randint(0, CLASSES, (BATCH,), generator=g)


class Clock:
    """Per-step wall times and the loopback byte counter across the timed steps."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last = time.perf_counter()
        self.start_bytes = 0

    def tick(self, step: int) -> None:
        now = time.perf_counter()
        if step == WARMUP - 1:
            self.start_bytes = int(LO_TX.read_text())
        elif step >= WARMUP:
            self.times.append(now - self.last)
        self.last = now

    def result(self, steps: int, counted: int | None) -> dict:
        return {
            "step_ms": 1e3 * statistics.median(self.times),
            "wire_bytes_per_step": (int(LO_TX.read_text()) - self.start_bytes) / 2 / steps,
            "counted_bytes_per_step": None if counted is None else counted / steps,
        }


def sent(stats) -> int:
    """distq's count of the bytes this rank sent, quantized and fp32 (small buckets)."""
    return stats.bytes_sent + stats.uncompressed_bytes_sent


def worker_ddp(mode: str, steps: int) -> dict:
    import torch.distributed as dist

    from distq.comm import QuantizedCommState, quantized_hook

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ddp = nn.parallel.DistributedDataParallel(make_model())
    state = None
    if mode == "distq":
        state = QuantizedCommState(bits=2, clip=2.5)
        ddp.register_comm_hook(state, quantized_hook)
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    before = [0]
    clock = Clock()
    for step in range(WARMUP + steps):
        opt.zero_grad()
        x, y = batch(step, rank)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        clock.tick(step)
        if step == WARMUP - 1 and state is not None:
            before[0] = sent(state.stats)
    result = clock.result(steps, sent(state.stats) - before[0] if state else None)
    dist.barrier()
    return result | {"rank": rank}


def worker_lightning(mode: str, steps: int) -> dict:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy

    from distq.comm.lightning import QuantizedCommHook

    clock, before = Clock(), [0]

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def training_step(self, data, _index):
            return nn.functional.cross_entropy(self.net(data[0]), data[1])

        def on_train_batch_end(self, _outputs, _batch, index):
            clock.tick(index)
            if index == WARMUP - 1 and hook is not None:
                before[0] = sent(hook.state.stats)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    rank = int(os.environ["RANK"])
    data = [batch(step, rank) for step in range(WARMUP + steps)]
    hook = QuantizedCommHook(bits=2, clip=2.5) if mode == "distq" else None
    trainer = pl.Trainer(
        strategy=DDPStrategy(), accelerator="cpu", devices=2, max_steps=WARMUP + steps,
        callbacks=[hook] if hook else [], use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=None))
    counted = sent(hook.state.stats) - before[0] if hook else None
    return clock.result(steps, counted) | {"rank": rank}


def worker_deepspeed(mode: str, steps: int) -> dict:
    import deepspeed
    import torch.distributed as dist

    from distq.comm import QuantizedCommState
    from distq.comm.deepspeed import quantize_engine

    model = make_model()
    config = {"train_micro_batch_size_per_gpu": BATCH, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), config=config
    )
    exchange = quantize_engine(engine, QuantizedCommState(bits=2, clip=2.5)) if mode == "distq" \
        else None  # fmt: skip
    rank, before = dist.get_rank(), [0]
    clock = Clock()
    for step in range(WARMUP + steps):
        x, y = batch(step, rank)
        engine.backward(nn.functional.cross_entropy(engine(x), y))
        engine.step()
        clock.tick(step)
        if step == WARMUP - 1 and exchange is not None:
            before[0] = sent(exchange.state.stats)
    counted = sent(exchange.state.stats) - before[0] if exchange else None
    dist.barrier()
    return clock.result(steps, counted) | {"rank": rank}


def worker_horovod(mode: str, steps: int) -> dict:
    import horovod.torch as hvd

    from distq.comm.horovod import DistributedOptimizer

    hvd.init()
    model = make_model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    if mode.startswith("distq"):
        overlap = mode == "distq"
        opt = DistributedOptimizer(adam, model.named_parameters(), bits=2, clip=2.5,
                                   bucket_cap_mb=4, overlap=overlap)  # fmt: skip
    else:
        opt = hvd.DistributedOptimizer(adam, named_parameters=model.named_parameters())
    rank, before = hvd.rank(), [0]
    clock = Clock()
    for step in range(WARMUP + steps):
        opt.zero_grad()
        x, y = batch(step, rank)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        clock.tick(step)
        if step == WARMUP - 1 and mode != "default":
            before[0] = sent(opt.stats)
    counted = sent(opt.stats) - before[0] if mode != "default" else None
    return clock.result(steps, counted) | {"rank": rank}


def gpt2(seed: int) -> nn.Module:
    """The Trainer benchmark's model: GPT-2, 4 layers of width 256 over 256 byte tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=GPT_SEQUENCE, n_embd=256, n_layer=4, n_head=4,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


def byte_corpus() -> tuple[list[dict], list[dict]]:
    """Training and held-out sequences: byte tokens of four standard-library modules (the last
    10% of the bytes held out)."""
    modules = (argparse, difflib, inspect, typing)
    data = torch.tensor(list(b"".join(Path(m.__file__).read_bytes() for m in modules)))
    rows = data[: len(data) // GPT_SEQUENCE * GPT_SEQUENCE].view(-1, GPT_SEQUENCE)
    split = int(0.9 * len(rows))
    return [{"input_ids": r, "labels": r} for r in rows[:split]], \
        [{"input_ids": r, "labels": r} for r in rows[split:]]  # fmt: skip


def trainer_for(mode: str, steps: int, seed: int, callbacks: list) -> tuple[typing.Any, ...]:
    """A Trainer over `gpt2(seed)` for `steps` steps; with mode distq-ternary, ternary weights."""
    from transformers import Trainer, TrainingArguments

    from distq.comm.transformers import QuantizedCommCallback
    from distq.optim import QuantizedOptimizer

    model = gpt2(seed)
    optimizers = (None, None)
    if mode == "distq-ternary":
        adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
        optimizers = (QuantizedOptimizer(adam, model, "ternary"), None)
    hook = QuantizedCommCallback(bits=2, clip=2.5) if mode != "default" else None
    args = TrainingArguments(
        "runs/benchmark-transformers", max_steps=steps, per_device_train_batch_size=GPT_BATCH,
        per_device_eval_batch_size=32, learning_rate=1e-3, seed=seed, use_cpu=True,
        ddp_find_unused_parameters=False, logging_strategy="no", save_strategy="no",
        report_to=[], disable_tqdm=True,
    )  # fmt: skip
    train, held_out = byte_corpus()
    callbacks = callbacks + ([hook] if hook else [])
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out[:256],
                      optimizers=optimizers, callbacks=callbacks)  # fmt: skip
    return trainer, hook


def worker_transformers(mode: str, steps: int, seed: int = 0) -> dict:
    from transformers import TrainerCallback

    clock, before = Clock(), [0]

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick(state.global_step - 1)
            if state.global_step == WARMUP and hook is not None:
                before[0] = sent(hook.state.stats)

    trainer, hook = trainer_for(mode, WARMUP + steps, seed, [Tick()])
    trainer.train()
    counted = sent(hook.state.stats) - before[0] if hook else None
    result = clock.result(steps, counted) | {"rank": trainer.args.process_index}
    trainer = hook = None  # drop the DDP model before closing the group
    return close_gloo(result)


def close_gloo(result: dict) -> dict:
    """Free the DDP model, then the process group: a live DDP on gloo at interpreter exit
    sometimes aborts the process (ENVIRONMENT.md)."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return result


def worker_transformers_eval(mode: str, steps: int, seed: int = 0) -> dict:
    """Train `steps` steps, then the loss on held-out bytes (gathered over both ranks)."""
    trainer, _ = trainer_for(mode, steps, seed, [])
    trainer.train()
    result = {"eval_loss": trainer.evaluate()["eval_loss"], "seed": seed,
              "rank": trainer.args.process_index}  # fmt: skip
    del trainer
    return close_gloo(result)


WORKERS = {"ddp": worker_ddp, "lightning": worker_lightning, "deepspeed": worker_deepspeed,
           "horovod": worker_horovod, "transformers": worker_transformers,
           "transformers-eval": worker_transformers_eval}  # fmt: skip


# -- the driver ----------------------------------------------------------------------------------
def launcher(engine: str) -> list[str]:
    if engine == "horovod":
        return [str(BIN / "horovodrun"), "-np", "2", "--gloo", str(BIN / "python")]
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2"]


def namespace_prefix(rate: str | None) -> list[str]:
    """`ip netns exec` into a fresh namespace with only `lo` up (root), else nothing. With
    `rate` (tc syntax, e.g. 1gbit) the namespace's loopback is shaped by a token bucket: both
    ranks share it, as two hosts would share one link direction-wise."""
    if os.geteuid() != 0:
        if rate:
            raise SystemExit("--rate needs root (a network namespace and tc)")
        print("not root: the loopback byte counter includes other traffic on this host")
        return []
    subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)
    subprocess.run(["ip", "netns", "add", NAMESPACE], check=True)
    subprocess.run(["ip", "-n", NAMESPACE, "link", "set", "lo", "up"], check=True)
    if rate:
        subprocess.run(
            ["ip", "netns", "exec", NAMESPACE, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
             "rate", rate, "burst", "512kb", "latency", "100ms"],
            check=True,
        )  # fmt: skip
    return ["ip", "netns", "exec", NAMESPACE]


def run(prefix: list[str], engine: str, mode: str, steps: int, out: Path, seed: int = 0) -> dict:
    command = [*prefix, *launcher(engine), str(Path(__file__).resolve()), "--worker", engine,
               mode, "--steps", str(steps), "--seed", str(seed), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{engine}/{mode} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(out.read_text())


def table(results: dict[tuple[str, str], list[dict]]) -> str:
    """Markdown: per engine and exchange, step time and bytes per step per rank."""
    rows = [
        "| engine | exchange | step ms: median (range) | wire bytes/step/rank | "
        "distq payload/step/rank | fewer bytes |",
        "|---|---|---|---|---|---|",
    ]
    labels = {"default": "engine default (fp32)", "distq": "distq 2-bit scatter",
              "distq-serial": "distq 2-bit scatter, after backward"}  # fmt: skip
    for engine in ENGINES:
        modes = ENGINE_MODES.get(engine, MODES)
        if not all((engine, m) in results for m in modes):
            continue
        wire = {m: statistics.median(r["wire_bytes_per_step"] for r in results[engine, m])
                for m in modes}  # fmt: skip
        for mode in modes:
            runs = results[engine, mode]
            times = [r["step_ms"] for r in runs]
            counted = runs[0]["counted_bytes_per_step"]
            rows.append(
                f"| {engine} | {labels[mode]} | {statistics.median(times):.1f} "
                f"({min(times):.1f}–{max(times):.1f}) | {wire[mode] / 1e6:.3f} MB | "
                + ("—" if counted is None else f"{counted / 1e6:.3f} MB")
                + f" | {wire['default'] / wire[mode]:.1f}× |"
            )
    return "\n".join(rows)


def eval_table(results: dict[str, list[dict]], steps: int) -> str:
    """Markdown: held-out loss per Trainer mode and seed, after the same number of steps."""
    labels = {"default": "Trainer default (fp32 all-reduce)", "distq": "distq 2-bit scatter",
              "distq-ternary": "distq 2-bit + ternary weights"}  # fmt: skip
    rows = [f"| exchange (GPT-2, {steps} steps) | held-out loss: mean | per seed |",
            "|---|---|---|"]  # fmt: skip
    for mode in EVAL_MODES:
        losses = [r["eval_loss"] for r in results.get(mode, [])]
        if losses:
            per_seed = ", ".join(f"{x:.4f}" for x in losses)
            rows.append(f"| {labels[mode]} | {statistics.mean(losses):.4f} | {per_seed} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--rate", help="shape the ranks' link, tc syntax (e.g. 1gbit; root)")
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    parser.add_argument("--eval-steps", type=int, default=0,
                        help="also train the Trainer's GPT-2 this long per seed and mode, then "
                        "report its held-out loss")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        engine, mode = args.worker
        seeded = {"seed": args.seed} if engine.startswith("transformers") else {}
        result = WORKERS[engine](mode, args.steps, **seeded)
        if result["rank"] == 0:
            args.out.write_text(json.dumps(result))
        return

    prefix = namespace_prefix(args.rate)
    results: dict[tuple[str, str], list[dict]] = {}
    evals: dict[str, list[dict]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                for engine in args.engines:
                    modes = ENGINE_MODES.get(engine, MODES)
                    order = modes if repeat % 2 == 0 else modes[::-1]  # alternate the first
                    for mode in order:
                        out = Path(tmp) / f"{engine}-{mode}-{repeat}.json"
                        result = run(prefix, engine, mode, args.steps, out)
                        results.setdefault((engine, mode), []).append(result)
                        print(f"{engine:9s} {mode:12s} repeat {repeat}: {result}", flush=True)
            for seed in args.seeds if args.eval_steps else []:
                for mode in EVAL_MODES:
                    out = Path(tmp) / f"eval-{mode}-{seed}.json"
                    result = run(prefix, "transformers-eval", mode, args.eval_steps, out, seed)
                    evals.setdefault(mode, []).append(result)
                    print(f"eval {mode:13s} seed {seed}: {result}", flush=True)
    finally:
        if prefix:
            subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)
    if args.json:
        runs = {f"{e}/{m}": r for (e, m), r in results.items()}
        args.json.write_text(json.dumps(runs | {f"eval/{m}": r for m, r in evals.items()}))
    print(table(results))
    if evals:
        print(eval_table(evals, args.eval_steps))


if __name__ == "__main__":
    main()
