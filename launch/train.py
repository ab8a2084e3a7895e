"""`distq train` / `torchrun -m distq.launch.train`: data-parallel training of a quantized model.

Every rank builds the same model from the seed, DDP averages the gradients, and the
QuantizedOptimizer projects the weights after each step; rank 0 shows progress, prints the test
accuracy per epoch and a final summary, and writes the checkpoint that `distq export` packs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from distq.comm import QuantizedCommState, quantized_hook
from distq.launch import checkpoint, config, preemption, recipes, run_dir
from distq.launch.data import ShardedBatches
from distq.launch.environment import (
    DistEnv,
    RendezvousError,
    choose_backend,
    device_for,
    init_process_group,
    on_main,
    shutdown,
)
from distq.launch.resume import Position, RunState, find_newest
from distq.monitor import ConvergenceMonitor, GradientSetup, MetricsExporter, RecurrentProbe
from distq.optim import QuantizedOptimizer
from distq.quant.sparse import SparsitySchedule
from distq.selection import summarize

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports."""

    test_accuracy: float
    final_loss: float
    fp32_bytes: int
    packed_bytes: int
    steps: int
    seconds: float
    checkpoint: Path
    stopped_by: str | None = None  # the signal that stopped training early, if one did
    metrics: dict[str, float] = field(default_factory=dict)  # recipe scores (charlm: test_bpc)


def sparsity_schedule(cfg: config.TrainConfig, total_steps: int) -> SparsitySchedule:
    """The config's sparsity schedule, its ramp placed in steps of this run."""
    return SparsitySchedule(
        cfg.sparsity,
        cfg.sparsity_schedule,
        cfg.sparsity_initial,
        round(cfg.sparsity_begin * total_steps),
        max(round(cfg.sparsity_end * total_steps), round(cfg.sparsity_begin * total_steps) + 1),
    )


def build_optimizer(
    cfg: config.TrainConfig, model: nn.Module, total_steps: int
) -> torch.optim.Optimizer:
    """The base optimizer, wrapped in a QuantizedOptimizer unless the scheme is 'none'."""
    params = model.parameters()
    if cfg.optimizer == "adam":
        base = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        base = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        base = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.scheme == config.FULL_PRECISION:
        return base
    return QuantizedOptimizer(
        base,
        model,
        scheme=cfg.scheme,
        bits=cfg.bits,
        keep_full_precision=cfg.keep_full_precision,
        clip_latent=cfg.clip_latent,
        per_channel=cfg.per_channel,
        nonfinite=cfg.nonfinite,
        sparsity=sparsity_schedule(cfg, total_steps),
        sparsity_scope=cfg.sparsity_scope,
        loss_aware=cfg.loss_aware,
    )


def attach_comm_hook(cfg: config.TrainConfig, ddp: nn.Module) -> QuantizedCommState | None:
    """Register distq's quantized-gradient hook on the DDP model (None: fp32 all-reduce)."""
    if cfg.grad_bits is None:
        return None
    state = QuantizedCommState(
        bits=cfg.grad_bits,
        bucket_size=cfg.bucket_size,
        clip=cfg.clip,
        collective=cfg.collective,
        error_feedback=cfg.error_feedback,
        compressor=cfg.grad_compressor,
        seed=cfg.seed,
        nonfinite="propagate" if cfg.nonfinite == "skip" else "raise",
        error_every=cfg.monitor_every,
    )
    ddp.register_comm_hook(state, quantized_hook)
    return state


def build_monitor(
    cfg: config.TrainConfig,
    env: DistEnv,
    optimizer: torch.optim.Optimizer,
    comm,
    model: nn.Module | None = None,
) -> ConvergenceMonitor:
    """The convergence monitor for this rank, with its Prometheus exporter if a port is set."""
    exporter = None
    if cfg.metrics_port is not None:
        exporter = MetricsExporter(env.rank)
        try:
            port = cfg.metrics_port + env.local_rank if cfg.metrics_port else 0
            exporter.start(port, cfg.metrics_address)
        except (OSError, OverflowError) as exc:  # a busy or impossible port or address: train on
            log.warning("rank %d: no metrics exporter (%s)", env.rank, exc)
            exporter = None
    gradient = None
    if comm is not None:
        gradient = GradientSetup(
            bits=comm.bits,
            clip=cfg.clip,
            bucket_numel=cfg.bucket_size or 25 * 2**20 // 4,  # else: a default 25 MiB DDP bucket
            quantizations=comm.quantizations(),
            compressor=cfg.grad_compressor,
        )
    quantizer = optimizer if isinstance(optimizer, QuantizedOptimizer) else None
    return ConvergenceMonitor(
        Path(cfg.out_dir),
        env.rank,
        quantizer,
        comm,
        gradient,
        exporter,
        cfg.monitor_every,
        recurrent=RecurrentProbe.of(model) if model is not None else None,
    )


