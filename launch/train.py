"""`distq train` / `torchrun -m distq.launch.train`: data-parallel training of a quantized model.

Every rank builds the same model from the seed, DDP averages the gradients, and the
QuantizedOptimizer projects the weights after each step; rank 0 shows progress, prints the test
accuracy per epoch and a final summary, and writes the checkpoint that `distq export` packs.

A run goes through these steps, each a function below: claim out_dir (`run`), build data,
model, gradient exchange and optimizer (`_build`), resume (`_resume`), announce (`_announce`),
train epoch by epoch (`_train_epochs`), report (`_finish`) and close (`_close`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from distq.batchnorm import batch_norms, recalibrate
from distq.channels import ChannelPruner, ChannelTopologyError, count_macs, rewrite
from distq.comm import QuantizedCommState
from distq.comm.fsdp import FSDPExchange
from distq.distill import SelfDistillation
from distq.dtensors import local
from distq.launch import checkpoint, config, preemption, recipes, run_dir
from distq.launch.allocation import (
    allocate_gradient_widths,
    allocate_widths,
    check_allocation_steps,
)
from distq.launch.build import (
    attach_comm_hook,
    build_monitor,
    build_optimizer,
    fsdp_traffic,
    lr_schedule,
    shard_for_training,
)
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
from distq.monitor import ConvergenceMonitor
from distq.optim import QuantizedOptimizer
from distq.selection import QuantizationSummary, summarize

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


@dataclass
class Job:
    """One rank's run, built: the data on its device, the batches, the checkpoint found to
    resume from, and the training state a checkpoint saves (model, optimizer, hook, store)."""

    cfg: config.TrainConfig
    env: DistEnv
    device: torch.device
    data: recipes.Split
    batches: ShardedBatches
    state: RunState
    found: tuple[dict, Path] | None
    distill: SelfDistillation | None = None  # the latent weights as teacher (--distill)
    sharded: FSDPExchange | None = None  # --parallel fsdp: the exchange's byte counts

    def say(self, text: str) -> None:
        """Print on rank 0 only."""
        if self.env.is_main:
            print(text)


@dataclass
class Progress:
    """How far training got: the position, the resumed epoch's loss so far, whether the run
    was finished before it started, the steps this process ran, the signal that stopped it,
    and the newest epoch's loss, test accuracy and recipe scores."""

    position: Position = field(default_factory=Position)
    epoch_loss_sum: float = 0.0
    finished_before: bool = False
    steps_run: int = 0
    stopped_by: str | None = None
    loss: float = math.nan
    accuracy: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def run(cfg: config.TrainConfig, env: DistEnv | None = None) -> TrainResult:
    """Train per `cfg` in this process (one rank of the job); returns rank-local results.

    Rank 0 holds out_dir's lock for the whole run; an out_dir that cannot take the run (locked,
    not writable, an earlier run's checkpoints without --resume) stops every rank before training.
    """
    env = env or DistEnv.from_environ()
    preemption.stop_when_launcher_dies()
    backend = choose_backend(cfg.run.backend)
    # A group that exists already (a caller's, or a test's) is the caller's to destroy: a second
    # run() then reuses it instead of a fresh env:// rendezvous on a port the first one holds.
    owns_group = not dist.is_initialized()
    init_process_group(env, backend, cfg.run.dist_timeout)
    if env.distributed:
        check_same_config(cfg, env)
    lock = run_dir.RunDirLock(cfg.run.out_dir)
    try:
        on_main(env, lambda: _claim(lock, cfg.run), (run_dir.RunDirError,))
        return _train(cfg, env, backend, owns_group)
    finally:
        lock.release()


def _claim(lock: run_dir.RunDirLock, run: config.Run) -> None:
    """Lock out_dir and make it this run's (moving an earlier run aside if asked to)."""
    lock.acquire()
    previous = run_dir.claim(run.out_dir, run.resume, run.move_aside)
    if previous is not None:
        print(f"the earlier run in {run.out_dir} was moved to {previous}")


