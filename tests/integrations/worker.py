"""One training run of the same quantized model under one engine, for the integration tests.

    torchrun --nproc_per_node=2 worker.py ddp|deepspeed|lightning OUT_DIR [--steps N] ...
    horovodrun -np 2 --gloo python worker.py horovod OUT_DIR

Every engine trains the same MLP (ternary weights through QuantizedOptimizer(Adam), 2-bit
gradients, scatter, clip 2.5σ) on the same synthetic data, each rank on its own shard. Each rank
writes OUT_DIR/rank<r>.pt: its final state dict, its per-step losses, distq's byte counters and
the exchange's bucket sizes, so the test can compare replicas and engines.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
from pathlib import Path

import torch
from torch import nn

BATCH = 32
FEATURES, HIDDEN, CLASSES = 32, 256, 10


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    )


def batch(step: int, rank: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s micro-batch `micro` of step `step`: a fixed random teacher's labels."""
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    x = torch.randn(BATCH, FEATURES, generator=g)
    teacher = torch.Generator().manual_seed(7)
    w = torch.randn(FEATURES, CLASSES, generator=teacher)
    return x, (x @ w).argmax(1)


def quantized_adam(model: nn.Module, params=None, lr: float = 3e-3):
    from distq.optim import QuantizedOptimizer

    adam = torch.optim.Adam(model.parameters() if params is None else params, lr=lr)
    return QuantizedOptimizer(adam, model, scheme="ternary")


def comm_state(args):
    from distq.comm import QuantizedCommState

    return QuantizedCommState(bits=args.bits, clip=2.5, collective=args.collective)


def save(out: Path, rank: int, model: nn.Module, losses: list[float], **extra) -> None:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state": state, "losses": losses, **extra}, out / f"rank{rank}.pt")


def train(model: nn.Module, opt, rank: int, steps: int) -> list[float]:
    """A plain loop (DDP, Horovod): this rank's loss at every step."""
    losses = []
    for step in range(steps):
        opt.zero_grad()
        x, y = batch(step, rank)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def stats_dict(stats) -> dict:
    return {
        "bytes_sent": stats.bytes_sent,
        "steps": stats.steps,
        "uncompressed_bytes_sent": stats.uncompressed_bytes_sent,
    }


def run_ddp(args) -> None:
    import torch.distributed as dist

    from distq.comm import quantized_hook

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ddp = nn.parallel.DistributedDataParallel(make_model())
    state = comm_state(args)
    ddp.register_comm_hook(state, quantized_hook)
    opt = quantized_adam(ddp)
    losses = train(ddp, opt, rank, args.steps)
    save(
        args.out,
        rank,
        ddp.module,
        losses,
        stats=stats_dict(state.compression_stats()),
        buckets=[sum(p.numel() for p in ddp.parameters())],
    )
    del ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def ds_config(args) -> dict:
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": args.accumulation,
        "gradient_clipping": args.grad_clip,
        "steps_per_print": 10**9,
    }


def run_deepspeed(args) -> None:
    import deepspeed
    import torch.distributed as dist

    from distq.comm.deepspeed import quantize_engine

    model = make_model()
    config = ds_config(args)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=lambda params: quantized_adam(model, params), config=config
    )
    rank = dist.get_rank()
    exchange = quantize_engine(engine, comm_state(args))
    engine.allreduce_gradients = _refuse  # the engine's own all-reduce must never run
    losses = []
    for step in range(args.steps):
        total = 0.0
        for micro in range(args.accumulation):
            x, y = batch(step, rank, micro)
            loss = nn.functional.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
            total += loss.item() / args.accumulation
        losses.append(total)
    save(
        args.out,
        rank,
        engine.module,
        losses,
        stats=stats_dict(exchange.state.compression_stats()),
        buckets=[sum(p.numel() for p in b) for b in exchange.buckets],
        comm_threads=sum(t.name == "distq-comm" for t in threading.enumerate()),
    )
    dist.barrier()


def run_deepspeed_check(args) -> None:
    """Gradient accumulation and clipping under DeepSpeed with distq's exchange (8-bit codes,
    plain SGD): at each boundary the exchanged gradient must match the fp32 mean over ranks
    and micro-batches, and the step must apply DeepSpeed's clipping to that averaged gradient."""
    import copy

    import deepspeed
    import torch.distributed as dist

    from distq.comm import QuantizedCommState
    from distq.comm.deepspeed import quantize_engine

    model = make_model()
    reference = copy.deepcopy(model)
    config = ds_config(args)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    quantize_engine(engine, QuantizedCommState(bits=8, clip=None, start_iter=2))
    errors, clip_errors, norms = [], [], []
    for step in range(args.steps):
        reference.load_state_dict(engine.module.state_dict())
        reference.zero_grad()
        for r in range(world):
            for micro in range(args.accumulation):
                x, y = batch(step, r, micro)
                loss = nn.functional.cross_entropy(reference(x), y) / (world * args.accumulation)
                loss.backward()
        for micro in range(args.accumulation):
            x, y = batch(step, rank, micro)
            engine.backward(nn.functional.cross_entropy(engine(x), y))
            if micro < args.accumulation - 1:
                engine.step()
        grads = [p.grad.clone() for p in engine.module.parameters()]
        before = [p.detach().clone() for p in engine.module.parameters()]
        engine.step()
        flat = torch.cat([g.reshape(-1) for g in grads])
        ref = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
        errors.append(float((flat - ref).norm() / ref.norm()))
        norm = float(flat.norm())
        norms.append(norm)
        coef = min(1.0, args.grad_clip / (norm + 1e-6))
        moved = torch.cat(
            [
                (b - p.detach()).reshape(-1)
                for b, p in zip(before, engine.module.parameters(), strict=True)
            ]
        )
        clip_errors.append(float((moved - coef * flat).norm() / (coef * flat).norm()))
    save(args.out, rank, engine.module, [], errors=errors, clip_errors=clip_errors, norms=norms)
    dist.barrier()


