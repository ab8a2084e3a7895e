"""Projections of a tensor sharded along its first dimension (FSDP2's Shard(0)), shard by shard.

Each rank holds rows [r₀, r₁) of the tensor (FSDP's chunks: ⌈R/n⌉ rows each, the last ones
shorter or empty) and computes its rows of the projection the whole tensor would get:

- per output channel: every scale group lies in one shard, so the projection is shard-local
  and needs no communication;
- one scale per tensor or per row block (an LSTM's gates): the solvers' row reductions go
  through `ShardReducer`, which adds the partial sums of every rank holding a piece of a group
  (float64, one all-reduce per reduction); the exact ternary support (LATe's top-k over the
  whole group) is found by a branch and bound over thresholds that all-reduces suffix sums at
  17 candidate thresholds per surviving bin and round instead of gathering the weights
  (`_top_support`; a 64×300 tensor: ~600 floats in 11 all-reduces);
- codebooks (shared) and a sparsity budget: the group's weights and curvature are gathered,
  projected whole and sliced (2·4 bytes per entry each call: these solvers sort whole groups).

Projected together under `distq.quant.lockstep.in_lockstep` (as QuantizedOptimizer does), the
tensors' all-reduces travel merged, one per round for all of them.

Per-tensor α comes out the same on every rank; it equals the unsharded projection's up to the
order of float64 summation (tests: tests/quant/test_sharded.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from distq.quant import Projection, get_scheme, lockstep, project, resolve_bits
from distq.quant.base import check_blocks, check_weights
from distq.quant.reduction import RowReducer, reducing
from distq.quant.sparse import check_sparsity

__all__ = ["ShardReducer", "project_shard", "shard_rows"]

SUB_BINS = 16  # thresholds tried per surviving bin and round: 8 rounds cover 31 bits
NO_SUPPORT = 1 << 31  # a threshold above every float32's bit pattern: the empty support
_INFINITY = 0x7F800000  # +inf's bit pattern


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The [r₀, r₁) rows FSDP2 gives `rank` of `world` (torch.chunk: ⌈rows/world⌉ per rank)."""
    chunk = math.ceil(rows / world) if rows else 0
    start = min(rows, rank * chunk)
    return start, min(rows, start + chunk)


