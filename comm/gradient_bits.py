"""Per-tensor gradient widths under a wire budget, chosen by the same curvature d that chooses the
weight widths (issue 24 item 4; ours). The result is `bits_by_name` for `ExchangeSettings`.

Cost of sending tensor i's gradient at m bits. `StochasticQuantizer` gives element j of a bucket
with scale s_b = max|x| over the bucket, k = 2^(m−1) − 1 and f_j = frac(|x_j|·k/s_b) the value
(⌊|x_j|k/s_b⌋ + 1)·s_b/k with probability f_j, else ⌊…⌋·s_b/k: unbiased, with variance
(s_b/k)²·f_j(1 − f_j) (m = 1: ±s_b, variance s_b² − x_j²). So, exactly, given x,

    V_m(x; w) = Σ_b (s_b²/k_m²) Σ_{j∈b} w_j f_j(1 − f_j),

the value Lemma 3 bounds by Δ_g‖x‖_∞‖x‖₁ per bucket (`distq.theory.lemma3_variance_bound`).
With n ranks the averaged gradient's error is e = (Σ_r e1_r + e2)/n: the ranks' first
quantization of x_r = Clip(g_r), and for 'scatter' the owner's second one of the sum
S = Σ_r Q(x_r), independent given the codes. 'allgather' quantizes every x_r whole; 'scatter'
(per-bucket scales) sends chunk j of x_r to owner j, which keeps its own chunk exact, so an
element is quantized by n − 1 of the ranks: with the tensor's buckets spread evenly over the
owners, E‖e‖²_w = ((n−1)/n·Σ_r V_m(x_r) + V_m(S))/n². V_m(S) is evaluated at S ≈ Σ_r x_r (the
first codes' noise moves the bucket maxima; ignored). Against 300 real 2-rank scatter exchanges
of a 4096-element gradient the law is 0.04% (2 bits) and 2.7% (4 bits) high
(tests/comm/test_gradient_bits.py holds it within 5%).

Weight w = 1/d, d = √v̂ + ε (Adam's curvature, `QuantizedOptimizer.curvature`). Why 1/d: the weight
allocator's cost S_i(m) = Σ d(ŵ − w)² is the optimizer's own quadratic model of the loss,
L(w + δ) − L(w) ≈ g·δ + δᵀDδ/(2η). Gradient noise e moves the weights by δ = −η·e/d in total (the
momentum's weights (1 − β₁)β₁^t sum to one), with E[δ] = 0, so the expected loss it adds is
E[δᵀDδ]/(2η) = (η/2)·Σ E[e_j²]/d_j: the cost is Σ E[e²]/d, the constant η/2 dropped.
metric="update" weighs by 1/d² instead: the Euclidean error of the update itself (η²·Σ E[e²]/d²).
The noise's effect on v̂ (second order) is ignored. Without curvature (SGD) w ≡ 1.

Budget: Σ_i n_i·m_i ≤ ⌊budget·Σ_i n_i⌋ code bits, solved exactly by
`distq.bit_allocation.allocate`. The scales (4 bytes per `bucket_size` elements) are left out of
the budget because every width sends the same ones; what changes the bytes beyond the codes is
padding: each width of a mixed bucket is exchanged on its own, and 'scatter' pads every exchange
to whole chunks. `bytes_sent` predicts the exact bytes a rank sends for a layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from distq.bit_allocation import Allocation, allocate, check_candidates
from distq.comm.clipping import clip_by_rms_
from distq.comm.collectives import chunk_length
from distq.comm.exchange import ExchangeSettings
from distq.quant import levels_per_sign
from distq.theory.exchange import collective as collective_record

METRICS = ("loss", "update")

Gradients = Mapping[str, Tensor]


def quantization_error(
    x: Tensor, bits: int, bucket_size: int | None, weight: Tensor | None = None
) -> float:
    """E Σ_j w_j (Q(x)_j − x_j)² of `StochasticQuantizer(bits, bucket_size)` (float32 scales) on
    flat x, exactly (module docstring); weight None: w ≡ 1."""
    x = x.detach().reshape(-1).to(torch.float64)
    size = bucket_size or max(1, x.numel())
    pad = -x.numel() % size
    a = torch.nn.functional.pad(x.abs(), (0, pad)).view(-1, size)
    s = a.amax(dim=1, keepdim=True).to(torch.float32).to(torch.float64)
    k = levels_per_sign(bits)
    if k == 0:  # 1 bit: ±s, P(+s) = (1 + x/s)/2
        var = s.square() - a.square()
    else:
        y = torch.where(s > 0, a * k / s.clamp_min(1e-300), 0.0)
        f = y - y.floor()
        var = (s / k).square() * f * (1 - f)
    var = var.reshape(-1)[: x.numel()]
    if weight is not None:
        var = var * weight.detach().reshape(-1).to(torch.float64)
    return float(var.sum())


def gradient_costs(
    steps: Sequence[Sequence[Gradients]],
    curvature: Mapping[str, Tensor | None],
    candidates: Sequence[int],
    settings: ExchangeSettings,
    metric: str = "loss",
) -> dict[str, dict[int, float]]:
    """C_i(m) = E‖e_i‖²_w of tensor i's averaged gradient at m bits (module docstring), averaged
    over `steps`, each a list of the ranks' {name: gradient} at one step; `curvature[name]` is
    d (None: d ≡ 1). Refused for a compressor other than 'quantize' or widths it cannot send."""
    _check_law(settings, candidates, metric)
    if not steps or not all(steps):
        raise ValueError("gradient_costs needs at least one step of the ranks' gradients")
    names = list(curvature)
    first = torch.zeros(len(names), len(candidates), dtype=torch.float64)
    second = torch.zeros_like(first)
    twice = settings.collective == "scatter"  # the owner's second quantization
    for ranks in steps:
        if len(ranks) != len(steps[0]):
            raise ValueError("every step needs the gradients of the same number of ranks")
        for i, name in enumerate(names):
            clipped = [_clipped(r[name], settings.clip) for r in ranks]
            weight = _weight(curvature[name], metric)
            first[i] += _errors(clipped, candidates, settings.bucket_size, weight)
            if twice:
                total = torch.stack(clipped).sum(0)
                second[i] += _errors([total], candidates, settings.bucket_size, weight)
    return _costs(names, candidates, first, second, len(steps[0]), len(steps), settings)


def gradient_costs_across(
    own_steps: Sequence[Gradients],
    curvature: Mapping[str, Tensor | None],
    candidates: Sequence[int],
    settings: ExchangeSettings,
    metric: str = "loss",
    group: dist.ProcessGroup | None = None,
) -> dict[str, dict[int, float]]:
    """`gradient_costs` of the ranks of `group` (a collective: every rank calls it with as many
    steps), each passing only its own {name: gradient} per step: the first quantization's errors
    are summed by one all-reduce and, for 'scatter', each step's Σ_r Clip(g_r) by another, so no
    rank holds the others' gradients. Every rank gets the same costs."""
    _check_law(settings, candidates, metric)
    if not own_steps:
        raise ValueError("gradient_costs_across needs at least one step of this rank's gradients")
    names = list(curvature)
    device = own_steps[0][names[0]].device
    first = torch.zeros(len(names), len(candidates), dtype=torch.float64, device=device)
    second = torch.zeros_like(first)
    twice = settings.collective == "scatter"  # the owner's second quantization
    for own in own_steps:
        clipped = [_clipped(own[name], settings.clip) for name in names]
        if twice:
            total = torch.cat(clipped)
            dist.all_reduce(total, group=group)
            totals = total.split([x.numel() for x in clipped])
        for i, name in enumerate(names):
            weight = _weight(curvature[name], metric)
            first[i] += _errors([clipped[i]], candidates, settings.bucket_size, weight)
            if twice:
                second[i] += _errors([totals[i]], candidates, settings.bucket_size, weight)
    dist.all_reduce(first, group=group)
    ranks = dist.get_world_size(group)
    return _costs(names, candidates, first.cpu(), second.cpu(), ranks, len(own_steps), settings)


