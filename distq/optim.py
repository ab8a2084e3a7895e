"""QuantizedOptimizer: the optimizer is the quantizer (loss-aware proximal Newton step).

Parameters hold the quantized ŵ; forward and backward run on it. `step()` restores the latent
full-precision w, runs the wrapped optimizer on ∇ŵ (straight-through; or on a learned meta
gradient, estimator="meta": distq/meta.py), clips w, and projects it back with the curvature
d = √v̂ + ε read from the wrapped optimizer's second-moment state.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from distq.dtensors import local, rows_like, shard_like, shard_optimizer_state
from distq.meta import MetaGradient, check_estimator
from distq.quant import SCHEMES, Projection, blocks_of, get_scheme, project, scheme_bits
from distq.quant.lockstep import in_lockstep
from distq.quant.sharded import project_shard
from distq.quant.sparse import SCOPES, SparsitySchedule, global_split
from distq.selection import (
    POSITIONAL,
    ModuleType,
    QuantizationSummary,
    quantizable,
    select,
    summarize,
    unwrap,
    widths_by_name,
)
from distq.wrapping import OptimizerWrapper, closure_loss

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("skip", "raise")


class QuantizedOptimizer(OptimizerWrapper):
    """Wraps `base_optimizer` so the selected weights of `model` are binary/ternary/m-bit.

    Args:
        base_optimizer: the optimizer over `model`'s parameters. Adam/AdamW (d from exp_avg_sq,
            bias-corrected), RMSprop (square_avg) and Adagrad (sum) give loss-aware steps;
            any other (SGD) means d ≡ 1.
        model: the model (or its DDP wrapper), before or after wrapping it in DDP (see
            sync_latent).
        scheme, bits: a name in `distq.quant.SCHEMES` and its bit width (m-bit schemes only).
        bits_by_name: {parameter name or regex: bits} for quantized tensors that take another
            width than `bits` (schemes of several widths only: linear, log, shared), as the
            gradient exchange's bits_by_name does for gradients; `set_bits` changes widths
            later (a bit allocation, distq/bit_allocation.py).
        keep_full_precision: names, regexes or "first"/"last" of layers to leave unquantized
            (by default the first quantizable layer and the last, a language model's output head).
        quantize_modules: further layer types whose `weight` to quantize, as classes or class
            names, beyond distq.selection's policy (Linear, Conv, HF Conv1D, LSTM/GRU gates, ...).
        clip_latent: clip latent weights to [−c, c] after each step (None: no clipping).
        per_channel: one scale per output channel instead of one per tensor. A parameter
            marked with `distq.quant.set_blocks(p, B)` (an LSTM's stacked gate matrices) gets
            one scale per each of B row blocks instead of one per tensor.
        nonfinite: "skip" a step whose gradients hold NaN/Inf (with a warning), or "raise".
        sparsity: κ, the share of zeros per quantized tensor (joint quantization and
            sparsification, distq.quant.sparse), a number or a SparsitySchedule over steps.
        sparsity_scope: "tensor" (each tensor loses κ) or "global" (κ over all quantized
            tensors together; each keeps its entries with the largest d·w²).
        loss_aware: False projects with d ≡ 1 whatever the base optimizer keeps (an ablation:
            the same training without the curvature weighting).
        sync_latent: at the first step, when torch.distributed is initialized with several
            ranks, every rank takes rank 0's latent weights (one broadcast per quantized tensor,
            once). An optimizer built before DDP (the Hugging Face Trainer builds it first)
            holds each rank's own initial weights, while DDP broadcast only rank 0's ŵ: without
            this the replicas diverge unless every rank seeded its model alike. Turn it off for
            a model that is not replicated over the default process group (pipeline or tensor
            parallel shards). FSDP2's sharded parameters (DTensors) are never broadcast: each
            rank holds its own rows of the latent weights and projects them with the other
            ranks of its shard group (distq.quant.sharded).
        estimator: how ∇ŵ reaches the latent w: "ste" passes it straight through; "meta" maps it
            (with w) through MetaQuant's learned meta network, trained jointly (distq/meta.py).
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        model: nn.Module,
        scheme: str = "ternary",
        bits: int | None = None,
        keep_full_precision: Iterable[str] = POSITIONAL,
        clip_latent: float | None = 1.0,
        per_channel: bool = False,
        nonfinite: str = "skip",
        sparsity: float | SparsitySchedule = 0.0,
        sparsity_scope: str = "tensor",
        loss_aware: bool = True,
        quantize_modules: Iterable[ModuleType] = (),
        sync_latent: bool = True,
        estimator: str = "ste",
        bits_by_name: Mapping[str, int] | None = None,
    ) -> None:
        _check_options(base_optimizer, nonfinite, clip_latent, sparsity_scope)
        check_estimator(estimator)
        self.estimator = estimator
        self.sparsity = (
            sparsity if isinstance(sparsity, SparsitySchedule) else SparsitySchedule(sparsity)
        )
        self.sparsity_scope = sparsity_scope
        self.steps_taken = 0  # projections after a step: what the sparsity schedule reads
        self.bits = scheme_bits(scheme, bits)
        self.scheme = scheme
        self.per_channel = per_channel
        self.clip_latent = clip_latent
        self.nonfinite = nonfinite
        self.loss_aware = loss_aware
        self.sync_latent = sync_latent
        self._synced = False
        super().__init__(base_optimizer)
        module = unwrap(model)
        self._take_weights(module, keep_full_precision, tuple(quantize_modules))
        self.sharded = any(isinstance(p, DTensor) for p in self._params.values())
        if self.sharded and sparsity_scope == "global":
            raise ValueError(
                "sparsity_scope='global' ranks every weight of the model together, which "
                "FSDP-sharded parameters do not hold; allowed with FSDP: 'tensor'"
            )
        self.bits_by_name = dict(bits_by_name or {})
        self.tensor_bits: dict[str, int] = {
            **dict.fromkeys(self.names, self.bits),
            **self._widths(self.bits_by_name),
        }
        self.allocated = False  # whether set_bits chose the widths (saved with the checkpoint)
        self.summary: QuantizationSummary = summarize(
            module, self.names, self.scheme, self.tensor_bits
        )
        self._group = self._groups_by_parameter()
        self.latent: dict[str, Tensor] = {n: p.detach().clone() for n, p in self._params.items()}
        self.alpha: dict[str, Tensor] = {}
        self.skipped_steps = 0
        first = next(iter(self.latent.values()), None)
        self.meta = (
            MetaGradient(first.device, first.dtype)
            if estimator == "meta" and first is not None
            else None
        )
        self._project_all()

    def _take_weights(
        self, module: nn.Module, keep: Iterable[str], quantize_modules: tuple[ModuleType, ...]
    ) -> None:
        """Choose the weights to quantize (distq.selection's policy), check that the wrapped
        optimizer steps each of them, and note each one's scale blocks."""
        params = dict(module.named_parameters())
        chosen = select(module, keep, quantize_modules)
        self.names = [c.name for c in chosen]
        if not self.names:
            self._warn_nothing_quantized(module, keep, quantize_modules)
        self._param_names = {p: n for n, p in params.items()}
        in_optimizer = {p for g in self.param_groups for p in g["params"]}
        missing = [n for n in self.names if params[n] not in in_optimizer]
        if missing:
            raise ValueError(f"parameters {missing} are quantized but not in base_optimizer")
        self._params: dict[str, nn.Parameter] = {n: params[n] for n in self.names}
        # a weight marked with set_blocks keeps its marking; recurrent gates get a block each
        marked = {c.name: blocks_of(self._params[c.name]) for c in chosen}
        self.blocks: dict[str, int] = {
            c.name: marked[c.name] if marked[c.name] > 1 else c.blocks for c in chosen
        }

    @staticmethod
    def _warn_nothing_quantized(
        module: nn.Module, keep: Iterable[str], quantize_modules: Iterable[ModuleType]
    ) -> None:
        found = [c.name for c in quantizable(module, quantize_modules)]
        keep = tuple([keep] if isinstance(keep, str) else keep)
        reason = (
            f"all {len(found)} quantizable weights {found} are kept by "
            f"keep_full_precision={keep!r}; keep fewer"
            if found
            else "it has no layer distq quantizes (Linear, Conv, HF Conv1D, recurrent and "
            "attention layers: distq.selection); name further layer types with "
            "quantize_modules=(MyLayer, ...)"
        )
        warnings.warn(
            f"QuantizedOptimizer quantizes no tensor of {type(module).__name__}: {reason}",
            stacklevel=4,  # the caller of QuantizedOptimizer(...)
        )

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer, by the name of the constructor's argument."""
        return self.optimizer

    def _groups_by_parameter(self) -> dict[Tensor, dict[str, Any]]:
        return {p: g for g in self.param_groups for p in g["params"]}

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Latent update by the wrapped optimizer, then the proximal projection onto α·S."""
        loss = closure_loss(closure)
        self.take_rank0_latent()
        if not self._gradients_finite():
            return loss
        for name, p in self._params.items():
            p.copy_(self.latent[name])
        grads = self._meta_gradients_in() if self.meta is not None else {}
        self.optimizer.step()
        for name, g in grads.items():  # p.grad holds ∇ŵ again after the step
            self._params[name].grad.copy_(g)
        for name, p in self._params.items():
            latent = self.latent[name]
            latent.copy_(p)
            if self.clip_latent is not None:
                latent.clamp_(-self.clip_latent, self.clip_latent)
        self.steps_taken += 1
        self._project_all()
        return loss

    def _meta_gradients_in(self) -> dict[str, Tensor]:
        """Train the meta network on this step's ∇ŵ, put its gradients G in the quantized
        parameters' .grad for the wrapped step; returns the ∇ŵ taken out."""
        grads = {n: p.grad for n, p in self._params.items() if p.grad is not None}
        lrs = {n: float(self._group[self._params[n]]["lr"]) for n in grads}
        meta = self.meta.replace(grads, self.latent, lrs)
        taken = {n: g.clone() for n, g in grads.items()}
        for name, g in meta.items():
            grads[name].copy_(g)
        return taken

    @torch.no_grad()
    def take_rank0_latent(self) -> None:
        """Rank 0's latent weights and scales on every rank, once (see `sync_latent`): a
        collective at the first call, by `step()` or by whatever reads `latent` before it."""
        if self._synced:
            return
        self._synced = True
        if not (self.sync_latent and dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size() > 1:
            replicated = [
                (self.latent[n], self.alpha.get(n)) for n in self.latent
                if not isinstance(self.latent[n], DTensor)
            ]  # fmt: skip
            for tensor in [t for pair in replicated for t in pair if t is not None]:
                buffer = tensor.contiguous()
                dist.broadcast(buffer, src=0)
                tensor.copy_(buffer)

    @torch.no_grad()
    def _project_all(self) -> None:
        """Write ŵ = argmin_{α·S, ‖ŵ‖₀ ≤ K} ‖ŵ − w‖²_D into every quantized parameter."""
        warm_start = get_scheme(self.scheme).warm_start  # iterative: start from the last α
        curvatures = {name: self.curvature(p) for name, p in self._params.items()}
        sparsities = self.current_sparsities(curvatures)

        def projection(name: str) -> Callable[[], Projection]:
            warm = warm_start and name in self.alpha
            opts = {"alpha_init": local(self.alpha[name])} if warm else {}
            bits, d = self.tensor_bits[name], curvatures[name]
            return lambda: self.project_at(name, bits, d, sparsities[name], **opts)

        jobs = [projection(name) for name in self._params]
        sharded = any(isinstance(t, DTensor) for t in self.latent.values())
        # FSDP: the shards' solvers run together, one merged all-reduce per round for all
        projections = in_lockstep(jobs) if sharded else [job() for job in jobs]
        for (name, p), proj in zip(self._params.items(), projections, strict=True):
            local(p).copy_(proj.q)
            self.alpha[name] = rows_like(proj.alpha, p) if self.per_channel else proj.alpha

    def project_at(
        self, name: str, bits: int, d: Tensor | None, sparsity: float, **opts: Any
    ) -> Projection:
        """The projection of tensor `name`'s latent w at `bits` bits with curvature `d`, under
        this optimizer's scale layout (per channel, blocks) and κ = `sparsity`. An FSDP2
        parameter gets this rank's rows of the whole tensor's projection (`q` its shard)."""
        latent = self.latent[name]
        if isinstance(latent, DTensor):
            return project_shard(
                latent.to_local(),
                local(d),
                self.scheme,
                bits,
                rows=latent.shape[0],
                group=_shard_group(name, latent),
                per_channel=self.per_channel,
                blocks=self.blocks[name],
                sparsity=sparsity,
                **opts,
            )
        return project(
            self.latent[name],
            d,
            self.scheme,
            bits,
            per_channel=self.per_channel,
            blocks=self.blocks[name],
            sparsity=sparsity,
            **opts,
        )

    # -- per-tensor widths ----------------------------------------------------------------------
    def _widths(self, bits_by_name: Mapping[str, int]) -> dict[str, int]:
        """{quantized name: bits} for the tensors `bits_by_name` matches (its exact name, else
        the first regex that matches all of the name); ValueError for a scheme of one width, a width
        the scheme cannot take, or an entry that matches no quantized tensor."""
        if not bits_by_name:
            return {}
        spec = get_scheme(self.scheme)
        if len(spec.bits) == 1:
            several = [s for s in SCHEMES if len(get_scheme(s).bits) > 1]
            raise ValueError(
                f"bits_by_name needs a scheme of several widths ({', '.join(several)}); scheme "
                f"{self.scheme!r} has only {spec.bits[0]} bit(s)"
            )
        for pattern, width in bits_by_name.items():
            try:
                scheme_bits(self.scheme, width)
            except ValueError as exc:
                raise ValueError(f"bits_by_name[{pattern!r}]: {exc}") from None
        return widths_by_name(self.names, bits_by_name, "quantized parameter", "quantized")

    @torch.no_grad()
    def set_bits(self, bits_by_name: Mapping[str, int]) -> None:
        """Quantize the tensors `bits_by_name` matches (names or regexes, checked as the
        constructor's) at those widths from now on, and project them again. A tensor whose
        width changes starts its solver cold (a codebook's α has 2^bits entries)."""
        widths = {**self.tensor_bits, **self._widths(bits_by_name)}
        self._take_widths(widths)
        self.allocated = True
        self._project_all()

    def _take_widths(self, widths: Mapping[str, int]) -> None:
        """Make `widths` the tensors' widths (dropping the warm start of those that change) and
        the summary's."""
        for name, width in widths.items():
            if width != self.tensor_bits[name]:
                self.alpha.pop(name, None)
        self.tensor_bits = dict(widths)
        rows = tuple(
            dataclasses.replace(r, bits=self.tensor_bits[r.name]) if r.quantized else r
            for r in self.summary.rows
        )
        self.summary = QuantizationSummary(self.summary.scheme, rows)

    def current_sparsities(self, curvatures: dict[str, Tensor | None]) -> dict[str, float]:
        """κ per quantized tensor at this step (the schedule's, split globally if asked)."""
        kappa = self.sparsity.at(self.steps_taken)
        if kappa == 0.0 or self.sparsity_scope == "tensor":
            return dict.fromkeys(self._params, kappa)
        d = {
            n: c if c is not None else torch.ones_like(self.latent[n])
            for n, c in curvatures.items()
        }
        return global_split(self.latent, d, kappa)

    @property
    def stored_bits(self) -> int:
        """Bits per code a packed export needs, when every tensor has the same width (else
        ValueError: `stored_bits_of` gives each tensor's)."""
        widths = {self.stored_bits_of(n) for n in self.names} or {self.stored_bits_of("")}
        if len(widths) > 1:
            raise ValueError(
                f"the quantized tensors have widths {sorted(widths)}; read each with stored_bits_of"
            )
        return widths.pop()

    def stored_bits_of(self, name: str) -> int:
        """Bits per code a packed export of tensor `name` needs: a binary code with zeros has
        three levels."""
        bits = self.tensor_bits.get(name, self.bits)
        sparse = self.sparsity.final > 0 or self.sparsity.initial > 0
        return 2 if (bits == 1 and sparse) else bits

    def masks(self) -> dict[str, Tensor]:
        """name -> bool tensor of the entries ŵ keeps (non-zero), for every quantized tensor."""
        return {name: p != 0 for name, p in self._params.items()}

    def mask_of(self, p: Tensor) -> Tensor | None:
        """The entries of parameter `p` that ŵ keeps; None when p is not sparsified. For
        QuantizedCommState.set_keep_mask: pruned weights' gradients stay off the wire."""
        if p not in self._param_names or self._param_names[p] not in self._params:
            return None
        if self.sparsity.final == 0 and self.sparsity.initial == 0:
            return None
        return p != 0

    def curvature(self, p: Tensor) -> Tensor | None:
        """d = √v̂ + ε from the wrapped optimizer's state for `p`; None (d ≡ 1) if it keeps none
        or loss_aware is off."""
        v_hat = self.second_moment(p)
        return None if v_hat is None else v_hat.sqrt().add_(self._group[p].get("eps", 1e-8))

    def second_moment(self, p: Tensor) -> Tensor | None:
        """v̂, the squared gradients the wrapped optimizer averages for `p` (Adam's bias-corrected
        v, RMSprop's square average, Adagrad's running sum): the empirical Fisher's diagonal, up
        to one factor shared by every tensor (the optimizer's own tensor where it keeps v̂ as is:
        read it, never write it); None if it keeps none or loss_aware is off."""
        if not self.loss_aware:
            return None
        state = self.optimizer.state.get(p, {})
        group = self._group[p]
        if "exp_avg_sq" in state:  # Adam, AdamW, NAdam, RAdam
            v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
            return v / (1.0 - group["betas"][1] ** float(state["step"]))
        if "square_avg" in state:  # RMSprop
            return state["square_avg"]
        if "sum" in state:  # Adagrad
            return state["sum"]
        return None

    def _gradients_finite(self) -> bool:
        """True if every gradient is finite; otherwise skip (warn) or raise, per `nonfinite`."""
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [local(p.grad) for p in params]
        finite = not grads or bool(torch.stack([g.isfinite().all() for g in grads]).all())
        if self.sharded:  # every rank skips or steps alike, whichever shard held the NaN
            vote = torch.tensor([int(finite)], dtype=torch.int32)
            dist.all_reduce(vote, op=dist.ReduceOp.MIN)
            finite = bool(vote.item())
        if finite:
            return True
        bad = [
            self._param_names.get(p, "?")
            for p, grad in zip(params, grads, strict=True)
            if not grad.isfinite().all()
        ] or ["another rank's shard"]
        message = f"non-finite gradient in {bad}"
        if self.nonfinite == "raise":
            raise FloatingPointError(message)
        self.skipped_steps += 1
        warnings.warn(f"{message}; step skipped, latent weights unchanged", stacklevel=3)
        return False

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus latent weights, scales and the quantization setup."""
        return {
            "base": self.optimizer.state_dict(),
            "latent": {n: t.clone() for n, t in self.latent.items()},
            "alpha": {n: t.clone() for n, t in self.alpha.items()},
            "quantization": self.config(),
            "skipped_steps": self.skipped_steps,
            "steps_taken": self.steps_taken,
            **({"meta": self.meta.state_dict()} if self.meta is not None else {}),
            **({"tensor_bits": dict(self.tensor_bits)} if self.allocated else {}),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore base state, latent weights and scales; ŵ comes from the model's state_dict.

        ŵ is not recomputed here: the iterative solvers (`Scheme.warm_start`) start from the
        previous α, so only the saved ŵ (in the model checkpoint) resumes bit-exactly.
        """
        # older checkpoints: straight-through, one width for all
        saved = {"estimator": "ste", "bits_by_name": {}, **state_dict["quantization"]}
        mine = self.config()
        different = [k for k in mine if saved.get(k) != mine[k]]
        if different:
            detail = ", ".join(
                f"{k}: checkpoint {saved.get(k)!r} vs now {mine[k]!r}" for k in different
            )
            raise ValueError(f"checkpoint was made with another quantization setup ({detail})")
        self._load_widths(state_dict.get("tensor_bits"))
        self.optimizer.load_state_dict(shard_optimizer_state(state_dict["base"], self.optimizer))
        self._group = self._groups_by_parameter()  # the load made new group dicts
        with torch.no_grad():
            for name, latent in self.latent.items():
                latent.copy_(shard_like(state_dict["latent"][name], latent))
            self.alpha = {
                n: shard_like(t.clone(), self._params[n]) if self.per_channel else t.clone()
                for n, t in state_dict["alpha"].items()
            }
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.steps_taken = int(state_dict.get("steps_taken", 0))
        if self.meta is not None:
            self.meta.load_state_dict(state_dict["meta"])

    def _load_widths(self, saved: Mapping[str, int] | None) -> None:
        """Take the widths a bit allocation chose before the checkpoint (`saved`; None: the
        constructor's); refused when this optimizer has allocated other widths already."""
        widths = dict(saved) if saved is not None else dict(self.tensor_bits)
        if saved is not None:
            self._widths(widths)  # the checkpoint's names and widths must fit this optimizer
        if self.allocated and widths != self.tensor_bits:
            changed = {
                n: (widths.get(n), b) for n, b in self.tensor_bits.items() if widths.get(n) != b
            }
            raise ValueError(
                "checkpoint holds other weight widths than this optimizer's allocation "
                f"(name: (checkpoint, now)): {changed}"
            )
        if saved is not None:
            self._take_widths(widths)
            self.allocated = True

    def config(self) -> dict[str, Any]:
        """The settings a checkpoint must agree with to be resumed by this optimizer."""
        return {
            "scheme": self.scheme,
            "bits": self.bits,
            "per_channel": self.per_channel,
            "names": list(self.names),
            "sparsity": dataclasses.asdict(self.sparsity),
            "sparsity_scope": self.sparsity_scope,
            "estimator": self.estimator,
            "bits_by_name": dict(self.bits_by_name),
        }

    def quantized_parameters(self) -> dict[str, nn.Parameter]:
        """name -> parameter of every quantized tensor (each holds ŵ)."""
        return dict(self._params)

    def __repr__(self) -> str:
        return (
            f"QuantizedOptimizer({type(self.optimizer).__name__}, scheme={self.scheme!r}, "
            f"bits={self._bits_text()}, quantized={len(self.names)} tensors)"
        )

    def _bits_text(self) -> str:
        """The width for repr: one number, or the range of per-tensor widths."""
        widths = sorted(set(self.tensor_bits.values())) or [self.bits]
        return str(widths[0]) if len(widths) == 1 else f"{widths[0]}..{widths[-1]} per tensor"


def _shard_group(name: str, t: DTensor) -> dist.ProcessGroup:
    """The process group `t` is sharded over: FSDP2's Shard(0) over a 1-D mesh, else refused."""
    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise ValueError(
            f"parameter {name!r} is a DTensor placed {tuple(t.placements)} over a "
            f"{t.device_mesh.ndim}-D mesh; distq projects FSDP2's Shard(0) over a 1-D mesh"
        )
    return t.device_mesh.get_group()


def _check_options(
    base_optimizer: object, nonfinite: str, clip_latent: float | None, sparsity_scope: str
) -> None:
    """Reject constructor arguments QuantizedOptimizer cannot work with, naming what is allowed."""
    if not isinstance(base_optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
        )
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite={nonfinite!r}; allowed: {', '.join(NONFINITE_POLICIES)}")
    if clip_latent is not None and not clip_latent > 0:
        raise ValueError(f"clip_latent={clip_latent!r}; allowed: a positive float or None")
    if sparsity_scope not in SCOPES:
        raise ValueError(f"sparsity_scope={sparsity_scope!r}; allowed: {', '.join(SCOPES)}")