def _train(cfg: config.TrainConfig, env: DistEnv, backend: str, owns_group: bool) -> TrainResult:
    """The training itself, once out_dir is this run's: the steps in the module docstring."""
    job = _build(cfg, env, device_for(env, backend))
    progress = _resume(job)
    summary = _announce(job, backend)
    state = job.state
    monitor = (
        build_monitor(cfg, env, state.optimizer, state.comm, state.model)
        if cfg.monitor.enabled and job.sharded is None
        else None
    )
    if cfg.monitor.enabled and job.sharded is not None:
        job.say("monitor: off with --parallel fsdp (it reads the DDP hook's buckets)")
    _train_epochs(job, monitor, progress)
    if isinstance(state.optimizer, QuantizedOptimizer):  # widths allocated since the announcement
        summary = state.optimizer.summary
    result = _finish(job, progress, summary)
    _close(job, monitor, progress)
    shutdown(state.net, destroy_group=owns_group)
    return result


def _build(cfg: config.TrainConfig, env: DistEnv, device: torch.device) -> Job:
    """Data, model, DDP with the gradient hook, batches, the checkpoint to resume from, then the
    optimizer and LR schedule: the same on every rank, collectives in the same order."""
    run = cfg.run
    torch.manual_seed(run.seed)
    data = recipes.load(run.recipe, run.test_fraction, run.seed, run.data_dir, run.bptt).to(device)
    model = recipes.build_model(
        run.recipe,
        run.hidden,
        run.depth,
        classes=data.classes,
        lstm_norm=run.lstm_norm,
        bptt=run.bptt,
    ).to(device)
    comm, sharded = None, None
    if env.distributed and run.parallel == "fsdp":  # the model is sharded in place
        net, sharded = model, shard_for_training(cfg, model)
    elif env.distributed:
        net = DistributedDataParallel(model)
        comm = attach_comm_hook(cfg, net)
    else:
        net = model
    batches = ShardedBatches(len(data.train_y), run.batch_size, env.rank, env.world_size, run.seed)
    store = checkpoint.CheckpointStore(run.out_dir, run.keep_checkpoints)
    found = find_newest(env, store) if run.resume else None
    # The sparsity ramp stays where the run placed it: a resume with more epochs extends the
    # run at its final sparsity, while the LR schedule spans the new total.
    ramp_epochs = (
        config.flatten(found[0]["config"]).get("epochs", run.epochs) if found else run.epochs
    )
    try:
        optimizer = build_optimizer(cfg, net, ramp_epochs * batches.steps_per_epoch)
    except ValueError as exc:  # e.g. keep_full_precision naming no layer of the model
        raise config.ConfigError(str(exc)) from None
    check_allocation_steps(cfg, run.epochs * batches.steps_per_epoch)
    if comm is not None and cfg.sparsity.gradients:
        comm.set_keep_mask(optimizer.mask_of)
    schedule = lr_schedule(run, optimizer, run.epochs * batches.steps_per_epoch)
    pruner = _build_pruner(cfg, model, data, optimizer, ramp_epochs * batches.steps_per_epoch)
    state = RunState(cfg, env, model, net, optimizer, schedule, comm, store, pruner, sharded)
    distill = (
        SelfDistillation(optimizer, run.distill, run.distill_temperature) if run.distill else None
    )
    return Job(cfg, env, device, data, batches, state, found, distill, sharded)


def _build_pruner(
    cfg: config.TrainConfig,
    model: nn.Module,
    data: recipes.Split,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
) -> ChannelPruner | None:
    """The channel pruner of --channel-sparsity (None without it): it votes on the first
    channel_calibration training examples after a shuffle seeded by the run's seed, the same
    examples on every rank."""
    sparsity = cfg.sparsity
    if not sparsity.channels:
        return None
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(cfg.run.seed))
    calibration = data.train_x[order[: sparsity.channel_calibration].to(data.train_x.device)]
    try:
        return ChannelPruner(
            model,
            sparsity.channel_schedule_over(total_steps),
            calibration,
            sparsity.channel_every,
            sparsity.channel_rank_weight,
            optimizer,
            allocation=sparsity.channel_allocation,
            floor=sparsity.channel_floor,
        )
    except ChannelTopologyError as exc:
        raise config.ConfigError(
            f"channel_sparsity={sparsity.channels} on the {cfg.run.recipe} model: {exc}"
        ) from None