def run(cfg: config.TrainConfig, env: DistEnv | None = None) -> TrainResult:
    """Train per `cfg` in this process (one rank of the job); returns rank-local results.

    Rank 0 holds out_dir's lock for the whole run; an out_dir that cannot take the run (locked,
    not writable, an earlier run's checkpoints without --resume) stops every rank before training.
    """
    env = env or DistEnv.from_environ()
    preemption.stop_when_launcher_dies()
    backend = choose_backend(cfg.backend)
    # A group that exists already (a caller's, or a test's) is the caller's to destroy: a second
    # run() then reuses it instead of a fresh env:// rendezvous on a port the first one holds.
    owns_group = not dist.is_initialized()
    init_process_group(env, backend, cfg.dist_timeout)
    if env.distributed:
        check_same_config(cfg, env)
    lock = run_dir.RunDirLock(cfg.out_dir)
    try:
        on_main(env, lambda: _claim(lock, cfg), (run_dir.RunDirError,))
        return _train(cfg, env, backend, owns_group)
    finally:
        lock.release()


def _claim(lock: run_dir.RunDirLock, cfg: config.TrainConfig) -> None:
    lock.acquire()
    previous = run_dir.claim(cfg.out_dir, cfg.resume, cfg.move_aside)
    if previous is not None:
        print(f"the earlier run in {cfg.out_dir} was moved to {previous}")


