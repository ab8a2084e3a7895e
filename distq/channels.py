"""Global channel pruning (GlobalPru): remove whole output channels, the same ones for every sample,
so that the pruned model is a smaller dense model that runs faster, not only a sparser file.

The paper's (Wang et al., "Towards performance-maximizing neural network pruning via global
channel attention", Neural Networks 171, 2024, the GlobalPru of the PolyU thesis on sample
bias-aware compression; only its abstract is public to this project): channel importance comes
from per-sample (local) channel attention; samples vote a global ranking of the channels; during
sparse training a learn-to-rank term forces every sample's attention to agree with the global
ranking, so that static pruning of the lowest-ranked channels hurts no sample much.

Ours (the paper's attention module, vote and loss are not public; each choice below is
distq's):

- Attention: a parameter-free squeeze, measured where a channel is consumed (a forward pre-hook
  on the next conv/linear layer): a[n, c] = mean over positions |x[n, c, ·]|, normalised per
  sample to mean 1, ŝ[n, c] = a[n, c] / (mean_c a[n, c] + ε).
- Majority vote: a Borda count. Sample n ranks the channels by ŝ[n, ·] (position r[n, c], 0 for
  its most important); channel c scores B[c] = Σ_n (C − 1 − r[n, c]); the global ranking sorts
  B descending, ties by channel index. Channels already pruned stay pruned (they rank last).
- Learn-to-rank: RankNet's pairwise logistic loss. For the kept channels i above j in the global
  ranking, L = λ · mean_groups mean_{n, i≻j} softplus((ŝ[n, j] − ŝ[n, i]) / τ), τ = 1: each
  sample is pulled toward ordering its attention as the global ranking does.
- Schedule: each prunable layer keeps K = ⌈(1 − ρ(t))·C⌉ of its C output channels (at least 1),
  ρ(t) constant or a cubic ramp (distq.quant.sparse.SparsitySchedule, Zhu & Gupta 2017). Every
  `every` steps (and at the ramp's end) the ranking is voted again and the masks follow it.
- Global allocation (allocation="global", ours): ρ(t) is instead the share of the model's
  multiply-accumulates removed, M(K) ≤ (1 − ρ(t))·M(C), and the layers' counts K_l are chosen
  together. Channels leave one at a time: of each layer l above its floor ⌈floor·C_l⌉, the
  candidate is its lowest-voted kept channel c_l; the one removed minimises ī(c_l) / ΔM_l, where
  ī(c) = mean_n ŝ[n, c] on the calibration batch (ŝ normalised over all C_l channels, pruned
  ones counting 0, so a thinned layer's channels weigh more) and ΔM_l the MACs its removal saves
  at the current widths (its producer row and the consumer's matching inputs). Why: a uniform ρ
  keeps a (1 − ρ) share of channels everywhere, while CPU time at these widths follows the
  channel counts at full resolution more than the MACs (benchmarks/README.md); removing
  channels by importance per MAC takes them where they cost the most.
- Chosen widths (`widths`, ours): layer l ends the ramp with W_l channels, and on the way keeps
  K_l(t) = C_l − ⌊f(t)·(C_l − W_l)⌋ with f(t) = ρ(t)/ρ_final the ramp's progress; for widths
  that suit the CPU kernels (benchmarks/README.md: a convolution's time steps with width).
- Agreement without communication: the vote runs on a calibration batch every rank holds alike,
  through the replicated weights, batch norm on that batch's statistics (running statistics left
  untouched) and dropout off; so every rank derives the same masks from the same state.
- Masks: a pruned channel's producer row, bias and batch-norm weight and bias are zero (so its
  output after the norm and a zero-preserving activation is exactly 0), as are its latent weights
  in a QuantizedOptimizer and its momentum in the base optimizer (so it stays zero).
- Rewrite: `prune_state_dict` removes the pruned output channels of each producer and the
  matching input channels (or the features a Flatten made of them) of the next layer, with
  biases and norms consistent; `resize_to` builds modules of the smaller shapes. The rewritten
  model computes what the masked one does, to float rounding.

Topology: an nn.Sequential (nested Sequentials allowed) of conv/linear layers with, between a
producer and its consumer, batch norms (affine), zero-preserving activations (f(0) = 0), pools,
dropout and a Flatten; anything else raises ChannelTopologyError naming the layer.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional

from distq.quant.sparse import SparsitySchedule, max_nonzeros
from distq.selection import unwrap

log = logging.getLogger(__name__)

RANK_TEMPERATURE = 1.0  # τ of the pairwise learn-to-rank loss (ŝ has mean 1 per sample)
EPS = 1e-12
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# f(0) = 0 per channel: a pruned (all-zero) channel stays zero through these.
ZERO_PRESERVING = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Hardtanh, nn.SiLU, nn.ELU,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
ALLOCATIONS = ("uniform", "global")


class ChannelTopologyError(ValueError):
    """A model whose channels distq cannot remove consistently (the message names the layer)."""


@dataclass(frozen=True)
class ChannelGroup:
    """One prunable layer: `producer`'s output channels pass through `norms` (and zero-preserving
    layers) into `consumer`, where channel c is input features c·block .. (c+1)·block − 1."""

    producer: str
    norms: tuple[str, ...]
    consumer: str
    channels: int
    block: int = 1  # 1 for a linear producer, whose channels are the last dimension


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """Every conv/linear layer of the nn.Sequential `model` whose output channels can be removed
    (each but the output layer); ChannelTopologyError naming the first layer in the way."""
    model = unwrap(model)
    if not isinstance(model, nn.Sequential):
        raise ChannelTopologyError(
            f"channel pruning rewrites nn.Sequential models (layers in order); got "
            f"{type(model).__name__}"
        )
    layers = list(_leaves(model))
    groups = []
    for i, (name, module) in enumerate(layers):
        if isinstance(module, PRUNABLE):
            group = _follow(name, module, layers[i + 1 :])
            if group is not None:
                groups.append(group)
    return groups


def _leaves(module: nn.Sequential, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, full + ".")
        else:
            yield full, child


def _follow(
    name: str, producer: nn.Module, after: list[tuple[str, nn.Module]]
) -> ChannelGroup | None:
    """The group that starts at `producer`: the layers its channels pass to the next conv/linear;
    None when none follows (the output layer)."""
    if getattr(producer, "groups", 1) != 1:
        raise ChannelTopologyError(f"cannot remove channels of {name!r}: a grouped convolution")
    channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    norms: list[str] = []
    flattened = False
    for other, module in after:
        where = f"channels of {name!r} reach {other!r} ({type(module).__name__})"
        if isinstance(module, NORMS):
            if flattened or module.num_features != channels or not module.affine:
                raise ChannelTopologyError(
                    f"{where}: a batch norm must be affine, before any Flatten and over the "
                    f"{channels} channels"
                )
            norms.append(other)
        elif isinstance(module, nn.Flatten):
            if isinstance(producer, nn.Linear) or module.start_dim != 1 or module.end_dim != -1:
                raise ChannelTopologyError(
                    f"{where}: only Flatten(1, -1) after a convolution keeps channels apart"
                )
            flattened = True
        elif isinstance(module, PRUNABLE):
            block = _block(where, producer, module, channels, flattened)
            return ChannelGroup(name, tuple(norms), other, channels, block)
        elif not isinstance(module, ZERO_PRESERVING):
            raise ChannelTopologyError(
                f"{where}, which distq.channels cannot rewrite (allowed between layers: affine "
                "batch norms, Flatten, and layers that map 0 to 0 per channel: ReLU-like "
                "activations, pools, dropout)"
            )
    return None


def _block(
    where: str, producer: nn.Module, consumer: nn.Module, channels: int, flattened: bool
) -> int:
    """Input features per producer channel at `consumer` (> 1 where a Flatten merged positions)."""
    if getattr(consumer, "groups", 1) != 1:
        raise ChannelTopologyError(f"{where}: a grouped convolution")
    linear_in, linear_out = isinstance(producer, nn.Linear), isinstance(consumer, nn.Linear)
    if not linear_out:
        if linear_in or flattened or consumer.in_channels != channels:
            raise ChannelTopologyError(
                f"{where}: a convolution takes channels from a convolution, unflattened"
            )
        return 1
    block, rest = divmod(consumer.in_features, channels)
    if rest or block == 0 or linear_in != (not flattened) or (linear_in and block != 1):
        raise ChannelTopologyError(
            f"{where}: a linear layer takes {channels} channels from a linear layer, or "
            f"{channels}·k features from a convolution through Flatten; it takes "
            f"{consumer.in_features}" + ("" if flattened else ", no Flatten between them")
        )
    return block


# -- attention, vote, learn-to-rank --------------------------------------------------------------
def attention(x: Tensor, channels: int, last: bool = False) -> Tensor:
    """ŝ[n, c]: mean |x| over channel c's positions, normalised to mean 1 per sample (N, C);
    channels along dimension 1 (convolutions, flattened or not), or the last (`last`)."""
    n = x.shape[0]
    a = (
        x.reshape(n, -1, channels).abs().mean(1)
        if last
        else x.reshape(n, channels, -1).abs().mean(-1)
    )
    return a / (a.mean(1, keepdim=True) + EPS)


def borda_ranking(scores: Tensor, pruned: Tensor | None = None) -> Tensor:
    """The global ranking of channels (most important first) by a Borda count over samples:
    sample n gives channel c the points C − 1 − (its position in n's order). `pruned`
    channels rank last; ties go to the lower index."""
    n, c = scores.shape
    order = scores.argsort(dim=1, descending=True, stable=True)
    position = torch.empty_like(order).scatter_(1, order, torch.arange(c).expand(n, c))
    points = (c - 1 - position).sum(0).to(torch.float64)
    if pruned is not None:
        points = torch.where(pruned, -torch.inf, points)
    return points.argsort(descending=True, stable=True)


def rank_loss(scores: Tensor, ranking: Tensor, keep: Tensor) -> Tensor:
    """RankNet's loss pulling each sample's ŝ toward `ranking` over the kept channels: the mean
    over samples and pairs i above j of softplus((ŝ[n, j] − ŝ[n, i]) / τ)."""
    kept = ranking[keep[ranking]]  # the kept channels, most important first
    if kept.numel() < 2:
        return scores.new_zeros(())
    s = scores[:, kept]
    above = torch.ones(len(kept), len(kept), dtype=torch.bool, device=s.device).triu(1)
    diff = (s[:, None, :] - s[:, :, None]) / RANK_TEMPERATURE  # [n, i, j] = ŝ_j − ŝ_i
    return functional.softplus(diff[:, above]).mean()


# -- the pruner -------------------------------------------------------------------------------
class ChannelPruner:
    """Masks whole output channels of `model` on a schedule (see the module docstring).

    Args:
        model: an nn.Sequential (or its DDP wrapper) of conv/linear layers.
        sparsity: ρ, the share of each prunable layer's output channels removed, a number or a
            SparsitySchedule over optimizer steps.
        calibration: the inputs the vote runs on, the same on every rank.
        every: steps between votes (each also at the ramp's end).
        rank_weight: λ of the learn-to-rank term `regularizer()` adds to the loss (0: off).
        optimizer: the optimizer whose state pruned weights must not move with (a
            QuantizedOptimizer's latent weights and its base optimizer's momentum are zeroed).
        allocation: "uniform" (ρ of every layer's channels) or "global" (ρ of the model's
            multiply-accumulates, channels removed by importance per MAC across layers).
        floor: under "global", the share of each layer's channels always kept (at least 1).
        widths: under "uniform", producer name -> output channels it keeps at the ramp's end
            (the others keep ⌈(1 − ρ)·C⌉); ρ then sets only the ramp's shape.
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float | SparsitySchedule,
        calibration: Tensor,
        every: int = 20,
        rank_weight: float = 0.0,
        optimizer: torch.optim.Optimizer | None = None,
        allocation: str = "uniform",
        floor: float = 0.25,
        widths: Mapping[str, int] | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}; allowed: a positive integer (steps)")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
        if not 0 < floor <= 1:
            raise ValueError(f"floor={floor!r}; allowed: a share in (0, 1]")
        if not rank_weight >= 0:
            raise ValueError(f"rank_weight={rank_weight!r}; allowed: a number >= 0")
        if len(calibration) == 0:
            raise ValueError("calibration holds no inputs; the vote needs at least one")
        self.model = unwrap(model)
        self.groups = channel_groups(self.model)
        if not self.groups:
            raise ChannelTopologyError(
                f"{type(self.model).__name__} has no conv/linear layer feeding another"
            )
        self.schedule = (
            sparsity if isinstance(sparsity, SparsitySchedule) else SparsitySchedule(sparsity)
        )
        self.calibration = calibration
        self.every = every
        self.rank_weight = float(rank_weight)
        self.optimizer = optimizer
        modules = dict(self.model.named_modules())
        self._modules = modules
        device = calibration.device
        self.keep = {
            g.producer: torch.ones(g.channels, dtype=torch.bool, device=device) for g in self.groups
        }
        self.ranking = {g.producer: torch.arange(g.channels, device=device) for g in self.groups}
        self._scores: dict[str, Tensor] = {}
        self._capture = False
        self._handles = [
            modules[g.consumer].register_forward_pre_hook(self._hook(g)) for g in self.groups
        ]
        self.allocation = allocation
        self.widths = self._check_widths(widths or {})
        self._macs = MacModel(self.model, self.groups, calibration[:1])
        self._floor = {g.producer: max(1, math.ceil(floor * g.channels)) for g in self.groups}
        if allocation == "global":
            least = self._macs.total(self._floor)
            full = self._macs.total({g.producer: g.channels for g in self.groups})
            if least > (1 - self.schedule.final) * full:
                raise ValueError(
                    f"sparsity={self.schedule.final} of the multiply-accumulates is out of reach "
                    f"with floor={floor}: the floors alone keep {least / full:.1%} of them"
                )
        self.update(0)

    def _hook(self, group: ChannelGroup):
        last = isinstance(self._modules[group.producer], nn.Linear)

        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            training = self.rank_weight and module.training and torch.is_grad_enabled()
            if self._capture or training:
                self._scores[group.producer] = attention(args[0], group.channels, last)

        return record

    def close(self) -> None:
        """Remove the forward hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- per step -------------------------------------------------------------------------
    def regularizer(self) -> Tensor:
        """λ · the learn-to-rank loss of the newest training forward, averaged over layers
        (a zero tensor when λ = 0)."""
        if not self.rank_weight or not self._scores:
            return torch.zeros((), device=self.calibration.device)
        losses = [
            rank_loss(self._scores[g.producer], self.ranking[g.producer], self.keep[g.producer])
            for g in self.groups
            if g.producer in self._scores
        ]
        self._scores = {}
        return self.rank_weight * torch.stack(losses).mean()

    def step(self, step: int) -> None:
        """After optimizer step `step` (1-based count of steps taken): vote again when it is
        time, then zero the pruned channels."""
        if step % self.every == 0 or step == self.schedule.end:
            self.update(step)
        else:
            self.apply()

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Vote the global ranking on the calibration batch and keep each layer's top
        ⌈(1 − ρ(step))·C⌉ channels (never reviving a pruned one); then apply the masks."""
        scores = self._calibration_scores()
        rho = self.schedule.at(step)
        for g in self.groups:
            pruned = ~self.keep[g.producer]
            self.ranking[g.producer] = borda_ranking(scores[g.producer].cpu(), pruned.cpu()).to(
                pruned.device
            )
        kept = self.kept()
        if self.allocation == "global":
            counts = self._global_counts(scores, kept, rho)
        else:
            progress = rho / self.schedule.final if self.schedule.final else 0.0
            counts = {
                g.producer: min(
                    g.channels
                    - math.floor(round(progress * (g.channels - self.widths[g.producer]), 9))
                    if g.producer in self.widths
                    else max_nonzeros(g.channels, rho),
                    kept[g.producer],
                )
                for g in self.groups
            }
        for g in self.groups:
            keep = torch.zeros_like(self.keep[g.producer])
            keep[self.ranking[g.producer][: counts[g.producer]]] = True
            self.keep[g.producer] = keep
        self.apply()

    def _check_widths(self, widths: Mapping[str, int]) -> dict[str, int]:
        """`widths` checked against the groups (ValueError naming the bad entry)."""
        channels = {g.producer: g.channels for g in self.groups}
        if widths and self.allocation != "uniform":
            raise ValueError(f"widths apply to allocation='uniform'; got {self.allocation!r}")
        if widths and not self.schedule.final > 0:
            raise ValueError("widths need a sparsity above 0 (it sets the ramp's progress)")
        for name, width in widths.items():
            if name not in channels:
                raise ValueError(f"widths names {name!r}; prunable layers: {', '.join(channels)}")
            if (
                isinstance(width, bool)
                or not isinstance(width, int)
                or not 1 <= width <= channels[name]
            ):
                raise ValueError(
                    f"widths[{name!r}]={width!r}; allowed: an integer in 1..{channels[name]}"
                )
        return dict(widths)

    def _global_counts(
        self, scores: dict[str, Tensor], kept: dict[str, int], rho: float
    ) -> dict[str, int]:
        """Kept counts with M(K) ≤ (1 − ρ)·M(C): remove, one at a time, the candidate channel of
        least ī / ΔM (module docstring), never below a layer's floor nor reviving a channel."""
        importance = {name: s.mean(0).cpu() for name, s in scores.items()}
        full = self._macs.total({g.producer: g.channels for g in self.groups})
        counts = dict(kept)
        total = self._macs.total(counts)
        while total > (1 - rho) * full:
            best, best_value, best_total = None, math.inf, total
            for g in self.groups:
                k = counts[g.producer]
                if k <= self._floor[g.producer]:
                    continue
                after = self._macs.total({**counts, g.producer: k - 1})
                channel = self.ranking[g.producer][k - 1]
                value = float(importance[g.producer][channel]) / max(total - after, 1)
                if value < best_value:
                    best, best_value, best_total = g.producer, value, after
            if best is None:  # every layer at its floor (the constructor checked the final ρ)
                break
            counts[best] -= 1
            total = best_total
        return counts

    def _calibration_scores(self) -> dict[str, Tensor]:
        with _calibration_mode(self.model):
            self._capture, self._scores = True, {}
            try:
                self.model(self.calibration)
            finally:
                self._capture = False
            scores, self._scores = self._scores, {}
        return scores

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned channel: producer rows and bias, norm weight and bias, and the
        optimizer state that would move them (latent weights, momentum)."""
        params = dict(self.model.named_parameters())
        for g in self.groups:
            drop = ~self.keep[g.producer]
            if not bool(drop.any()):
                continue
            names = [f"{g.producer}.weight", f"{g.producer}.bias"]
            names += [f"{n}.{p}" for n in g.norms for p in ("weight", "bias")]
            for name in names:
                if name in params and params[name] is not None:
                    self._zero(name, params[name], drop)

    def _zero(self, name: str, p: Tensor, drop: Tensor) -> None:
        p[drop] = 0
        optimizer = self.optimizer
        latent = getattr(optimizer, "latent", {})
        if name in latent:
            latent[name][drop] = 0
        base = getattr(optimizer, "optimizer", optimizer)
        state = base.state.get(p, {}) if base is not None else {}
        for key in ("exp_avg", "momentum_buffer"):
            if torch.is_tensor(state.get(key)):
                state[key][drop] = 0

    # -- reporting, checkpoints -------------------------------------------------------------
    def kept(self) -> dict[str, int]:
        """producer name -> output channels kept."""
        return {name: int(k.sum()) for name, k in self.keep.items()}

    def state_dict(self) -> dict[str, Any]:
        """Masks, rankings and the groups they index (what export needs to rewrite)."""
        return {
            "groups": [asdict(g) for g in self.groups],
            "keep": {n: k.cpu().clone() for n, k in self.keep.items()},
            "ranking": {n: r.cpu().clone() for n, r in self.ranking.items()},
            "schedule": asdict(self.schedule),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and rankings saved by `state_dict` (ValueError for another model)."""
        if [
            ChannelGroup(**{**g, "norms": tuple(g["norms"])}) for g in state["groups"]
        ] != self.groups:
            raise ValueError("the checkpoint's channel groups are not this model's")
        for name in self.keep:
            self.keep[name] = state["keep"][name].to(self.keep[name].device)
            self.ranking[name] = state["ranking"][name].to(self.ranking[name].device)


@contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Batch norms in training mode (the batch's statistics, identical on every rank) with their
    running statistics restored afterwards, dropout off, no autograd."""
    was_training = {m: m.training for m in model.modules()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    for m in model.modules():
        if isinstance(m, DROPOUT):
            m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        own = dict(model.named_buffers())
        for name, value in buffers.items():
            own[name].copy_(value)
        for m, mode in was_training.items():
            m.train(mode)


class MacModel:
    """Multiply-accumulates per example of `model` as a function of the groups' kept counts:
    M(K) = Σ over conv/linear layers of (inputs kept)·(outputs kept)·(kernel size)·(positions),
    the positions measured once on `example` (what count_macs counts on the rewritten model)."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], example: Tensor) -> None:
        self.layers: list[tuple[str, int, int, int]] = []  # name, inputs, outputs, kernel·positions
        positions: dict[str, int] = {}

        def record(name: str):
            def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
                outputs = (
                    module.out_features if isinstance(module, nn.Linear) else module.out_channels
                )
                positions[name] = output.numel() // (output.shape[0] * outputs)

            return hook

        prunable = [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
        handles = [m.register_forward_hook(record(n)) for n, m in prunable]
        modes = {m: m.training for m in model.modules()}
        model.eval()  # shapes only: eval mode takes a single example through a batch norm
        try:
            with torch.no_grad():
                model(example)
        finally:
            for m, mode in modes.items():
                m.train(mode)
            for handle in handles:
                handle.remove()
        self.feeds = {
            g.consumer: g for g in groups
        }  # consumer -> the group whose channels it takes
        for name, m in prunable:
            if isinstance(m, nn.Linear):
                inputs, outputs, kernel = m.in_features, m.out_features, 1
            else:
                inputs, outputs = m.in_channels // m.groups, m.out_channels
                kernel = math.prod(m.kernel_size)
            self.layers.append((name, inputs, outputs, kernel * positions.get(name, 0)))

    def total(self, counts: Mapping[str, int]) -> int:
        """M(K) for `counts`: producer name -> output channels kept (others keep all)."""
        total = 0
        for name, inputs, outputs, per_pair in self.layers:
            group = self.feeds.get(name)
            if group is not None:
                inputs = counts.get(group.producer, group.channels) * group.block
            total += inputs * counts.get(name, outputs) * per_pair
        return total


# -- the rewrite --------------------------------------------------------------------------------
def groups_from_state(state: Mapping[str, Any]) -> list[ChannelGroup]:
    """The groups a ChannelPruner.state_dict() recorded."""
    return [ChannelGroup(**{**g, "norms": tuple(g["norms"])}) for g in state["groups"]]


def prune_state_dict(
    state: Mapping[str, Tensor], groups: list[ChannelGroup], keep: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """A model state_dict with each group's pruned channels removed: producer rows and bias,
    the norms' per-channel tensors, and the consumer's matching input columns."""
    out = dict(state)
    for g in groups:
        mask = keep[g.producer].cpu()
        if mask.shape != (g.channels,):
            raise ValueError(
                f"mask of {g.producer!r} has shape {tuple(mask.shape)}, not ({g.channels},)"
            )
        idx = mask.nonzero().flatten()
        for name in (f"{g.producer}.weight", f"{g.producer}.bias"):
            if name in out:
                out[name] = out[name][idx.to(out[name].device)].clone()
        for norm in g.norms:
            for p in ("weight", "bias", "running_mean", "running_var"):
                name = f"{norm}.{p}"
                if name in out:
                    out[name] = out[name][idx.to(out[name].device)].clone()
        columns = (idx[:, None] * g.block + torch.arange(g.block)).flatten()
        weight = out[f"{g.consumer}.weight"]
        out[f"{g.consumer}.weight"] = weight[:, columns.to(weight.device)].clone()
    return out


def resize_to(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """Replace, in place, each conv/linear/batch-norm layer of `model` whose tensors in `state`
    have other shapes by one of those shapes (same settings); returns `model` (weights are not
    loaded: load_state_dict(state) after)."""
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if weight is None or not hasattr(module, "weight") or module.weight is None:
            continue
        if module.weight.shape == weight.shape:
            continue
        kwargs = {"device": weight.device, "dtype": weight.dtype}
        if isinstance(module, nn.Linear):
            new = nn.Linear(weight.shape[1], weight.shape[0], module.bias is not None, **kwargs)
        elif isinstance(module, PRUNABLE):
            new = type(module)(
                weight.shape[1], weight.shape[0], module.kernel_size, module.stride,
                module.padding, module.dilation, module.groups, module.bias is not None,
                module.padding_mode, **kwargs,
            )  # fmt: skip
        elif isinstance(module, NORMS):
            new = type(module)(
                weight.shape[0], module.eps, module.momentum, module.affine,
                module.track_running_stats, **kwargs,
            )  # fmt: skip
        else:
            raise ChannelTopologyError(
                f"cannot resize {name!r} ({type(module).__name__}) to {tuple(weight.shape)}"
            )
        new.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def rewrite(model: nn.Module, keep: Mapping[str, Tensor]) -> nn.Module:
    """A smaller copy of `model` without the pruned channels (`keep`: producer -> kept mask);
    it computes what `model` with those channels zeroed computes."""
    model = unwrap(model)
    state = prune_state_dict(model.state_dict(), channel_groups(model), keep)
    smaller = resize_to(copy.deepcopy(model), state)
    smaller.load_state_dict(state)
    return smaller


def count_macs(model: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of the conv and linear layers of one forward of `example` (one
    sample: example's first dimension is 1), counted from the shapes the layers see."""
    total = 0

    def count(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        else:
            per_output = (
                module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
            )
            total += output.numel() * per_output

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, PRUNABLE)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total
