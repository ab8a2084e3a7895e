"""FSDP2's weight all-gather with each parameter shard sent as palette-coded low-bit indices.

distq's quantized weights are ŵ = α·q: a shard holds few distinct values per scale group (3 for
ternary with one α, 2^m for m-bit, at most 3 per row with per-channel α). `PackedAllGather`
sends every parameter's segment of FSDP's flat all-gather input in the cheapest of three forms,

    raw        m values as they are (itemsize·m bytes)
    palette    one group of m values: its distinct bit patterns (the palette, k ≤ 256 of them,
               sorted) and each value's index into it, packed at b = ⌈log2 k⌉ bits
    row        the same per dim-0 row (G rows of m/G values, each its own palette; b from the
               largest k): per-channel scales and LSTM gate blocks

and every rank rebuilds palette[index]: the same bit patterns, so the gathered tensors equal
FSDP's own all-gather bit for bit whatever the scheme (and -0.0, NaN payloads, subnormals too);
a shard that has more than 256 distinct values per group, or that codes no smaller, goes raw.
Only the m = this rank's unpadded elements are coded when FSDP's dim-0 padding is zero bits
(it is: FSDP allocates it zeroed), the padding is rebuilt as zeros; otherwise m covers it.

Wire, per call: a header all-gather of (groups, m, bytes) per parameter (int64, 24 bytes each;
groups 0 = raw), so every rank knows each rank's payload length before the payload moves
(sizes depend on the data, and a fixed width per parameter would fail a latent weight the
optimizer has not projected yet); then one uint8 all-to-all with uneven splits moves this rank's
payload to each other rank. A palette segment is [k_g − 1 per group: G bytes][palette: Σk_g
values][indices: ⌈m·b/8⌉ bytes in distq.packing's bit layout, none when b = 0; where k's
base-k digits take fewer bytes (k = 3, 5, 6: a ternary shard's 3 values go 5 to a byte, 1.6
bits each) `pack_digits`' ⌈m/j⌉ bytes instead, k = max k_g]. Sent per rank:
(n − 1)·(header + payload) bytes against (n − 1)·itemsize·numel for FSDP's all-gather of the
same input (numel: this rank's padded shards of the module's parameters).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllocMixin

from distq.packing import (
    digits_nbytes,
    digits_per_byte,
    pack,
    pack_digits,
    packed_nbytes,
    unpack,
    unpack_digits,
)

__all__ = ["GatherStats", "PackedAllGather", "Shard", "decode", "encode", "fsdp_params_of"]

log = logging.getLogger(__name__)

MAX_PALETTE = 256  # distinct values a group may have: indices of at most 8 bits
HEADER = 3  # int64 fields per parameter: groups (0 = raw), coded elements, payload bytes
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # bit views by itemsize


@dataclass
class GatherStats:
    """Bytes the packed all-gathers sent per rank: `bytes_sent` (payloads, `raw_bytes_sent` of
    them raw segments), `header_bytes_sent`, and `default_all_gather_bytes`, what FSDP's own
    all-gather of the same inputs sends ((n − 1)·input bytes per call)."""

    calls: int = 0
    bytes_sent: int = 0
    raw_bytes_sent: int = 0
    header_bytes_sent: int = 0
    default_all_gather_bytes: int = 0

    @property
    def compression_ratio(self) -> float:
        """Bytes FSDP's all-gather would send ÷ bytes this rank sent (payloads and headers);
        NaN before the first call."""
        sent = self.bytes_sent + self.header_bytes_sent
        return float("nan") if not sent else self.default_all_gather_bytes / sent


@dataclass(frozen=True)
class Shard:
    """One parameter's segment of FSDP's all-gather input: `length` elements (its padded shard,
    the same on every rank), the first `valid` of them this rank's data, `row` elements a dim-0
    row (the groups of the row form)."""

    name: str
    length: int
    valid: int
    row: int = 1


def encode(bits: Tensor, row: int = 1) -> tuple[int, Tensor]:
    """(groups, payload) of one segment given as its integer bit view: groups 0 and the raw
    bytes, or the palette form (1 group, or one per `row`-element row) with the fewest bytes.
    One sort: the rows' palettes; the one-group form maps them into their union."""
    m = bits.numel()
    best: tuple[int, Tensor] = (0, bits.view(torch.uint8))
    groups = m // row if row > 1 and m % row == 0 and m > row else 1
    if not m:
        return best
    form = _palettes(bits.view(groups, -1))
    if form is None:  # a group has too many values, so has the whole segment
        return best
    forms = [(groups, form)]
    palette, counts, index = form
    if groups > 1:
        union = torch.unique(palette)  # sorted
        if union.numel() <= MAX_PALETTE:
            start = counts.cumsum(0) - counts
            index = torch.searchsorted(union, palette)[index + start[:, None]]
            forms.insert(0, (1, (union, counts.new_tensor([union.numel()]), index)))
    for groups, (palette, counts, index) in forms:  # the one-group form first: it wins ties
        k = int(counts.max())
        size = groups + palette.numel() * palette.element_size() + _index_bytes(m, k)
        if size < best[1].numel():
            parts = [(counts - 1).to(torch.uint8), palette.view(torch.uint8)]
            if k > 1:
                parts.append(_pack_index(index.view(-1), k))
            best = (groups, torch.cat(parts))
    return best