def _refuse(*_args, **_kwargs):
    raise AssertionError("DeepSpeed's own gradient all-reduce ran although distq switched it off")


def run_horovod(args) -> None:
    import horovod.torch as hvd

    from distq.comm.horovod import DistributedOptimizer

    hvd.init()
    rank = hvd.rank()
    model = make_model()
    opt = DistributedOptimizer(
        quantized_adam(model),
        model.named_parameters(),
        bits=args.bits,
        collective=args.collective,
        start_iter=2,  # the DDP reference's fp32 warm-up, so the two runs are comparable
    )
    losses = train(model, opt, rank, args.steps)
    save(
        args.out,
        rank,
        model,
        losses,
        stats=stats_dict(opt.compression_stats()),
        buckets=[sum(p.numel() for p in b) for b in opt.buckets],
    )


def run_horovod_features(args) -> None:
    """The DDP hook's features through Horovod: a 4-bit layer (bits_by_name), a keep mask,
    error sampling every 2 steps, 2 backward passes a step; once overlapping backward and once
    not. Saves both final states, how many buckets had started when backward returned, the
    measured errors, and whether a NaN gradient raised FloatingPointError."""
    import horovod.torch as hvd

    from distq.comm.horovod import DistributedOptimizer

    hvd.init()
    rank = hvd.rank()
    results = {}
    for overlap in (True, False):
        model = make_model()
        first, rows = model[0].weight, torch.arange(HIDDEN) % 3 != 0
        opt = DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
            bucket_cap_mb=0.1, overlap=overlap, backward_passes_per_step=2, start_iter=1,
            bits=2, bits_by_name={"2.weight": 4}, error_every=2, min_numel=0,
        )  # fmt: skip
        mask = rows[:, None].expand_as(first)
        opt.set_keep_mask(lambda p, first=first, mask=mask: mask if p is first else None)
        started = []
        for step in range(args.steps):
            opt.zero_grad()
            for micro in range(2):
                x, y = batch(step, rank, micro)
                nn.functional.cross_entropy(model(x), y).backward()
            started.append(opt.scheduler.started())
            opt.step()
            if step == 0:  # the fp32 warm-up step exchanges every entry
                after_warmup = first.detach().clone()
        stats = opt.compression_stats()
        unsent_rows_unchanged = torch.equal(first.detach()[~rows], after_warmup[~rows])
        x, _ = batch(0, rank)
        model(x).sum().mul(float("nan")).backward()
        try:
            opt.step()
            raised = False
        except FloatingPointError:
            raised = True
        opt.close()
        results[overlap] = {
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "started": started,
            "buckets": len(opt.buckets),
            "relative_error": stats.relative_error,
            "requant": stats.requant_relative_error,
            "bytes_sent": stats.bytes_sent,
            "raised": raised,
            "unsent_rows_unchanged": unsent_rows_unchanged,
        }
    torch.save(results, args.out / f"rank{rank}.pt")


def run_lightning(args) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import DDPStrategy

    from distq.comm.lightning import QuantizedCommHook

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()
            self.losses: list[float] = []

        def training_step(self, data, _index):
            x, y = data
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return quantized_adam(self.trainer.strategy.model)

    rank = int(os.environ["RANK"])
    data = [batch(step, rank) for step in range(args.steps)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    if args.engine == "lightning-strategy":  # the state and hook given to DDPStrategy itself
        import torch.distributed as dist

        from distq.comm import quantized_hook

        # Built before any process group exists, as users build torch's PowerSGDState: the
        # state resolves its group when the hook first runs.
        assert not dist.is_initialized()
        strategy = DDPStrategy(ddp_comm_state=comm_state(args), ddp_comm_hook=quantized_hook)
        hook = QuantizedCommHook()
    else:
        strategy = DDPStrategy()
        hook = QuantizedCommHook(bits=args.bits, clip=2.5, collective=args.collective)
    module = Module()
    trainer = pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=2,
        max_steps=args.steps,
        callbacks=[hook],
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    save(
        args.out,
        rank,
        module.net,
        module.losses,
        stats=stats_dict(hook.state.compression_stats()),
        buckets=[sum(p.numel() for p in module.parameters())],
    )


RUNS = {
    "ddp": run_ddp,
    "deepspeed": run_deepspeed,
    "deepspeed-check": run_deepspeed_check,
    "horovod": run_horovod,
    "horovod-features": run_horovod_features,
    "lightning": run_lightning,
    "lightning-strategy": run_lightning,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=sorted(RUNS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--collective", default="scatter")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--grad-clip", type=float, default=0.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    RUNS[args.engine](args)
    json.dump({"ok": True}, sys.stdout)


if __name__ == "__main__":
    main()
