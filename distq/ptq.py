"""Post-training quantization layer by layer: a trained full-precision model and a little
calibration data in, the same model with binary/ternary/m-bit weights out.

Each quantized layer (Linear, Conv2d, an LSTM's gate matrices) computes y = W x (+ b). Its
quantized weights are chosen to keep its outputs on the calibration inputs, not its weights:

    Ŵ = argmin over α·S  E‖W x − Ŵ x̂‖²,

x the layer's input in the full-precision network and x̂ its input in the network whose earlier
layers are already quantized (x̂ = x for the first one). For one output row r and x̂ = x the
objective is (w_r − ŵ_r)ᵀ H (w_r − ŵ_r) with H = E[x xᵀ]; its diagonal d_j = E[x_j²] turns it
into ‖ŵ − w‖²_D, the problem every loss-aware solver of distq.quant already solves with
d = √v̂ + ε from Adam. So d is the layer-wise analogue of the loss-aware curvature, taken from
the inputs instead of the gradients; it is exact when H is diagonal (decorrelated inputs).

Ours, per layer, in forward order:
  1. run the calibration data through the full-precision and the partly quantized network and
     accumulate H_xx = E[x xᵀ], H_x̂x̂ = E[x̂ x̂ᵀ] and the cross moment E[x x̂ᵀ] (float64);
  2. project W with the scheme's solver twice: with d_ij = E[x̂_j²] (broadcast over the output
     rows i; for a Conv2d, x is the unfolded input patch, so d_{o,c,u,v} = E[x_{c,p+(u,v)}²]
     over samples and output positions p, zero padding included) and with d = 1;
  3. refit each candidate's free values by least squares on the output error above (α per
     scale group; α⁺ and α⁻ for ternary2; the codebook for shared), the codes fixed; the
     objective is evaluated exactly from the moments, and a refit that does not lower it is
     dropped;
  4. keep, per scale group, the candidate with the lower output error (output rows decouple, so
     groups may differ), write Ŵ into the model, and move on: the next layer is calibrated on
     the outputs of the quantized one (the x̂ above), so it fits what it will actually see.
Step 4 means that on each layer's calibration inputs the error is never above that of the
plain projection; whether the data-weighted one wins is reported per layer (`LayerReport`).

What is the papers': L-OBS (Dong, Chen & Pan, NeurIPS 2017) compresses layer by layer with the
layer-wise error E‖W x − Ŵ x‖² whose Hessian is H = E[x xᵀ], uses its full inverse (Optimal
Brain Surgeon) to prune, and bounds how layer errors add up through the network; L-DNQ (Chen
et al., AAAI 2019) quantizes with a layer-wise objective of that kind and about 1% of the
training data, solving each layer's problem by an alternation (ADMM-style, as the paper
describes it) between a full-precision update and its projection onto the quantized set.
Neither paper's code is reproduced here. distq's simplification: the diagonal of H only (so no
inverse, and the existing exact or alternating solvers), codes fixed after the projection,
one exact least-squares refit of the values, the better of two projections kept, and the
propagation of quantized inputs that step 1 describes. Other layers whose forward never runs
as a module (weights applied with functional.linear) and other layer types get the plain
projection (d = 1) and say so.

An LSTM layer (distq.lstm.QuantLSTMLayer) applies its gate matrices with functional.linear,
so its own forward is hooked instead: W_x's inputs are the layer's inputs x_t, W_h's the
hidden states h_{t−1} it multiplies (the initial state, then its outputs h_1..h_{T−1}), every
call of the layer counted (a burn-in and the scored part are two), rows over batch and time.
The objective is the term W·v before the layer's normalization (with weight, layer or
batch-shared norm the gates see N(W·v), which this does not model). ĥ comes from the network
with W_x and the earlier layers quantized and W_h still full precision: the recurrence feeds
Ŵ_h's own outputs back, which a layer-wise fit cannot see.

`method="naive"` is the baseline: every selected weight projected with d = 1 (naive
rounding onto the scheme's set), no calibration data, no refit, no propagation.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional

from distq.lstm import QuantLSTMLayer
from distq.quant import Projection, blocks_of, get_scheme, project, scheme_bits
from distq.selection import POSITIONAL, ModuleType, select

log = logging.getLogger(__name__)

METHODS = ("layerwise", "naive")


@dataclass(frozen=True)
class LayerReport:
    """One quantized weight: how it was chosen and its relative output error on the calibration
    inputs, ‖W x − Ŵ x̂‖² / ‖W x‖² (NaN where no inputs were seen), for the kept Ŵ and for the
    plain projection (d = 1, no refit) on the same inputs; `data_groups` of `groups` scale groups
    kept the data-weighted candidate."""

    name: str
    source: str  # "inputs" (layer-wise) or why the plain projection was used
    error: float
    naive_error: float
    data_groups: int
    groups: int


@dataclass(frozen=True)
class PTQResult:
    """The projections written into the model (name -> Projection) and a report per layer."""

    projections: dict[str, Projection]
    layers: tuple[LayerReport, ...]

    def to_str(self) -> str:
        width = max([len(r.name) for r in self.layers] + [9])
        lines = [f"{'parameter':<{width}}  {'output error':>12} {'naive':>9}  chosen by"]
        for r in self.layers:
            how = (
                f"d = E[x²] in {r.data_groups}/{r.groups} groups"
                if r.source == "inputs"
                else r.source
            )
            lines.append(f"{r.name:<{width}}  {r.error:>12.4g} {r.naive_error:>9.4g}  {how}")
        return "\n".join(lines)


class _StopForwardError(Exception):
    """Raised by the capture hook once the layer's input is in: the rest of the forward is
    not needed."""


@dataclass
class _Moments:
    """Running float64 sums of x xᵀ, x̂ x̂ᵀ and x x̂ᵀ over calibration rows."""

    xx: Tensor | None = None
    qq: Tensor | None = None
    xq: Tensor | None = None
    rows: int = 0

    def add(self, x: Tensor, q: Tensor) -> None:
        x, q = x.double(), q.double()
        parts = (x.T @ x, q.T @ q, x.T @ q)
        if self.xx is None:
            self.xx, self.qq, self.xq = parts
        else:
            self.xx += parts[0]
            self.qq += parts[1]
            self.xq += parts[2]
        self.rows += x.shape[0]

    def mean(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.xx / self.rows, self.qq / self.rows, self.xq / self.rows


def quantize_model(
    model: nn.Module,
    calibration: Tensor | Iterable[Tensor] | None,
    scheme: str,
    bits: int | None = None,
    *,
    method: str = "layerwise",
    keep_full_precision: Iterable[str] = POSITIONAL,
    quantize_modules: Iterable[ModuleType] = (),
    per_channel: bool = False,
    refit: bool = True,
    batch_size: int = 256,
    progress: Callable[[str], None] | None = None,
) -> PTQResult:
    """Quantize `model`'s selected weights in place (distq.selection's policy, as
    QuantizedOptimizer selects them) from `calibration` inputs (a tensor split into batches of
    `batch_size` along dim 0, or an iterable of batches; None for method="naive").

    Returns the projections (α or codebook per weight: what QuantizedOptimizer keeps as
    `alpha`) and a report per layer; `progress` is called with a line per layer. Raises
    ValueError for an unknown method or scheme, bad bits, or no calibration data for
    "layerwise". See the module docstring for the method.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")
    spec = get_scheme(scheme)
    bits = scheme_bits(scheme, bits)
    chosen = select(model, keep_full_precision, quantize_modules)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    batches = _batches(calibration, batch_size) if method == "layerwise" else []
    if method == "layerwise" and not batches:
        raise ValueError("method='layerwise' needs calibration inputs (got none)")
    reference = copy.deepcopy(model).eval() if batches else None
    was_training = model.training
    model.eval()
    projections, layers = {}, []
    try:
        for candidate in chosen:
            p = params[candidate.name]
            blocks = max(candidate.blocks, blocks_of(p))
            opts = {"per_channel": per_channel, "blocks": blocks}
            owner = modules.get(candidate.name.rsplit(".", 1)[0] if "." in candidate.name else "")
            gate = _lstm_gate(modules, candidate.name)
            reason = _unsupported(owner, candidate.name) if batches else "naive rounding (d = 1)"
            moments = None
            if reason is None and gate is not None:
                moments = _collect_gate(model, reference, *gate, batches)
            elif reason is None:
                moments = _collect(model, reference, owner, candidate.name, batches)
            if moments is not None and moments.rows == 0:
                reason = "d = 1: its forward never ran as a module"
            if reason is not None:
                proj = project(p.detach(), None, scheme, bits, **opts)
                report = LayerReport(candidate.name, reason, float("nan"), float("nan"), 0, 0)
            else:
                proj, report = _solve(p.detach(), owner, moments, scheme, bits, spec, opts, refit)
                report = LayerReport(candidate.name, *report)
            with torch.no_grad():
                p.copy_(proj.q)
            projections[candidate.name] = proj
            layers.append(report)
            if progress is not None:
                progress(_line(report))
    finally:
        model.train(was_training)
    return PTQResult(projections, tuple(layers))