def _check_law(settings: ExchangeSettings, candidates: Sequence[int], metric: str) -> None:
    """Refuse what the cost law does not describe, naming what it does."""
    if settings.compressor != "quantize" or settings.error_feedback:
        raise ValueError(
            f"compressor={settings.compressor!r}, error_feedback={settings.error_feedback}: the "
            "cost law is that of the plain stochastic m-bit quantizer; allowed: compressor "
            "'quantize' without error feedback"
        )
    if settings.collective not in ("scatter", "allgather"):
        raise ValueError(
            f"collective={settings.collective!r}: the cost law counts each rank's quantization; "
            "allowed: scatter, allgather"
        )
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; allowed: {', '.join(METRICS)}")
    check_candidates(candidates)
    for m in candidates:
        settings.width(m, "bit candidate")


def _weight(d: Tensor | None, metric: str) -> Tensor | None:
    """The per-element weight of the error: 1/d ('loss'), 1/d² ('update'), none without d."""
    return None if d is None else d.pow(-1.0 if metric == "loss" else -2.0)


def _errors(
    xs: Sequence[Tensor], candidates: Sequence[int], bucket_size: int | None, weight: Tensor | None
) -> Tensor:
    """Σ_x E‖Q_m(x) − x‖²_w for each candidate width m."""
    return torch.tensor(
        [sum(quantization_error(x, m, bucket_size, weight) for x in xs) for m in candidates],
        dtype=torch.float64,
        device=weight.device if weight is not None else xs[0].device,
    )


