"""What a checkpoint of `distq train` holds, and how a run is saved and restored from it.

A checkpoint holds everything a bit-exact resume needs: ŵ, latent weights and optimizer state,
the LR schedule, the data position, the config, and per rank the RNG states, the gradient hook's
state (step counter, error-feedback residuals) and the epoch's loss so far. Rank 0 writes it as
one file (an FSDP run's shards gathered whole, laid out as a DDP run's), or, sharded, every rank
writes its own rows of the model and optimizer state (`sharded_checkpoint`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from distq.channels import ChannelPruner
from distq.comm import QuantizedCommState, prime_buckets
from distq.comm.fsdp import FSDPExchange
from distq.dtensors import shard_like, shard_optimizer_state, whole
from distq.launch import checkpoint, config, rng, sharded_checkpoint
from distq.launch.environment import DistEnv, on_main
from distq.launch.options import flat_name
from distq.optim import QuantizedOptimizer

FORMAT = 2  # bumped when the layout changes; older files are refused


def quantized_specs(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """name -> {scheme, bits, per_channel[, blocks]} for the checkpoint, so export knows how to
    pack (blocks only for tensors with per-block scales, e.g. LSTM gate matrices)."""
    if not isinstance(optimizer, QuantizedOptimizer):
        return {}
    specs = {}
    for n in optimizer.names:
        specs[n] = {
            "scheme": optimizer.scheme,
            "bits": optimizer.stored_bits_of(n),
            "per_channel": optimizer.per_channel,
        }
        if optimizer.blocks[n] > 1 and not optimizer.per_channel:
            specs[n]["blocks"] = optimizer.blocks[n]
    return specs


@dataclass
class Position:
    """Where training stands: the data loader's epoch and step within it, and the global step."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0