def _line(r: LayerReport) -> str:
    if r.source != "inputs":
        return f"{r.name}: {r.source}"
    return (
        f"{r.name}: output error {r.error:.4g} (naive rounding {r.naive_error:.4g}), "
        f"d = E[x²] kept in {r.data_groups}/{r.groups} scale groups"
    )


def _batches(calibration: Tensor | Iterable[Tensor] | None, batch_size: int) -> list[Tensor]:
    if calibration is None:
        return []
    if isinstance(calibration, Tensor):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; allowed: a positive integer")
        return list(calibration.split(batch_size)) if len(calibration) else []
    return list(calibration)


def _unsupported(module: nn.Module | None, name: str) -> str | None:
    """Why `name` gets the plain projection, or None when its inputs can be collected."""
    if isinstance(module, nn.Linear) and name.endswith("weight"):
        return None
    if (
        isinstance(module, nn.Conv2d)
        and name.endswith("weight")
        and module.groups == 1
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
    ):
        return None
    kind = type(module).__name__ if module is not None else "no module"
    return f"d = 1: layer-wise inputs are collected for Linear and Conv2d only ({kind})"


def _lstm_gate(modules: dict[str, nn.Module], name: str) -> tuple[str, str] | None:
    """(the QuantLSTMLayer's path, "ih" or "hh") when `name` is one of its gate matrices."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-1] != "weight" or parts[-2] not in ("ih", "hh"):
        return None
    path = ".".join(parts[:-2])
    return (path, parts[-2]) if isinstance(modules.get(path), QuantLSTMLayer) else None


def _gate_rows(which: str, args: tuple, output: tuple) -> Tensor:
    """The vectors a gate matrix multiplies in one call of an LSTM layer, as rows: x_t for
    W_x ("ih"), h_{t−1} for W_h ("hh": the initial state, then the outputs but the last)."""
    x = args[0]
    if which == "ih":
        return x.reshape(-1, x.shape[-1])
    outputs = output[0]
    state = args[1] if len(args) > 1 else None
    h0 = outputs.new_zeros(outputs.shape[0], outputs.shape[2]) if state is None else state[0]
    previous = torch.cat([h0[:, None], outputs[:, :-1]], dim=1)
    return previous.reshape(-1, previous.shape[-1])


def _record_gate_rows(net: nn.Module, layer: nn.Module, which: str, batch: Tensor) -> list[Tensor]:
    """`which` gate matrix's input rows of every call of `layer` while `net` runs on `batch`."""
    seen: list[Tensor] = []

    def hook(mod: nn.Module, args: tuple, output: tuple) -> None:
        seen.append(_gate_rows(which, args, output).detach())

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            net(batch)
    finally:
        handle.remove()
    return seen