def _train(cfg: config.TrainConfig, env: DistEnv, backend: str, owns_group: bool) -> TrainResult:
    """The training itself, once out_dir is this run's."""
    device = device_for(env, backend)
    say = print if env.is_main else (lambda *a, **k: None)

    torch.manual_seed(cfg.seed)
    data = recipes.load(cfg.recipe, cfg.test_fraction, cfg.seed, cfg.data_dir, cfg.bptt)
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    model = recipes.build_model(
        cfg.recipe,
        cfg.hidden,
        cfg.depth,
        classes=data.classes,
        lstm_norm=cfg.lstm_norm,
        bptt=cfg.bptt,
    ).to(device)
    net: nn.Module = DistributedDataParallel(model) if env.distributed else model
    comm = attach_comm_hook(cfg, net) if env.distributed else None
    batches = ShardedBatches(len(train_y), cfg.batch_size, env.rank, env.world_size, cfg.seed)
    total_steps = cfg.epochs * batches.steps_per_epoch
    out_dir = Path(cfg.out_dir)
    store = checkpoint.CheckpointStore(out_dir, cfg.keep_checkpoints)
    found = find_newest(env, store) if cfg.resume else None
    # The sparsity ramp stays where the run placed it: a resume with more epochs extends the
    # run at its final sparsity, while the LR schedule spans the new total.
    ramp_epochs = found[0]["config"].get("epochs", cfg.epochs) if found else cfg.epochs
    try:
        optimizer = build_optimizer(cfg, net, ramp_epochs * batches.steps_per_epoch)
    except ValueError as exc:  # e.g. keep_full_precision naming no layer of the model
        raise config.ConfigError(str(exc)) from None
    if comm is not None and cfg.sparse_gradients:
        comm.set_keep_mask(optimizer.mask_of)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(cfg.lr_schedule, total_steps)
    )
    run_state = RunState(cfg, env, model, net, optimizer, schedule, comm, store)

    position, resumed_loss_sum = Position(), 0.0
    if cfg.resume and found is None:
        say(f"no checkpoint in {store.directory}: starting from scratch")
    elif found is not None:
        position, resumed_loss_sum, path = run_state.restore(found, train_x[: cfg.batch_size])
        say(
            f"resumed from {path} at step {position.step} "
            f"(epoch {position.epoch + 1}, step {position.step_in_epoch} of it)"
            + _changes_applied(found[0]["config"], cfg, total_steps)
        )
    finished = position.epoch >= cfg.epochs
    if finished:  # a resumed finished run: report it, change nothing
        say(
            f"the run in {out_dir} is finished (epoch {position.epoch}, step {position.step}); "
            f"nothing to train, {out_dir / SUMMARY_NAME} is left as it is"
        )

    scheme = cfg.scheme if cfg.scheme != config.FULL_PRECISION else "fp32"
    summary = (
        optimizer.summary
        if isinstance(optimizer, QuantizedOptimizer)
        else summarize(model, [], scheme, 32)
    )
    one_node_fallback = comm is not None and comm.quantizations() == 0
    if one_node_fallback:
        wire = "fp32 gradients (hierarchical on one node: a full-precision all-reduce)"
    elif comm is not None:
        code = f"{cfg.grad_bits}-bit {cfg.grad_compressor}"
        wire = f"{code} gradients, {cfg.collective}, clip {cfg.clip}"
    else:
        wire = "fp32 gradients"
    say(
        f"distq train: {cfg.recipe}, {env.world_size} worker(s) on {backend}, "
        f"weights {scheme}, {wire}"
    )
    say(summary.to_str())

    monitor = build_monitor(cfg, env, optimizer, comm, model) if cfg.monitor else None
    started = time.perf_counter()
    steps_run = 0
    stopped_by: str | None = None
    loss_value, accuracy = math.nan, recipes.accuracy(model, test_x, test_y)
    metrics: dict[str, float] = {}
    with preemption.StopRequest() as stop:
        for epoch in range(position.epoch, cfg.epochs):
            steps = batches.epoch(epoch, start=position.step_in_epoch)
            bar = tqdm(
                steps,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                initial=position.step_in_epoch,
                total=batches.steps_per_epoch,
                disable=not (cfg.progress and env.is_main),
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
            )
            loss_sum = torch.full((), resumed_loss_sum, device=device)
            resumed_loss_sum = 0.0
            for idx in bar:
                step_started = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(net(train_x[idx]), train_y[idx])
                loss.backward()
                optimizer.step()
                check_finite(model, optimizer, position.step + 1, cfg.lr)
                schedule.step()
                loss_sum += loss.detach()
                steps_run += 1
                position = Position(epoch, position.step_in_epoch + 1, position.step + 1)
                if monitor is not None:
                    monitor.step(position.step, loss.item(), time.perf_counter() - step_started)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                signum = stop.agreed(device)
                end_of_epoch = position.step_in_epoch == batches.steps_per_epoch
                if signum:
                    stopped_by = signal.Signals(signum).name
                    path = run_state.save(position, loss_sum.item())
                    say(
                        f"{stopped_by} received: stopped after step {position.step}, "
                        f"checkpoint {path}; continue with --resume"
                    )
                    break
                every = cfg.checkpoint_every
                if every is not None and position.step % every == 0 and not end_of_epoch:
                    run_state.save(position, loss_sum.item())
            bar.close()
            if stopped_by is not None:
                break
            loss_value = _mean_over_ranks(loss_sum / batches.steps_per_epoch, env)
            if not math.isfinite(loss_value):  # every rank sees the same mean
                raise DivergedError(
                    f"training diverged: the mean loss of epoch {epoch + 1} is {loss_value} "
                    f"(lr {cfg.lr}); its end was not saved; lower --lr"
                )
            accuracy = recipes.accuracy(model, test_x, test_y)
            metrics = recipes.extra_metrics(cfg.recipe, model, test_x, test_y)
            say(
                f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {loss_value:.4f}  "
                f"test accuracy {accuracy:.2%}{_format_scores(metrics)}"
            )
            position = Position(epoch + 1, 0, position.step)
            run_state.save(position, 0.0)
    seconds = time.perf_counter() - started
    ckpt_path = store.latest
    result = TrainResult(
        accuracy,
        loss_value,
        summary.fp32_bytes,
        summary.packed_bytes,
        steps_run,
        seconds,
        ckpt_path,
        stopped_by,
        metrics,
    )
    if finished and (out_dir / SUMMARY_NAME).is_file():
        record = json.loads((out_dir / SUMMARY_NAME).read_text())
        result = TrainResult(**{**record, "checkpoint": Path(record["checkpoint"])})
    if env.is_main and stopped_by is None and not finished:
        summary_record = {**dataclasses.asdict(result), "checkpoint": str(ckpt_path)}
        (out_dir / SUMMARY_NAME).write_text(json.dumps(summary_record, indent=2) + "\n")
        say(
            f"done: test accuracy {accuracy:.2%}{_format_scores(metrics, ',')}, "
            f"final loss {loss_value:.4f}, {steps_run} steps "
            f"in {seconds:.1f} s\nmodel size: {summary.fp32_bytes / 1024:.1f} KiB fp32 -> "
            f"{summary.packed_bytes / 1024:.1f} KiB packed "
            f"({summary.fp32_bytes / summary.packed_bytes:.1f}x)"
            f"\ncheckpoint: {ckpt_path}  (pack it: distq export {ckpt_path} model.safetensors)"
        )
    if monitor is not None:
        monitor.close()
        if monitor.alarms:
            say(f"monitor alarms (rank 0): {monitor.alarms}")
    if one_node_fallback and steps_run:
        say("gradient traffic (rank 0): full-precision all-reduce, nothing quantized on one node")
    elif comm is not None and steps_run:
        stats = comm.compression_stats()
        say(
            f"gradient traffic (rank 0): {stats.bytes_sent / 1e6:.2f} MB sent vs "
            f"{stats.fp32_allreduce_bytes / 1e6:.2f} MB an fp32 all-reduce sends "
            f"({stats.compression_ratio:.1f}x less)"
        )
    if comm is not None:
        comm.close()
    shutdown(net, destroy_group=owns_group)
    return result