def _resume(job: Job) -> Progress:
    """Restore the checkpoint found (if any) and say where training continues."""
    run = job.cfg.run
    progress = Progress()
    if run.resume and job.found is None:
        job.say(f"no checkpoint in {job.state.store.directory}: starting from scratch")
    elif job.found is not None:
        position, loss_sum, path = job.state.restore(job.found, job.data.train_x[: run.batch_size])
        progress = Progress(position, loss_sum)
        total_steps = run.epochs * job.batches.steps_per_epoch
        job.say(
            f"resumed from {path} at step {position.step} "
            f"(epoch {position.epoch + 1}, step {position.step_in_epoch} of it)"
            + _changes_applied(config.flatten(job.found[0]["config"]), job.cfg, total_steps)
        )
    if progress.position.epoch >= run.epochs:  # a resumed finished run: report it, change nothing
        progress.finished_before = True
        job.say(
            f"the run in {run.out_dir} is finished (epoch {progress.position.epoch}, step "
            f"{progress.position.step}); nothing to train, "
            f"{Path(run.out_dir) / SUMMARY_NAME} is left as it is"
        )
    return progress


def _announce(job: Job, backend: str) -> QuantizationSummary:
    """Say what trains how (recipe, workers, weights, gradients) and which tensors are
    quantized; returns that summary of the model."""
    cfg, optimizer = job.cfg, job.state.optimizer
    scheme = cfg.weights.scheme if cfg.weights.quantized else "fp32"
    summary = (
        optimizer.summary
        if isinstance(optimizer, QuantizedOptimizer)
        else summarize(job.state.model, [], scheme, 32)
    )
    job.say(
        f"distq train: {cfg.run.recipe}, {job.env.world_size} worker(s) on {backend}, "
        f"weights {scheme}, {_wire(cfg.gradients, job.state.comm, job.sharded)}"
    )
    job.say(summary.to_str())
    return summary


def _wire(
    gradients: config.Gradients, comm: QuantizedCommState | None, sharded: FSDPExchange | None
) -> str:
    """How gradients travel, for the banner."""
    if sharded is not None:
        weights = "packed weight all-gather" if sharded.all_gathers else "fp32 all-gather"
        if not sharded.reduce_scatters:
            return f"FSDP2: {weights}, fp32 gradient reduce-scatter"
        return (
            f"FSDP2: {weights}, {gradients.bits}-bit {gradients.compressor} gradient "
            f"reduce-scatter, clip {gradients.clip}"
        )
    if comm is None:
        return "fp32 gradients"
    if comm.quantizations() == 0:
        return "fp32 gradients (hierarchical on one node: a full-precision all-reduce)"
    width = "measured" if gradients.bits == "auto" else f"{gradients.bits}-bit"
    code = f"{width} {gradients.compressor}"
    wire = f"{code} gradients, {gradients.collective}, clip {gradients.clip}"
    if gradients.bits_budget is not None:
        wire += (
            f", per-tensor widths from {sorted(gradients.bit_candidates)} for "
            f"{gradients.bits_budget} bits on average after step {gradients.allocate_after}"
        )
    return wire


def _train_epochs(job: Job, monitor: ConvergenceMonitor | None, progress: Progress) -> None:
    """Train from progress.position to the last epoch or to an agreed stop signal, recording
    in `progress` what happened (and the seconds it took)."""
    started = time.perf_counter()
    data = job.data
    progress.accuracy = recipes.accuracy(job.state.model, data.test_x, data.test_y)
    with preemption.StopRequest() as stop:
        for epoch in range(progress.position.epoch, job.cfg.run.epochs):
            loss_sum = _train_epoch(job, monitor, stop, epoch, progress)
            if progress.stopped_by is not None:
                break
            _end_epoch(job, epoch, loss_sum, progress)
    progress.seconds = time.perf_counter() - started