def _collect_gate(
    model: nn.Module, reference: nn.Module, path: str, which: str, batches: list[Tensor]
) -> _Moments:
    """Moments of an LSTM gate matrix's inputs in the full-precision `reference` (x, h) and the
    partly quantized `model` (x̂, ĥ), call by call (the module docstring)."""
    layer, twin = model.get_submodule(path), reference.get_submodule(path)
    moments = _Moments()
    for batch in batches:
        quantized = _record_gate_rows(model, layer, which, batch)
        full = _record_gate_rows(reference, twin, which, batch)
        for x, q in zip(full, quantized, strict=True):
            moments.add(x, q)
    return moments


def _inputs(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as rows that W multiplies: (N, in) for Linear, unfolded patches
    (N·positions, C·kh·kw) for Conv2d."""
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        patches = functional.unfold(
            x, module.kernel_size, module.dilation, module.padding, module.stride
        )
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _capture(net: nn.Module, module: nn.Module, batch: Tensor) -> Tensor | None:
    """The input `module` receives when `net` runs on `batch` (None if it never runs)."""
    seen: list[Tensor] = []

    def hook(mod: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach())
        raise _StopForwardError

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            net(batch)
    except _StopForwardError:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else None


def _collect(
    model: nn.Module, reference: nn.Module, module: nn.Module, name: str, batches: list[Tensor]
) -> _Moments:
    """Moments of the layer's inputs in the full-precision `reference` (x) and the partly
    quantized `model` (x̂) over the calibration batches."""
    path = name.rsplit(".", 1)[0] if "." in name else ""
    twin = reference.get_submodule(path) if path else reference
    moments = _Moments()
    for batch in batches:
        q = _capture(model, module, batch)
        if q is None:
            break
        x = _capture(reference, twin, batch)
        moments.add(_inputs(twin, x), _inputs(module, q))
    return moments


def _solve(
    w: Tensor,
    module: nn.Module,
    moments: _Moments,
    scheme: str,
    bits: int,
    spec,
    opts: dict,
    refit: bool,
) -> tuple[Projection, tuple]:
    """Both candidates (d from the inputs, d = 1), refitted, the better kept per scale group."""
    hxx, hqq, hxq = moments.mean()
    W = w.reshape(w.shape[0], -1).double()
    energy = hqq.diagonal().clamp_min(0)
    if not (energy.sum() > 0):  # all-zero inputs: every Ŵ gives the same outputs
        energy = torch.ones_like(energy)
    d = (energy + 1e-12 * energy.mean()).to(w.dtype).expand(W.shape).reshape(w.shape)
    groups = _group_rows(w.shape[0], opts)
    cross = W @ hxq  # (out, in): row r's ⟨W x, ·x̂⟩
    target = ((W @ hxx) * W).sum(1)  # E[(W x)_r²]

    def row_error(q: Tensor) -> Tensor:
        Q = q.reshape(W.shape).double()
        return target - 2 * (cross * Q).sum(1) + ((Q @ hqq) * Q).sum(1)

    naive = project(w, None, scheme, bits, **opts)
    naive_err = row_error(naive.q)
    candidates = []
    for dd in (d, None):
        proj = project(w, dd, scheme, bits, **opts)
        if refit and spec.loss_aware:
            proj = _refit(proj, spec, groups, cross, hqq, row_error)
        candidates.append((proj, _by_group(row_error(proj.q), groups)))
    (data, e_data), (plain, e_plain) = candidates
    use_data = e_data <= e_plain
    q = _pick_rows(data.q, plain.q, use_data, groups)
    alpha = _pick_alpha(data.alpha, plain.alpha, use_data)
    chosen = Projection(q=q, alpha=alpha)
    total = float(target.sum())
    scale = total if total > 0 else 1.0
    report = (
        "inputs",
        float(row_error(q).sum()) / scale,
        float(naive_err.sum()) / scale,
        int(use_data.sum()),
        len(groups),
    )
    return chosen, report


def _group_rows(rows: int, opts: dict) -> list[slice]:
    """The output rows of each scale group (as distq.quant.as_groups forms them)."""
    if opts["per_channel"]:
        return [slice(r, r + 1) for r in range(rows)]
    size = rows // opts["blocks"]
    return [slice(b * size, (b + 1) * size) for b in range(opts["blocks"])]


def _by_group(per_row: Tensor, groups: list[slice]) -> Tensor:
    return torch.stack([per_row[g].sum() for g in groups])


def _pick_rows(a: Tensor, b: Tensor, use_a: Tensor, groups: list[slice]) -> Tensor:
    out = b.clone()
    for g, take in zip(groups, use_a.tolist(), strict=True):
        if take:
            out[g] = a[g]
    return out


def _pick_alpha(a: Tensor, b: Tensor, use_a: Tensor) -> Tensor:
    """a's values for the groups in use_a, b's elsewhere (alpha: one row of values a group)."""
    rows = use_a.numel()
    picked = torch.where(use_a[:, None], a.reshape(rows, -1), b.reshape(rows, -1))
    return picked.reshape(a.shape)


def _basis(proj: Projection, spec, groups: list[slice]) -> tuple[Tensor, Tensor]:
    """Ŵ = Σ_j θ_gj A_j on each scale group g: the fixed patterns A (J, rows, n) and the
    current values θ (G, J): α·codes (J = 1), α⁺ and α⁻ (ternary2), or the codebook (shared)."""
    rows = proj.q.shape[0]
    q = proj.q.reshape(rows, -1).double()
    theta = proj.alpha.double().reshape(len(groups), -1)
    group_of = torch.cat(
        [torch.full((sl.stop - sl.start,), g, dtype=torch.long) for g, sl in enumerate(groups)]
    )
    if spec.codebook:
        values = theta[group_of]  # (rows, k)
        A = (q[None] == values.T[:, :, None]).double()  # (k, rows, n)
    elif theta.shape[1] == 2:  # ternary2: α⁺ and α⁻
        A = torch.stack([(q > 0).double(), -(q < 0).double()])
    else:
        scale = theta[group_of, :1]
        A = torch.where(scale > 0, q / scale.clamp_min(1e-300), 0.0)[None]
    return A, theta


def _refit(
    proj: Projection,
    spec,
    groups: list[slice],
    cross: Tensor,
    hqq: Tensor,
    row_error: Callable[[Tensor], Tensor],
) -> Projection:
    """θ = argmin Σ_rows E‖(W x − Ŵ(θ) x̂)_r‖² per group, codes fixed; kept per group only
    where it lowers the error (and, for scales, stays positive)."""
    A, theta = _basis(proj, spec, groups)
    AH = torch.einsum("jrn,nm->jrm", A, hqq)
    new_theta = theta.clone()
    for g, sl in enumerate(groups):
        gram = torch.einsum("jrm,krm->jk", AH[:, sl], A[:, sl])
        rhs = torch.einsum("rm,jrm->j", cross[sl], A[:, sl])
        ridge = 1e-12 * gram.diagonal().abs().max().clamp_min(1e-300)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        new_theta[g] = torch.linalg.solve(gram + ridge * eye, rhs + ridge * theta[g])
    if not spec.codebook:
        new_theta = torch.where(new_theta > 0, new_theta, theta)
    q_new = _assemble(A, new_theta, groups)
    old = _by_group(row_error(proj.q), groups)
    new = _by_group(row_error(q_new), groups)
    better = new < old
    q = _pick_rows(q_new.to(proj.q.dtype).reshape(proj.q.shape), proj.q, better, groups)
    kept = torch.where(better[:, None], new_theta, theta)
    if spec.codebook:
        kept = kept.sort(dim=1).values
    alpha = kept.reshape(proj.alpha.shape).to(proj.alpha.dtype)
    return Projection(q=q + 0.0, alpha=alpha)


def _assemble(A: Tensor, theta: Tensor, groups: list[slice]) -> Tensor:
    out = torch.zeros(A.shape[1:], dtype=A.dtype)
    for g, sl in enumerate(groups):
        out[sl] = torch.einsum("j,jrn->rn", theta[g], A[:, sl])
    return out