def _costs(
    names: list[str],
    candidates: Sequence[int],
    first: Tensor,
    second: Tensor,
    ranks: int,
    steps: int,
    settings: ExchangeSettings,
) -> dict[str, dict[int, float]]:
    """C_i(m) from the summed first-quantization errors Σ_r V_m(x_r) and the second's V_m(S) per
    step: ((n−1)/n·first + second)/n² for 'scatter' over buckets, first/n² for 'allgather'."""
    twice = settings.collective == "scatter"
    quantized_by = (ranks - 1) / ranks if twice and settings.bucket_size else 1.0
    cost = (quantized_by * first + second) / ranks**2 / steps  # second: zero for 'allgather'
    rows = zip(names, cost.tolist(), strict=True)
    return {name: dict(zip(candidates, row, strict=True)) for name, row in rows}


def _clipped(g: Tensor, clip: float | None) -> Tensor:
    x = g.detach().reshape(-1).to(torch.float32, copy=True)
    return x if clip is None else clip_by_rms_(x, clip)


def allocate_gradient_bits(
    costs: Mapping[str, Mapping[int, float]], numel: Mapping[str, int], budget: float
) -> Allocation:
    """The widths minimizing Σ C_i(m_i) with Σ n_i·m_i ≤ ⌊budget·Σ n_i⌋ code bits (exact,
    `distq.bit_allocation.allocate`); `.bits` is the `bits_by_name` for `ExchangeSettings`. A
    budget outside the candidates' range, NaN or not a number is refused naming the range."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"gradient bits budget {budget!r}; allowed: a number of bits per element")
    return allocate(costs, numel, budget)


def bytes_sent(
    buckets: Sequence[Sequence[tuple[int, int]]],
    settings: ExchangeSettings,
    ranks: int,
    nodes: int = 1,
) -> int:
    """Quantized bytes one rank sends per step for exchange buckets of (numel, bits) tensors, as
    `GradientExchange` sends them: a bucket under `min_numel` goes fp32 (not counted here), one
    of a single width in one exchange, a mixed one in one exchange per width."""
    record = collective_record(settings.collective)
    total = 0
    for bucket in buckets:
        if sum(n for n, _ in bucket) < settings.min_numel:
            continue
        for bits in sorted({b for _, b in bucket}):
            compressor = settings.build(bits)
            numel = sum(n for n, b in bucket if b == bits)
            total += record.bytes_sent(
                numel,
                ranks,
                nodes,
                compressor.wire.payload_nbytes,
                lambda n, r, c=compressor: chunk_length(n, r, c),
            )
    return total