def _changes_applied(saved: dict, cfg: config.TrainConfig, total_steps: int) -> str:
    """The options a resume applies that differ from the checkpoint's, for the resume line."""
    keys = ("lr", "weight_decay", "epochs", "lr_schedule")
    changed = [
        f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}"
        for k in keys
        if saved.get(k) != getattr(cfg, k)
    ]
    if not changed:
        return ""
    return (
        f"; applied: {', '.join(changed)} (the {cfg.lr_schedule} LR schedule now spans "
        f"{total_steps} steps and continues from this step)"
    )


class DivergedError(RuntimeError):
    """An update made weights non-finite: training stops before using or saving them."""


def check_finite(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, lr: float) -> None:
    """Raise DivergedError if a weight, a float buffer (batch-norm statistics) or a
    QuantizedOptimizer's latent weight is NaN or Inf.

    Every rank holds the same weights, so every rank raises at the same step; nothing after the
    newest checkpoint is saved, and that one holds finite weights.
    """
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    if isinstance(optimizer, QuantizedOptimizer):
        tensors.update((f"{n} (latent)", t) for n, t in optimizer.latent.items())
    if torch.stack([t.detach().isfinite().all() for t in tensors.values()]).all():
        return
    bad = [n for n, t in tensors.items() if not t.detach().isfinite().all()]
    raise DivergedError(
        f"training diverged: the update of step {step} made {', '.join(bad)} non-finite (lr {lr}); "
        "nothing after the newest checkpoint was saved; lower --lr"
    )


def _format_scores(metrics: dict[str, float], sep: str = " ") -> str:
    """Recipe scores for a progress line: "  test bpc 1.8312" per entry."""
    return "".join(f"{sep} {k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items())


def _lr_factor(schedule: str, total_steps: int):
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _mean_over_ranks(value: torch.Tensor, env: DistEnv) -> float:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= env.world_size
    return value.item()


# Settings that may differ between ranks (where each rank writes, how it reports).
PER_RANK_SETTINGS = ("out_dir", "progress", "metrics_port", "metrics_address")


def check_same_config(cfg: config.TrainConfig, env: DistEnv) -> None:
    """Every rank must train with rank 0's settings: compare them before anything trains.

    A collective (all_gather_object), so every rank learns the same verdict and raises alike.
    """
    mine = {k: v for k, v in cfg.to_dict().items() if k not in PER_RANK_SETTINGS}
    everyone: list[dict | None] = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    problems = [
        f"rank {rank} has {key}={theirs[key]!r} but rank 0 has {key}={everyone[0][key]!r}"
        for rank, theirs in enumerate(everyone)
        for key in everyone[0]
        if theirs[key] != everyone[0][key]
    ]
    if problems:
        raise config.ConfigError("ranks disagree on the configuration: " + "; ".join(problems))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distq train", description=__doc__.splitlines()[0])
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config.from_args(args)
    except config.ConfigError as exc:
        parser.error(str(exc))
    try:
        result = run(cfg)
    except (
        config.ConfigError,
        run_dir.RunDirError,
        checkpoint.CheckpointError,
        RendezvousError,
    ) as exc:
        # found once running: ranks disagree, a bad resume, an out_dir that cannot take the run
        print(f"distq train: error: {exc}", file=sys.stderr)
        return 2
    except DivergedError as exc:
        print(f"distq train: error: {exc}", file=sys.stderr)
        return 3
    if result.stopped_by == "SIGTERM":  # checkpointed, but the run did not finish: say so
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