def _as_digits(k: int) -> bool:
    """Whether indices in [0, k) go as base-k digits: where that takes fewer bytes than
    ⌈log2 k⌉-bit codes (k = 3: 5 a byte against four 2-bit codes; k = 5, 6: 3 a byte against
    2.67 3-bit codes)."""
    width = (k - 1).bit_length()
    return k > 1 and digits_per_byte(k) * width > 8


def _index_bytes(m: int, k: int) -> int:
    """Bytes of m palette indices in [0, k): none for k = 1."""
    if k == 1:
        return 0
    return digits_nbytes(m, k) if _as_digits(k) else packed_nbytes(m, (k - 1).bit_length())


def _pack_index(index: Tensor, k: int) -> Tensor:
    return pack_digits(index, k) if _as_digits(k) else pack(index, (k - 1).bit_length())


def _unpack_index(payload: Tensor, k: int, m: int) -> Tensor:
    if _as_digits(k):
        return unpack_digits(payload, k, m)
    return unpack(payload, (k - 1).bit_length(), m)


def _palettes(groups: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """Each row's sorted distinct values of a [G, L] bit view (one 1-D tensor, row after row),
    their counts and every element's index into its row's palette; None if a row has more than
    MAX_PALETTE distinct values."""
    s, order = groups.sort(dim=1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    counts = new.sum(1)
    if int(counts.max()) > MAX_PALETTE:
        return None
    index = torch.empty_like(order)
    index.scatter_(1, order, new.cumsum(1) - 1)
    return s[new], counts, index


def decode(payload: Tensor, groups: int, out: Tensor) -> None:
    """out (an integer bit view of m elements) ← the segment `encode` made as (groups, payload).
    Raises ValueError when the payload's length is not what its palette counts say."""
    if groups == 0:
        if payload.numel() != out.numel() * out.element_size():
            raise ValueError(
                f"raw segment of {payload.numel()} bytes for {out.numel()} values of "
                f"{out.element_size()} bytes"
            )
        out.view(torch.uint8).copy_(payload)
        return
    m = out.numel()
    counts = payload[:groups].to(torch.int64) + 1
    end = groups + int(counts.sum()) * out.element_size()
    palette = payload[groups:end].clone().view(out.dtype)  # clone: the offset may be unaligned
    k = int(counts.max())
    if k > 1:
        index = _unpack_index(payload[end:], k, m).to(torch.int64).view(groups, -1)
    elif payload.numel() == end:
        index = torch.zeros(groups, m // groups, dtype=torch.int64, device=out.device)
    else:
        raise ValueError(f"palette segment of {payload.numel()} bytes; its counts say {end}")
    start = counts.cumsum(0) - counts
    out.view(groups, -1).copy_(palette[index + start[:, None]])


class _DecodeWork(dist.Work):
    """The async all-gather's handle: wait() waits for the payloads, then decodes them (FSDP2
    waits on what the all-gather returns when it is a `dist.Work`)."""

    def __init__(self, work: dist.Work, finish: Callable[[], None]) -> None:
        super().__init__()
        self._work, self._finish, self._done = work, finish, False

    def wait(self, timeout: Any = None) -> bool:
        if not self._done:
            self._work.wait()
            self._finish()
            self._done = True
        return True


class PackedAllGather(DefaultAllocMixin, AllGather):
    """FSDP2's all-gather of one FSDP module's parameters in the module doc's format. `layout`:
    the module's `Shard`s in FSDP's parameter order (None: the whole input one segment, every
    element valid); `stats`: the counters to add to (shared by a model's all-gathers).
    `last_groups` holds each segment's form of the latest call on this rank (0 = raw)."""

    def __init__(self, layout: Sequence[Shard] | None = None, stats: GatherStats | None = None):
        self.layout = list(layout) if layout is not None else None
        self.stats = stats if stats is not None else GatherStats()
        self.last_groups: list[int] = []

    def __call__(
        self,
        output_tensor: Tensor,
        input_tensor: Tensor,
        group: dist.ProcessGroup,
        async_op: bool = False,
    ) -> dist.Work | None:
        n, rank = group.size(), group.rank()
        numel = input_tensor.numel()
        if output_tensor.numel() != n * numel:
            raise ValueError(
                f"all-gather output has {output_tensor.numel()} elements; {n} ranks × {numel} "
                f"input elements need {n * numel}"
            )
        view = _BITS.get(input_tensor.element_size())
        if view is None:
            raise ValueError(
                f"all-gather dtype {input_tensor.dtype} ({input_tensor.element_size()} bytes); "
                f"allowed: element sizes {', '.join(map(str, _BITS))}"
            )
        rows = output_tensor.view(n, numel)
        rows[rank].copy_(input_tensor)
        if n == 1:
            return None
        header, payloads = self._encode(input_tensor.view(view).reshape(-1))
        headers = header.new_empty(n * header.numel())
        dist.all_gather_single(headers, header.view(-1), group=group)
        headers = headers.view(n, *header.shape)
        lengths = [int(h[:, 2].sum()) if r != rank else 0 for r, h in enumerate(headers)]
        payload = torch.cat(payloads) if payloads else header.new_empty(0, dtype=torch.uint8)
        send = torch.cat([payload] * (n - 1))  # by destination; nothing to this rank
        received = torch.empty(sum(lengths), dtype=torch.uint8, device=payload.device)
        split = [0 if r == rank else payload.numel() for r in range(n)]
        work = dist.all_to_all_single(
            received, send, lengths, split, group=group, async_op=async_op
        )
        self._count(n, input_tensor, header, payloads)

        def finish() -> None:
            at = 0
            for r, length in enumerate(lengths):
                if r != rank:
                    self._decode(received[at : at + length], headers[r], rows[r].view(view))
                at += length

        if async_op:
            return _DecodeWork(work, finish)
        finish()
        return None

    def _segments(self, numel: int) -> list[Shard]:
        """The layout, checked against the input's length."""
        layout = self.layout if self.layout is not None else [Shard("input", numel, numel)]
        covered = sum(s.length for s in layout)
        if covered != numel:
            raise ValueError(
                f"the layout covers {covered} elements "
                f"({', '.join(f'{s.name}: {s.length}' for s in layout)}); "
                f"FSDP's all-gather input has {numel}"
            )
        return layout

    def _encode(self, bits: Tensor) -> tuple[Tensor, list[Tensor]]:
        """This rank's header ([P, 3] int64) and each segment's payload."""
        layout = self._segments(bits.numel())
        fields, payloads, at = [], [], 0
        for shard in layout:
            segment = bits[at : at + shard.length]
            m = shard.valid if not segment[shard.valid :].any() else shard.length
            groups, payload = encode(segment[:m], shard.row)
            fields.append((groups, m, payload.numel()))
            payloads.append(payload)
            at += shard.length
        self.last_groups = [f[0] for f in fields]
        header = torch.tensor(fields, dtype=torch.int64, device=bits.device)
        return header.view(len(layout), HEADER), payloads

    def _decode(self, payload: Tensor, header: Tensor, out: Tensor) -> None:
        """One rank's row of the output ← its payload, segment by segment (padding zeroed)."""
        at = offset = 0
        for shard, (groups, m, nbytes) in zip(
            self._segments(out.numel()), header.tolist(), strict=True
        ):
            decode(payload[offset : offset + nbytes], groups, out[at : at + m])
            out[at + m : at + shard.length].zero_()
            at += shard.length
            offset += nbytes

    def _count(self, n: int, input: Tensor, header: Tensor, payloads: list[Tensor]) -> None:
        """Add one call's bytes (each sent to n − 1 ranks) to the stats."""
        stats = self.stats
        stats.calls += 1
        stats.bytes_sent += (n - 1) * sum(p.numel() for p in payloads)
        raw = sum(p.numel() for g, p in zip(self.last_groups, payloads, strict=True) if g == 0)
        stats.raw_bytes_sent += (n - 1) * raw
        stats.header_bytes_sent += (n - 1) * header.numel() * header.element_size()
        stats.default_all_gather_bytes += (n - 1) * input.numel() * input.element_size()


def fsdp_params_of(module: FSDPModule) -> list[Any]:
    """The FSDPParams of an FSDP module in FSDP's all-gather/reduce-scatter order. Reads FSDP2's
    parameter group (private in torch 2.13); the collectives check it against their inputs."""
    groups = module._get_fsdp_state()._fsdp_param_groups
    if len(groups) > 1:
        raise ValueError(
            f"{len(groups)} parameter groups in one FSDP module (shard_placement_fn with "
            "several meshes); allowed: one"
        )
    return [fp for group in groups for fp in group.fsdp_params]


def gather_layout(module: FSDPModule) -> list[Shard]:
    """The `Shard`s of an FSDP module's all-gather input, in FSDP's parameter order."""
    layout = []
    for fp in fsdp_params_of(module):
        padded = fp.padded_sharded_param_size
        row = 1
        for d in padded[1:]:
            row *= d
        name = getattr(fp, "_param_fqn", None) or fp._module_info.param_name
        layout.append(Shard(name, padded.numel(), fp.sharded_size.numel(), row))
    return layout