def _train_epoch(
    job: Job,
    monitor: ConvergenceMonitor | None,
    stop: preemption.StopRequest,
    epoch: int,
    progress: Progress,
) -> torch.Tensor:
    """The steps of `epoch` from progress.position on, behind a progress bar; returns this
    rank's loss sum over the epoch (the resumed part included)."""
    start, per_epoch = progress.position.step_in_epoch, job.batches.steps_per_epoch
    bar = tqdm(
        job.batches.epoch(epoch, start=start),
        desc=f"epoch {epoch + 1}/{job.cfg.run.epochs}",
        initial=start,
        total=per_epoch,
        disable=not (job.cfg.run.progress and job.env.is_main),
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    loss_sum = torch.full((), progress.epoch_loss_sum, device=job.device)
    progress.epoch_loss_sum = 0.0
    for idx in bar:
        step_started = time.perf_counter()
        step = progress.position.step + 1
        loss = _step(job, idx, step)
        if step == job.cfg.gradients.allocate_after and monitor is not None:
            _follow_gradient_widths(monitor, job.state.comm)
        loss_sum += loss.detach()
        progress.steps_run += 1
        progress.position = Position(epoch, progress.position.step_in_epoch + 1, step)
        if monitor is not None:
            terms = {} if job.distill is None else job.distill.terms  # CE and KL apart
            monitor.step(step, loss.item(), time.perf_counter() - step_started, terms)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if _save_or_stop(job, stop, progress, loss_sum):
            break
    bar.close()
    return loss_sum


def _follow_gradient_widths(
    monitor: ConvergenceMonitor, comm: QuantizedCommState | None
) -> None:
    """After a gradient width allocation: the monitor's gradient bound at the narrowest width
    now sent (the one that holds for every tensor)."""
    if monitor.gradient is not None and comm is not None:
        monitor.gradient.bits = comm.narrowest_bits()


def _step(job: Job, idx: torch.Tensor, step: int) -> torch.Tensor:
    """One optimizer step on the examples `idx` (DivergedError if it makes a weight
    non-finite); returns the batch's loss."""
    state, data = job.state, job.data
    state.optimizer.zero_grad(set_to_none=True)
    x, y = data.train_x[idx], data.train_y[idx]
    loss = _task_loss(job, state.net, x, y)
    if state.pruner is None:
        loss.backward()
    else:  # the learn-to-rank term joins the objective; the task loss is what is reported
        (loss + state.pruner.regularizer()).backward()
    state.optimizer.step()
    if job.cfg.weights.weight_bits_budget is not None:
        allocate_widths(job.cfg, job.env, state.optimizer, state.model, job.data, step, job.say)
    if job.cfg.gradients.bits_budget is not None and state.comm is not None:
        allocate_gradient_widths(
            job.cfg, state.comm, state.optimizer, state.model, data,
            lambda net, x, y: _objective(job, net, x, y), step, job.env.rank, job.say,
        )  # fmt: skip
    if state.pruner is not None:
        state.pruner.step(step)
    check_finite(state.model, state.optimizer, step, job.cfg.run.lr)
    state.schedule.step()
    return loss


def _task_loss(job: Job, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch's task loss: cross-entropy, or self-distillation's CE + KL."""
    if job.distill is None:
        return nn.functional.cross_entropy(net(x), y)
    # the teacher's forward (latent weights, unwrapped module), then the student's
    return job.distill.loss(net, x, y)


def _objective(job: Job, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What a step differentiates: the task loss, plus the learn-to-rank term when pruning."""
    loss = _task_loss(job, net, x, y)
    return loss if job.state.pruner is None else loss + job.state.pruner.regularizer()


def _save_or_stop(
    job: Job, stop: preemption.StopRequest, progress: Progress, loss_sum: torch.Tensor
) -> bool:
    """After a step: checkpoint and return True (stop) when a rank got a stop signal, else
    checkpoint every checkpoint_every steps (an epoch's end saves anyway) and return False."""
    position, every = progress.position, job.cfg.run.checkpoint_every
    signum = stop.agreed(job.device)
    if signum:
        progress.stopped_by = signal.Signals(signum).name
        path = job.state.save(position, loss_sum.item())
        job.say(
            f"{progress.stopped_by} received: stopped after step {position.step}, "
            f"checkpoint {path}; continue with --resume"
        )
        return True
    end_of_epoch = position.step_in_epoch == job.batches.steps_per_epoch
    if every is not None and position.step % every == 0 and not end_of_epoch:
        job.state.save(position, loss_sum.item())
    return False


def _end_epoch(job: Job, epoch: int, loss_sum: torch.Tensor, progress: Progress) -> None:
    """The epoch's mean loss over ranks (DivergedError if it is not finite), its test scores
    and line, and its checkpoint."""
    run, model, data = job.cfg.run, job.state.model, job.data
    progress.loss = _mean_over_ranks(loss_sum / job.batches.steps_per_epoch, job.env)
    if not math.isfinite(progress.loss):  # every rank sees the same mean
        raise DivergedError(
            f"training diverged: the mean loss of epoch {epoch + 1} is {progress.loss} "
            f"(lr {run.lr}); its end was not saved; lower --lr"
        )
    _recalibrate(job)
    progress.accuracy = recipes.accuracy(model, data.test_x, data.test_y)
    progress.metrics = recipes.extra_metrics(run.recipe, model, data.test_x, data.test_y)
    job.say(
        f"epoch {epoch + 1:>3}/{run.epochs}  loss {progress.loss:.4f}  "
        f"test accuracy {progress.accuracy:.2%}{_format_scores(progress.metrics)}"
    )
    progress.position = Position(epoch + 1, 0, progress.position.step)
    job.state.save(progress.position, 0.0)


def _recalibrate(job: Job) -> None:
    """Every batch norm's running statistics recomputed with the epoch's final weights over
    run.bn_recalibration training examples drawn from the seed, the same on every rank, in
    batches of batch_size (a last partial batch dropped): quantized weights jump, and the
    running averages lag them (distq/batchnorm.py)."""
    run, model, train_x = job.cfg.run, job.state.model, job.data.train_x
    if run.bn_recalibration == 0 or not batch_norms(model):
        return
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(run.seed))
    order = order[: run.bn_recalibration]
    if len(order) >= run.batch_size:
        order = order[: len(order) // run.batch_size * run.batch_size]
    recalibrate(model, [train_x[idx] for idx in order.split(run.batch_size)])


def _finish(job: Job, progress: Progress, summary: QuantizationSummary) -> TrainResult:
    """The run's result; rank 0 writes it to summary.json and prints it when the run has just
    finished. A run that was finished before reports its recorded result."""
    out_dir, ckpt_path = Path(job.cfg.run.out_dir), job.state.store.latest
    if progress.finished_before and (out_dir / SUMMARY_NAME).is_file():
        record = json.loads((out_dir / SUMMARY_NAME).read_text())
        return TrainResult(**{**record, "checkpoint": Path(record["checkpoint"])})
    result = TrainResult(
        progress.accuracy,
        progress.loss,
        summary.fp32_bytes,
        summary.packed_bytes,
        progress.steps_run,
        progress.seconds,
        ckpt_path,
        progress.stopped_by,
        progress.metrics,
    )
    if job.env.is_main and progress.stopped_by is None and not progress.finished_before:
        record = {**dataclasses.asdict(result), "checkpoint": str(ckpt_path)}
        (out_dir / SUMMARY_NAME).write_text(json.dumps(record, indent=2) + "\n")
        job.say(
            f"done: test accuracy {result.test_accuracy:.2%}"
            f"{_format_scores(result.metrics, ',')}, final loss {result.final_loss:.4f}, "
            f"{result.steps} steps in {result.seconds:.1f} s\nmodel size: "
            f"{summary.fp32_bytes / 1024:.1f} KiB fp32 -> {summary.packed_bytes / 1024:.1f} KiB "
            f"packed ({summary.fp32_bytes / summary.packed_bytes:.1f}x)\ncheckpoint: "
            f"{ckpt_path}  (pack it: distq export {ckpt_path} model.safetensors)"
        )
        if job.state.pruner is not None:
            job.say(_pruned_line(job.state.pruner, job.state.model, job.data.test_x[:1]))
    return result


def _pruned_line(pruner: ChannelPruner, model: nn.Module, example: torch.Tensor) -> str:
    """Channels kept and multiply-accumulates per example before and after the rewrite."""
    kept, total = sum(pruner.kept().values()), sum(g.channels for g in pruner.groups)
    before = count_macs(model, example)
    after = count_macs(rewrite(model, pruner.keep), example)
    return (
        f"channel pruning: {kept} of {total} channels kept; {before / 1e6:.2f} M -> "
        f"{after / 1e6:.2f} M multiply-accumulates per example ({1 - after / before:.1%} fewer); "
        "distq export writes the smaller model"
    )


def _close(job: Job, monitor: ConvergenceMonitor | None, progress: Progress) -> None:
    """Close the monitor (saying its alarms) and the gradient hook (saying its traffic)."""
    comm = job.state.comm
    if monitor is not None:
        monitor.close()
        if monitor.alarms:
            job.say(f"monitor alarms (rank 0): {monitor.alarms}")
    if job.sharded is not None and progress.steps_run:
        job.say(fsdp_traffic(job.sharded))
    if comm is None:
        return
    if progress.steps_run and comm.quantizations() == 0:
        job.say(
            "gradient traffic (rank 0): full-precision all-reduce, nothing quantized on one node"
        )
    elif progress.steps_run:
        stats = comm.compression_stats()
        sent = stats.bytes_sent + stats.uncompressed_bytes_sent
        job.say(
            f"gradient traffic (rank 0): {sent / 1e6:.2f} MB sent vs "
            f"{stats.fp32_allreduce_bytes / 1e6:.2f} MB an fp32 all-reduce sends "
            f"({stats.compression_ratio:.1f}x less)"
        )
        for index, why in sorted(stats.choices.items()):
            job.say(f"grad_bits auto, bucket {index}: {why}")
    comm.close()


def _changes_applied(saved: dict, cfg: config.TrainConfig, total_steps: int) -> str:
    """The options a resume applies that differ from the checkpoint's (`saved`: its config by
    flat names), for the resume line."""
    now = cfg.flat()
    keys = ("lr", "weight_decay", "epochs", "lr_schedule")
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in keys if saved.get(k) != now[k]]
    if not changed:
        return ""
    return (
        f"; applied: {', '.join(changed)} (the {cfg.run.lr_schedule} LR schedule now spans "
        f"{total_steps} steps and continues from this step)"
    )


class DivergedError(RuntimeError):
    """An update made weights non-finite: training stops before using or saving them."""


def check_finite(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, lr: float) -> None:
    """Raise DivergedError if a weight, a float buffer (batch-norm statistics) or a
    QuantizedOptimizer's latent weight is NaN or Inf.

    Every rank holds the same weights (FSDP: its shards, and the ranks agree), so every rank
    raises at the same step; nothing after the newest checkpoint is saved, and that one holds
    finite weights.
    """
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    if isinstance(optimizer, QuantizedOptimizer):
        tensors.update((f"{n} (latent)", t) for n, t in optimizer.latent.items())
    pieces = {n: local(t).detach() for n, t in tensors.items()}
    finite = torch.stack([t.isfinite().all() for t in pieces.values()]).all().to(torch.int32)
    if any(isinstance(t, DTensor) for t in tensors.values()):
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item():
        return
    bad = [n for n, t in pieces.items() if not t.isfinite().all()] or ["another rank's shard"]
    raise DivergedError(
        f"training diverged: the update of step {step} made {', '.join(bad)} non-finite (lr {lr}); "
        "nothing after the newest checkpoint was saved; lower --lr"
    )


def _format_scores(metrics: dict[str, float], sep: str = " ") -> str:
    """Recipe scores for a progress line: "  test bpc 1.8312" per entry."""
    return "".join(f"{sep} {k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items())


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
    mine = {k: v for k, v in cfg.flat().items() if k not in PER_RANK_SETTINGS}
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