@dataclass
class RunState:
    """The pieces of one rank's training state that a checkpoint saves and restores."""

    cfg: config.TrainConfig
    env: DistEnv
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    comm: QuantizedCommState | None
    store: checkpoint.CheckpointStore
    pruner: ChannelPruner | None = None  # --channel-sparsity: masks and rankings
    sharded: FSDPExchange | None = None  # --parallel fsdp: the reduce-scatters' steps

    def save(self, position: Position, epoch_loss_sum: float) -> Path | None:
        """Gather every rank's own state (RNG, hook state, loss so far) to rank 0, which writes
        one checkpoint; returns its path on rank 0. A collective: every rank calls it."""
        mine = {
            "rng": rng.capture(),
            "comm": _to_cpu(self.comm.state_dict()) if self.comm is not None else None,
            "sharded": self.sharded.state_dict() if self.sharded is not None else None,
            "epoch_loss_sum": epoch_loss_sum,
        }
        ranks = [mine]
        if self.env.distributed:
            ranks = [None] * self.env.world_size if self.env.is_main else None
            dist.gather_object(mine, ranks, dst=0)
        if self.cfg.run.sharded_checkpoints:  # each rank writes its rows of model and optimizer
            parts = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            rest = self._payload(position, ranks) if self.env.is_main else None
            return self.store.save_sharded(rest, parts, position.step)
        # an FSDP run's shards are gathered whole on every rank: the file is a DDP run's
        model_state, optimizer_state = whole(self.model.state_dict()), None
        if self.cfg.run.parallel == "fsdp":
            optimizer_state = whole(self.optimizer.state_dict())
        if not self.env.is_main:
            return None
        payload = {
            **self._payload(position, ranks),
            "model": model_state,
            "optimizer": optimizer_state or self.optimizer.state_dict(),
        }
        return self.store.save(payload, position.step)

    def _payload(self, position: Position, ranks: list[dict]) -> dict:
        """What a checkpoint holds besides the model and optimizer state (rank 0's)."""
        payload = {
            "format": FORMAT,
            "schedule": self.schedule.state_dict(),
            "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch,
            "step": position.step,
            "config": self.cfg.to_dict(),
            "world_size": self.env.world_size,
            "quantized": quantized_specs(self.optimizer),
            "ranks": ranks,
        }
        if self.pruner is not None:
            payload["channels"] = self.pruner.state_dict()
        return payload

    def restore(
        self, found: tuple[dict, Path], prime_input: torch.Tensor
    ) -> tuple[Position, float, Path]:
        """Load a checkpoint `find_newest` returned into this rank's model, optimizer, schedule,
        hook and RNGs. The config's lr and weight_decay apply from here on (the schedule's
        factor at the resumed step times the new lr), so the next checkpoint records what ran."""
        state, path = found
        check_resumable(state, self.cfg, self.env, path)
        if sharded_checkpoint.is_sharded(path):  # every rank reads its rows of each tensor
            state = sharded_checkpoint.fill(state, path, _mesh_of(self.model))
        mine = state["ranks"][self.env.rank]
        try:
            live = self.model.state_dict()  # an FSDP model's: this rank's rows of each
            saved = {k: shard_like(v, live.get(k)) for k, v in state["model"].items()}
            self.model.load_state_dict(saved)
            self.optimizer.load_state_dict(self._optimizer_state(state["optimizer"]))
            self.schedule.load_state_dict(state["schedule"])
            if self.comm is not None:
                self.comm.load_state_dict(mine["comm"])
            if self.sharded is not None:
                self.sharded.load_state_dict(mine["sharded"])
            if self.pruner is not None:
                self.pruner.load_state_dict(state["channels"])
        except (ValueError, KeyError, TypeError) as exc:  # saved under settings not compared above
            raise config.ConfigError(f"cannot resume from {path}: {exc}") from None
        self._apply_lr_and_weight_decay()
        if self.comm is not None:
            prime_buckets(self.net, self.comm, prime_input)
        rng.restore(mine["rng"])
        position = Position(state["epoch"], state["step_in_epoch"], state["step"])
        return position, mine["epoch_loss_sum"], path

    def _optimizer_state(self, saved: dict) -> dict:
        """The saved optimizer state as this rank's optimizer loads it: a plain torch optimizer
        of an FSDP run gets its whole tensors cut to this rank's rows (QuantizedOptimizer cuts
        its own)."""
        if isinstance(self.optimizer, QuantizedOptimizer):
            return saved
        return shard_optimizer_state(saved, self.optimizer)

    def _apply_lr_and_weight_decay(self) -> None:
        factor = self.schedule.lr_lambdas[0](self.schedule.last_epoch)
        self.schedule.base_lrs = [self.cfg.run.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = self.cfg.run.lr, self.cfg.run.lr * factor
            group["weight_decay"] = self.cfg.run.weight_decay
        self.schedule._last_lr = [g["lr"] for g in self.optimizer.param_groups]


def _mesh_of(model: nn.Module) -> DeviceMesh | None:
    """The device mesh an FSDP model's parameters are sharded over (None: not sharded)."""
    return next((p.device_mesh for p in model.parameters() if isinstance(p, DTensor)), None)


def find_newest(env: DistEnv, store: checkpoint.CheckpointStore) -> tuple[dict, Path] | None:
    """Rank 0's newest loadable checkpoint, sent to every rank (no shared filesystem needed);
    None if there is none, CheckpointError rather than a fresh start when every checkpoint
    there is corrupt."""

    def newest() -> tuple[dict, Path] | None:
        found = store.load_newest()
        corrupt = store.corrupt()
        if found is None and corrupt:
            raise checkpoint.CheckpointError(
                f"--resume: no checkpoint in {store.directory} loads, and "
                f"{len(corrupt)} corrupt one(s) lie in {corrupt[0].parent} (newest: "
                f"{corrupt[-1].name}); refusing to start from scratch over them"
            )
        return found

    return on_main(env, newest, (checkpoint.CheckpointError,))


def check_resumable(state: dict, cfg: config.TrainConfig, env: DistEnv, path: Path) -> None:
    """A checkpoint resumes only a run with the same model, data, quantization and world size
    (its config as it was recorded: in sections, or by flat keys before configs had them)."""
    if state.get("format") != FORMAT:
        raise config.ConfigError(
            f"cannot resume from {path}: checkpoint format {state.get('format')!r}, this distq "
            f"reads format {FORMAT}; start a new out_dir"
        )
    fixed = (  # by flat name
        "recipe",
        "data_dir",
        "lstm_norm",
        "bptt",
        "scheme",
        "bits",
        "per_channel",
        "hidden",
        "depth",
        "seed",
        "batch_size",
        "test_fraction",
        "optimizer",
        "keep_full_precision",
        "sparsity",
        "sparsity_schedule",
        "sparsity_initial",
        "sparsity_begin",
        "sparsity_end",
        "sparsity_scope",
        "channel_sparsity",
        "channel_schedule",
        "channel_begin",
        "channel_end",
        "channel_every",
        "channel_calibration",
        "channel_rank_weight",
        "channel_allocation",
        "channel_floor",
        "loss_aware",
        "distill",
        "distill_temperature",
        "estimator",
        *config.ALLOCATION_FIELDS,
        *GRADIENT_ALLOCATION,
    )
    # checkpoints from before distillation and the estimator existed trained without them
    before = {k: getattr(config.Run(), k) for k in ("distill", "distill_temperature")}
    unpruned = config.flatten({"sparsity": config.Sparsity().as_kwargs()})
    before.update((k, v) for k, v in unpruned.items() if k.startswith("channel_"))  # nor pruning
    before["estimator"] = config.Weights().estimator
    before.update((k, getattr(config.Weights(), k)) for k in config.ALLOCATION_FIELDS)  # one width
    defaults = config.TrainConfig().flat()
    before.update((k, defaults[k]) for k in GRADIENT_ALLOCATION)  # nor gradient widths
    saved, now = {**before, **config.flatten(state["config"])}, cfg.flat()
    different = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}"
        for k in fixed
        if saved.get(k) != now[k]
    ]
    if state["world_size"] != env.world_size:
        different.append(f"world_size: checkpoint {state['world_size']} vs now {env.world_size}")
    if different:
        raise config.ConfigError(
            f"cannot resume from {path}, the run's settings differ: " + "; ".join(different)
        )


GRADIENT_ALLOCATION = tuple(  # by flat name: grad_bits_budget, grad_bit_candidates, ...
    flat_name(f)
    for f in dataclasses.fields(config.Gradients)
    if f.name in config.GRADIENT_ALLOCATION_FIELDS
)


def _to_cpu(value):
    """A copy of nested dicts/lists of tensors on the CPU (for pickling to another rank)."""
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