@dataclass(frozen=True)
class _Layout:
    """Which scale groups this shard's rows belong to, as a padded [g, n] view."""

    groups: list[int]  # global index of each local row of the view
    count: int  # scale groups in the whole tensor
    size: int  # entries per scale group
    spans: list[tuple[int, int]]  # local row range of each view row
    first: list[bool]  # whether this shard holds the group's first row (it reports its α)

    @classmethod
    def of(cls, rows: int, start: int, stop: int, blocks: int, columns: int) -> _Layout:
        height = rows // blocks
        groups = sorted({r // height for r in range(start, stop)}) if stop > start else []
        spans = [
            (max(start, g * height) - start, min(stop, (g + 1) * height) - start) for g in groups
        ]
        first = [g * height >= start for g in groups]
        return cls(groups, blocks, height * columns, spans, first)

    def view(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(t's rows as one padded row per group, the mask of real entries)."""
        flat = _matrix(t)
        pieces = [flat[a:b].reshape(-1) for a, b in self.spans]
        width = max((p.numel() for p in pieces), default=0)
        out = flat.new_zeros(len(pieces), width)
        valid = torch.zeros(len(pieces), width, dtype=torch.bool, device=t.device)
        for i, p in enumerate(pieces):
            out[i, : p.numel()] = p
            valid[i, : p.numel()] = True
        return out, valid

    def unview(self, v: Tensor, like: Tensor) -> Tensor:
        """The inverse of `view` for a [g, n] result: like's shape, padding dropped."""
        flat = _matrix(like)
        out = torch.empty_like(flat, dtype=v.dtype)
        for i, (a, b) in enumerate(self.spans):
            out[a:b] = v[i, : (b - a) * flat.shape[1]].reshape(b - a, flat.shape[1])
        return out.reshape(like.shape)


def _matrix(t: Tensor) -> Tensor:
    """t as [rows, entries per row] (a 1-D tensor: one entry per row; empty shards too)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


class ShardReducer(RowReducer):
    """Row reductions of a padded shard view, completed across `group` (see module)."""

    def __init__(self, layout: _Layout, valid: Tensor, group: dist.ProcessGroup | None) -> None:
        self.layout, self.valid, self.group = layout, valid, group
        self.index = torch.tensor(layout.groups, dtype=torch.long, device=valid.device)

    def _all(self, local: Tensor, op: dist.ReduceOp.RedOpType) -> Tensor:
        """[k, g] local values → [k, g] of the whole groups (absent groups contribute 0)."""
        full = local.new_zeros(local.shape[0], self.layout.count)
        full.index_copy_(1, self.index, local)
        lockstep.all_reduce(full, op=op, group=self.group)
        return full.index_select(1, self.index)

    def sums(self, *xs: Tensor) -> tuple[Tensor, ...]:
        local = torch.stack([(x.double() * self.valid).sum(1) for x in xs])
        total = self._all(local, dist.ReduceOp.SUM)
        return tuple(
            t.to(x.dtype if x.is_floating_point() else torch.float64)
            for t, x in zip(total, xs, strict=True)
        )

    def max(self, x: Tensor) -> Tensor:
        """The largest entry of each group, for x ≥ 0 (padding counts as 0)."""
        local = torch.where(self.valid, x, 0).amax(dim=1) if x.shape[1] else x.new_zeros(len(x))
        return self._all(local[None], dist.ReduceOp.MAX)[0]

    def mean(self, x: Tensor) -> Tensor:
        return self.sums(x)[0] / self.layout.size

    def agree(self, flag: bool) -> bool:
        vote = torch.tensor([int(flag)], dtype=torch.int32)
        lockstep.all_reduce(vote, op=dist.ReduceOp.MIN, group=self.group)
        return bool(vote.item())

    def exact_support(
        self, a: Tensor, d: Tensor, caps: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """LATe's (α, support) of each whole group, every rank calling for every group."""
        if caps is not None:
            raise ValueError("a sparsity budget is solved on gathered groups (project_shard)")
        alpha = a.new_zeros(len(self.layout.groups))
        mask = torch.zeros_like(a, dtype=torch.bool)
        local = {g: i for i, g in enumerate(self.layout.groups)}
        for g in range(self.layout.count):  # every rank joins every group's all-reduces
            i = local.get(g)
            keep = self.valid[i] if i is not None else self.valid.new_zeros(0)
            mine = a[i][keep] if i is not None else a.new_zeros(0)
            weights = d[i][keep] if i is not None else a.new_zeros(0)
            scale, threshold = _top_support(mine, weights, self.group)
            if i is not None:
                alpha[i] = scale
                mask[i, keep] = _bit_patterns(mine) >= threshold
        return alpha, mask


def _bit_patterns(a: Tensor) -> Tensor:
    """float32 bit patterns of a ≥ 0 as int64: monotone in a."""
    return a.float().contiguous().view(torch.int32).long()


def _top_support(a: Tensor, d: Tensor, group: dist.ProcessGroup | None) -> tuple[float, int]:
    """(α, threshold) of the best support {a ≥ t} of the group whose local piece is (a, d).

    LATe's optimal support is a top-k set, and F(k) = P(k)²/Q(k) (P = Σ d·a, Q = Σ d over the
    support) is convex along a run of equal a, so k* never splits a tie: the optimum is a
    threshold on a's float32 bit pattern e ∈ [1, 2³¹). Each round splits the surviving bins
    [e₀, e₁) into SUB_BINS, all-reduces the suffix sums P, Q at their edges (every edge is a
    threshold: F is evaluated there) and keeps a bin only if its bound max(F(e₁),
    (P(e₁) + v₁·(Q(e₀) − Q(e₁)))²/Q(e₀)) (v₁ the value at e₁: every entry added is < v₁)
    reaches the best F seen. Ties in F go to the higher threshold, as the sort's first argmax.
    """
    bits = _bit_patterns(a)
    order = bits.argsort()
    bits = bits[order]
    da = (a.double() * d.double())[order]
    zero = da.new_zeros(1)
    P_suffix = torch.cat([da.flip(0).cumsum(0).flip(0), zero])
    Q_suffix = torch.cat([d.double()[order].flip(0).cumsum(0).flip(0), zero])
    best = (-1.0, NO_SUPPORT, 0.0, 0.0)  # F, threshold, P, Q
    bins = [(1, NO_SUPPORT)]
    while bins:
        edges = sorted({e for lo, hi in bins for e in (*range(lo, hi, _width(lo, hi)), hi)})
        at = torch.searchsorted(bits, torch.tensor(edges, dtype=torch.long))
        PQ = torch.stack([P_suffix[at], Q_suffix[at]])
        lockstep.all_reduce(PQ, group=group)
        P, Q = PQ.tolist()
        F = [p * p / q if q > 0 else -1.0 for p, q in zip(P, Q, strict=True)]
        for i, e in enumerate(edges):
            if F[i] > best[0] or (F[i] == best[0] and e > best[1]):
                best = (F[i], e, P[i], Q[i])
        index = {e: i for i, e in enumerate(edges)}
        survivors = []
        for lo, hi in bins:
            width = _width(lo, hi)
            if width == 1:  # every threshold in it was an edge
                continue
            for e0 in range(lo, hi, width):
                e1 = min(e0 + width, hi)
                if _bound(P, Q, F, index[e0], index[e1], e1) >= best[0]:
                    survivors.append((e0, e1))
        bins = survivors
    _, threshold, P_best, Q_best = best
    return (P_best / Q_best if Q_best > 0 else 0.0), threshold


def _width(lo: int, hi: int) -> int:
    return max(1, -(-(hi - lo) // SUB_BINS))


def _bound(P: list[float], Q: list[float], F: list[float], i0: int, i1: int, e1: int) -> float:
    """An upper bound of F over the thresholds inside the bin between edges i0 and i1 = e₁
    (see _top_support); −1 for a bin without entries."""
    if P[i0] == P[i1] and Q[i0] == Q[i1]:
        return -1.0
    if e1 >= _INFINITY:
        return math.inf
    v1 = torch.tensor(e1, dtype=torch.int32).view(torch.float32).item()
    return max(F[i1], (P[i1] + v1 * (Q[i0] - Q[i1])) ** 2 / Q[i0])


def project_shard(
    w: Tensor,
    d: Tensor | None,
    scheme: str,
    bits: int | None = None,
    *,
    rows: int,
    group: dist.ProcessGroup | None = None,
    per_channel: bool = False,
    blocks: int = 1,
    sparsity: float = 0.0,
    **opts,
) -> Projection:
    """This rank's rows of the projection of a tensor with `rows` rows sharded over `group`.

    `w` (and `d`) are this rank's Shard(0) piece (`shard_rows`; may be empty). The returned
    `q` has w's shape; `alpha` is the whole tensor's (per channel: this shard's channels).
    Every rank of `group` must call it for the same tensor with the same arguments.
    """
    spec = get_scheme(scheme)
    m = resolve_bits(spec, bits)
    check_sparsity(sparsity)
    check_blocks((rows, *w.shape[1:]), blocks)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    start, stop = shard_rows(rows, rank, world)
    if w.shape[0] != stop - start:
        raise ValueError(
            f"rank {rank} of {world} holds {w.shape[0]} rows of a {rows}-row tensor; FSDP's "
            f"Shard(0) gives it rows {start}..{stop}"
        )
    if per_channel:
        return _per_channel(w, d, scheme, m, sparsity, **opts)
    if sparsity or spec.codebook:
        return _gathered(w, d, scheme, m, rows, group, start, stop, blocks, sparsity, **opts)
    _check_everywhere(w, d, group)
    layout = _Layout.of(rows, start, stop, blocks, math.prod(w.shape[1:]))
    w2, valid = layout.view(w)
    w2 = w2.float() if w2.dtype not in (torch.float32, torch.float64) else w2
    loss_aware = d is not None and spec.loss_aware
    d2 = (layout.view(d)[0] if loss_aware else valid).to(w2.dtype)
    if "alpha_init" in opts and opts["alpha_init"] is not None:
        opts["alpha_init"] = opts["alpha_init"].reshape(-1)[layout.groups]
    with reducing(ShardReducer(layout, valid, group)):
        q2, alpha = spec.solver(w2, d2, m, **opts)
    q = (layout.unview(q2 * valid, w) + 0.0).to(w.dtype) if w.numel() else w.clone()
    return Projection(q=q, alpha=_whole_alpha(alpha, layout, group, blocks))


def _check_everywhere(w: Tensor, d: Tensor | None, group: dist.ProcessGroup | None) -> None:
    """`check_weights` on every rank's shard, raised on all of them if any fails (a rank that
    raised alone would leave the others waiting in the solver's all-reduces)."""
    problem = ""
    if w.numel():
        try:
            check_weights(w, d)
        except ValueError as exc:
            problem = str(exc)
    failed = torch.tensor([int(bool(problem))], dtype=torch.int32)
    lockstep.all_reduce(failed, group=group)
    if failed.item():
        raise ValueError(
            problem or f"{failed.item()} other rank(s) of the shard group hold a bad shard of "
            "this tensor (their error names it); no rank projected it"
        )


def _whole_alpha(
    alpha: Tensor, layout: _Layout, group: dist.ProcessGroup | None, blocks: int
) -> Tensor:
    """The scale of every group of the tensor (per tensor: a scalar), the same on every rank: the
    rank holding a group's first row reports it, the others add zero."""
    full = alpha.new_zeros(blocks, *alpha.shape[1:])
    for i, (g, first) in enumerate(zip(layout.groups, layout.first, strict=True)):
        if first:
            full[g] = alpha[i]
    lockstep.all_reduce(full, group=group)
    return full[0] if blocks == 1 else full


def _per_channel(w: Tensor, d: Tensor | None, scheme: str, bits: int, sparsity: float, **opts):
    """Shard-local: every output channel's group lies in this shard."""
    if not w.shape[0]:  # no channels here; alpha keeps the scheme's trailing shape
        probe = project(w.new_zeros(1, *w.shape[1:]), None, scheme, bits, per_channel=True)
        return Projection(q=w.clone(), alpha=probe.alpha[:0])
    return project(w, d, scheme, bits, per_channel=True, sparsity=sparsity, **opts)


def _gathered(w, d, scheme, bits, rows, group, start, stop, blocks, sparsity, **opts):
    """Gather the group's w (and d), project the whole tensor, keep this shard's rows."""
    world = dist.get_world_size(group)
    chunk = math.ceil(rows / world)
    stacked = torch.stack([w, d if d is not None else torch.ones_like(w)])
    padded = stacked.new_zeros(2, chunk, *w.shape[1:])
    padded[:, : w.shape[0]] = stacked
    pieces = [torch.empty_like(padded) for _ in range(world)]
    lockstep.all_gather(pieces, padded.contiguous(), group=group)
    whole = torch.cat(pieces, dim=1)[:, :rows]
    full = project(
        whole[0], whole[1] if d is not None else None, scheme, bits,
        blocks=blocks, sparsity=sparsity, **opts,
    )  # fmt: skip
    return Projection(q=full.q[start:stop].clone(), alpha=full.alpha)
