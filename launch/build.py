"""The objects a run of `distq train` trains with, each built from its config section: the
optimizer (weights, sparsity, run), the LR schedule (run), the gradient hook (gradients) or the
FSDP2 sharding (run.parallel, gradients) and the convergence monitor with its Prometheus
exporter (monitor)."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from distq.comm import QuantizedCommState, quantized_hook
from distq.comm.fsdp import FSDPExchange, shard_model
from distq.launch import config
from distq.launch.environment import DistEnv
from distq.monitor import ConvergenceMonitor, GradientSetup, MetricsExporter, RecurrentProbe
from distq.optim import QuantizedOptimizer

log = logging.getLogger(__name__)


def build_optimizer(
    cfg: config.TrainConfig, model: nn.Module, total_steps: int
) -> torch.optim.Optimizer:
    """The base optimizer, wrapped in a QuantizedOptimizer (the weights and sparsity sections,
    the ramp placed in `total_steps`) unless the scheme is 'none'."""
    run, params = cfg.run, model.parameters()
    if run.optimizer == "adam":
        base = torch.optim.Adam(params, lr=run.lr, weight_decay=run.weight_decay)
    elif run.optimizer == "adamw":
        base = torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)
    else:
        base = torch.optim.SGD(params, lr=run.lr, momentum=0.9, weight_decay=run.weight_decay)
    if not cfg.weights.quantized:
        return base
    sparsity = cfg.sparsity.optimizer_kwargs(total_steps)
    return QuantizedOptimizer(base, model, **cfg.weights.as_kwargs(), **sparsity)


def attach_comm_hook(cfg: config.TrainConfig, ddp: nn.Module) -> QuantizedCommState | None:
    """Register distq's quantized-gradient hook (the gradients section, with the run's seed, the
    non-finite policy and the monitor's interval) on the DDP model; None: fp32 all-reduce."""
    if cfg.gradients.bits is None:
        return None
    state = QuantizedCommState(
        **cfg.gradients.as_kwargs(),
        model=ddp,  # names for the widths a gradient bit budget allocates
        seed=cfg.run.seed,
        nonfinite="propagate" if cfg.weights.nonfinite == "skip" else "raise",
        error_every=cfg.monitor.every,
    )
    ddp.register_comm_hook(state, quantized_hook)
    return state


def shard_for_training(cfg: config.TrainConfig, model: nn.Module) -> FSDPExchange:
    """--parallel fsdp: FSDP2 over every rank (`distq.comm.fsdp.shard_model`), quantized
    weights gathered as packed codes, gradients reduce-scattered through the gradients
    section's compressor (grad_bits null: FSDP's fp32 reduce-scatter), in run.fsdp_dtype."""
    # FSDP2 warns at every forward that a module returned a view (an in-place op on it would
    # skip a hook); no recipe modifies a module's output in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view")
    _, exchange = shard_model(
        model,
        weights="packed" if cfg.weights.quantized else "fp32",
        gradients="quantized" if cfg.gradients.bits is not None else "fp32",
        dtype=cfg.run.fsdp_dtype,
        **cfg.gradients.as_kwargs(),
        seed=cfg.run.seed,
        nonfinite="propagate" if cfg.weights.nonfinite == "skip" else "raise",
    )
    return exchange


def fsdp_traffic(exchange: FSDPExchange) -> str:
    """What this rank's reduce-scatters and all-gathers sent against FSDP's fp32 ones."""
    grads, weights = exchange.stats, exchange.gather_stats
    sent = grads.bytes_sent + grads.uncompressed_bytes_sent
    gathered = weights.bytes_sent + weights.header_bytes_sent
    gradients = (
        f"gradients {sent / 1e6:.2f} MB vs {grads.fp32_reduce_scatter_bytes / 1e6:.2f} MB an "
        "fp32 reduce-scatter sends"
        if exchange.reduce_scatters
        else "gradients: FSDP's fp32 reduce-scatter"
    )
    weights_line = (
        f"weights {gathered / 1e6:.2f} MB vs {weights.default_all_gather_bytes / 1e6:.2f} MB "
        "FSDP's all-gather sends"
        if exchange.all_gathers
        else "weights: FSDP's all-gather"
    )
    return f"FSDP traffic (rank 0): {gradients}; {weights_line}"


def build_monitor(
    cfg: config.TrainConfig,
    env: DistEnv,
    optimizer: torch.optim.Optimizer,
    comm: QuantizedCommState | None,
    model: nn.Module | None = None,
) -> ConvergenceMonitor:
    """The convergence monitor for this rank, with its Prometheus exporter if a port is set."""
    gradient = None
    if comm is not None and comm.bits != "auto":  # auto: a width per bucket, no single bound
        grads = cfg.gradients
        gradient = GradientSetup(
            bits=comm.narrowest_bits(),  # per-tensor widths: the bound that holds for all
            clip=grads.clip,
            bucket_numel=grads.bucket_size or 25 * 2**20 // 4,  # else: a default 25 MiB DDP bucket
            quantizations=comm.quantizations(),
            compressor=grads.compressor,
        )
    return ConvergenceMonitor(
        Path(cfg.run.out_dir),
        env.rank,
        optimizer if isinstance(optimizer, QuantizedOptimizer) else None,
        comm,
        gradient,
        start_exporter(cfg.monitor, env),
        cfg.monitor.every,
        recurrent=RecurrentProbe.of(model) if model is not None else None,
    )


def start_exporter(monitor: config.Monitor, env: DistEnv) -> MetricsExporter | None:
    """This rank's Prometheus exporter on metrics_port + local rank; None when the port is null
    or cannot be had (a busy or impossible port or address: training goes on without it)."""
    if monitor.metrics_port is None:
        return None
    exporter = MetricsExporter(env.rank)
    try:
        port = monitor.metrics_port + env.local_rank if monitor.metrics_port else 0
        exporter.start(port, monitor.metrics_address)
    except (OSError, OverflowError) as exc:
        log.warning("rank %d: no metrics exporter (%s)", env.rank, exc)
        return None
    return exporter


def _lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """The factor on the base learning rate at each step."""
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def lr_schedule(
    run: config.Run, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's learning-rate schedule over `total_steps`: constant, or a cosine down to 0."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(run.lr_schedule, total_steps))
