"""Packed low-bit checkpoints: quantized tensors stored as bit-packed codes plus a codebook.

A safetensors file; every quantized `name` becomes `name.codes` (uint8) and `name.codebook`
(float32), the rest is stored as it is, and metadata key "distq" holds the JSON that
`load_packed` rebuilds from: {"format": "distq-packed", "layout_version": 2, "tensors": {name:
entry}}. A tensor's codebook has G rows (G = shape[0] per channel, `blocks` for per-block
scales, else 1), each covering the n consecutive elements of its channel or block (row-major).

Each quantized tensor is stored in one of three layouts, whichever stores the fewest tensor
bytes (`layout_sizes`, exact; ties go to the earlier in LAYOUTS). Every layout stores the same
two tensors, so the safetensors header differs only by the longer JSON entry of a sparse layout
(~60 bytes). Bits are packed by `distq.packing`.

  dense   codes: one `bits`-bit code per element (its value's rank among the distinct values
          of its row); codebook [G, 2**bits]: each row's distinct values, ascending, 0-padded.
          Bytes: ceil(numel*bits/8) + 4*G*2**bits. The only layout of layout_version 1.
  bitmap  codes: [ceil(numel/8) bytes: 1 bit per element, set for the non-zeros]
                 [non-zero codes] [zero signs].
  index   codes: [gap code of the non-zeros' flat positions, width index_bits]
                 [non-zero codes] [zero signs].

The sparse layouts (bitmap, index) code only the nnz non-zero elements (x != 0), in flat
(row-major) order; positions are flat indices into the whole tensor. Codebook
[G, k] holds each row's distinct non-zero values, ascending, 0-padded to k = the most in any
row; a non-zero's code is its value's rank there, in nz_bits = ceil(log2 k) bits (0 for k <= 1:
no bytes; ternary's ±α need 1 bit). Zero elements are rebuilt as the zero the dense layout
rebuilds: the first zero of the row in row order, +0.0 or -0.0 (like dense, a row holding both
rebuilds all its zeros with the first one's sign); "zero signs" is 1 bit per row, set where that
zero is -0.0, stored only when some row's is (neg_zero true). The gap code of the index layout
(`distq.packing.gap_encode`) writes each gap (zeros skipped before a non-zero) as index_bits-bit
symbols with an escape value meaning "skip 2**index_bits - 1 more", index_count symbols in all;
index_bits is the width in 0..8, 16, 32 that makes the stream shortest (0: the non-zeros are
the first nnz elements, no stream). Every section starts on a byte boundary; sparse bytes:
positions + ceil(nnz*nz_bits/8) + (ceil(G/8) if neg_zero) + 4*G*k.

Entry fields: shape, dtype, scheme, bits, per_channel (as in layout_version 1), layout, and
blocks (optional, >= 2: G = blocks rows of equal first-dimension blocks, e.g. the 4 gate
matrices of an LSTM weight with a scale each; absent: 1); for
bitmap and index also nnz, nz_bits, neg_zero; for index also index_bits, index_count.
layout_version 1 files (no "layout": dense) still load.

Integrity: the metadata's "digests" maps every stored tensor's name to the 64-bit BLAKE2b of its
bytes (16 hex digits: any flip is found but with odds 2**-64, at ~35 header bytes a tensor);
`load_packed` checks each and refuses a codebook holding NaN or Inf. Files written before distq
recorded digests (no "digests") load with only the structural checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from distq.packing import (
    GAP_WIDTHS,
    gap_decode,
    gap_encode,
    gap_symbols,
    pack,
    packed_nbytes,
    uint_nbytes,
    unpack,
)

__all__ = [
    "LAYOUTS",
    "ExportReport",
    "QuantSpec",
    "TensorSize",
    "export_packed",
    "layout_sizes",
    "load_packed",
]

FORMAT = "distq-packed"
LAYOUT_VERSION = 2  # 2: sparse layouts (bitmap, index) and the "layout" field; 1: dense only
LAYOUTS = ("dense", "bitmap", "index")  # order breaks ties between equal sizes
META_KEY = "distq"
DIGESTS_KEY = "digests"
_CODEBOOK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # exact through a float32 table


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor was quantized: scheme name (a label), bits per stored code, scale layout."""

    scheme: str
    bits: int
    per_channel: bool = False
    blocks: int = 1  # scale groups along the first dimension (LSTM gate matrices: 4)

    def __post_init__(self) -> None:
        """Reject code widths the packed layout does not have."""
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"QuantSpec bits must be an integer in 1..8, got {self.bits!r}")
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1:
            raise ValueError(f"QuantSpec blocks must be a positive integer, got {self.blocks!r}")


@dataclass(frozen=True)
class TensorSize:
    """Size of one tensor: fp32_bytes in a full-precision checkpoint, packed_bytes in this one.

    fp32_bytes is 4 bytes per element for floating tensors (integer tensors: their own size);
    bits is the code width of a quantized tensor, else the stored element width (32 for fp32);
    packed_bytes is the bytes of the tensor data stored for it: for a quantized tensor its
    codes (with the bitmap or index and the zero signs of a sparse layout) and its codebook.
    layout is the quantized tensor's layout (LAYOUTS), "raw" for a tensor stored as it is; nnz
    counts the non-zero elements.
    """

    name: str
    numel: int
    bits: int
    fp32_bytes: int
    packed_bytes: int
    quantized: bool
    layout: str = "raw"
    nnz: int = 0

    @property
    def density(self) -> float:
        """Share of non-zero elements, nnz / numel (0.0 for an empty tensor)."""
        return self.nnz / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class ExportReport:
    """What `export_packed` wrote: per-tensor sizes and file_bytes, os.path.getsize of the file."""

    path: str
    tensors: tuple[TensorSize, ...]
    file_bytes: int

    @property
    def quantized_fp32_bytes(self) -> int:
        """Full-precision bytes of the quantized tensors."""
        return sum(t.fp32_bytes for t in self.tensors if t.quantized)

    @property
    def quantized_packed_bytes(self) -> int:
        """Stored bytes (codes, bitmaps/indexes, codebooks) of the quantized tensors."""
        return sum(t.packed_bytes for t in self.tensors if t.quantized)

    @property
    def total_fp32_bytes(self) -> int:
        """Full-precision bytes of all tensors: the data of the checkpoint this one replaces (an
        fp32 safetensors file of them is larger by its header)."""
        return sum(t.fp32_bytes for t in self.tensors)

    @property
    def ratio(self) -> float:
        """Compression on disk: total full-precision tensor bytes over the real file size (header
        included); against an fp32 safetensors file, whose header is left out, it understates."""
        return self.total_fp32_bytes / self.file_bytes

    def to_str(self) -> str:
        """A readable table of the tensors, the totals, and the file size and ratio."""
        head = ("tensor", "numel", "bits", "layout", "density", "fp32 bytes", "packed bytes")
        head = (*head, "ratio")

        def cells(t: TensorSize) -> tuple[str, ...]:
            density = f"{t.density:.3f}"
            return _row(t.name, t.numel, t.bits, t.layout, density, t.fp32_bytes, t.packed_bytes)

        body = [cells(t) for t in self.tensors]
        numel = sum(t.numel for t in self.tensors)
        packed = sum(t.packed_bytes for t in self.tensors)
        q_fp32, q_packed = self.quantized_fp32_bytes, self.quantized_packed_bytes
        q = [t for t in self.tensors if t.quantized]
        q_numel = sum(t.numel for t in q)
        q_density = f"{sum(t.nnz for t in q) / q_numel:.3f}" if q_numel else ""
        totals = [
            _row("total quantized", q_numel, "", "", q_density, q_fp32, q_packed),
            _row("total", numel, "", "", "", self.total_fp32_bytes, packed),
        ]
        widths = [max(map(len, col)) for col in zip(head, *body, *totals, strict=True)]
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))

        def fmt(row: tuple[str, ...]) -> str:
            cells = [c.rjust(w) for c, w in zip(row, widths, strict=True)]
            return "  ".join([row[0].ljust(widths[0]), *cells[1:]])

        file_line = (
            f"file {self.path}: {self.file_bytes} bytes on disk, {self.ratio:.2f}x smaller than "
            f"the {self.total_fp32_bytes} bytes of its tensors in fp32 (data only, no header)"
        )
        return "\n".join([fmt(head), rule, *map(fmt, body), rule, *map(fmt, totals), file_line])


def export_packed(
    state: Mapping[str, Tensor],
    quantized: Mapping[str, QuantSpec],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    layouts: Collection[str] = LAYOUTS,
) -> ExportReport:
    """Write `state` to `path`, the tensors named in `quantized` bit-packed; report the sizes.

    Each quantized tensor takes the smallest of `layouts` (default: all of LAYOUTS; ("dense",)
    writes the codes layout_version 1 had). Raises ValueError when a quantized name is not in
    `state`, a quantized tensor is not float32/float16/bfloat16 or holds NaN, a row has more
    distinct values than 2**bits, or `layouts` names no layout or an unknown one.
    """
    user_meta = _check_export(state, quantized, metadata)
    allowed = _check_layouts(layouts)
    tensors: dict[str, Tensor] = {}
    header: dict[str, dict] = {}
    sizes: list[TensorSize] = []
    for name, t in state.items():
        spec = quantized.get(name)
        t = t.detach().cpu()
        if spec is None:
            tensors[name] = t.clone(memory_format=torch.contiguous_format)  # unshares storage
            sizes.append(_raw_size(name, t))
            continue
        codes, codebook, header[name], size = _pack_tensor(name, t, spec, allowed)
        tensors[name + ".codes"], tensors[name + ".codebook"] = codes, codebook
        sizes.append(size)

    digests = {name: _digest(t) for name, t in tensors.items()}
    doc = {"format": FORMAT, "layout_version": LAYOUT_VERSION, "tensors": header}
    doc[DIGESTS_KEY] = digests
    meta = json.dumps(doc, separators=(",", ":"))
    save_file(tensors, os.fspath(path), metadata={**user_meta, META_KEY: meta})
    return ExportReport(os.fspath(path), tuple(sizes), os.path.getsize(path))


def _check_export(
    state: Mapping[str, Tensor],
    quantized: Mapping[str, QuantSpec],
    metadata: Mapping[str, str] | None,
) -> dict[str, str]:
    """The user's metadata as a dict, once the quantized names and the metadata are valid."""
    unknown = [n for n in quantized if n not in state]
    if unknown:
        raise ValueError(f"quantized names {unknown} are not in state; available: {list(state)}")
    user_meta = dict(metadata or {})
    if META_KEY in user_meta:
        raise ValueError(f"metadata key {META_KEY!r} is reserved for the distq header")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in user_meta.items()):
        raise ValueError("metadata must map str to str (safetensors stores only strings)")
    clashes = [n for n in quantized if {n + ".codes", n + ".codebook"} & set(state)]
    if clashes:
        raise ValueError(f"state names collide with the stored codes/codebook of {clashes}")
    return user_meta


def _raw_size(name: str, t: Tensor) -> TensorSize:
    """The size entry of a tensor stored as it is."""
    nbytes = t.numel() * t.element_size()
    fp32 = t.numel() * 4 if t.is_floating_point() else nbytes
    nnz = int(torch.count_nonzero(t))
    return TensorSize(name, t.numel(), t.element_size() * 8, fp32, nbytes, False, "raw", nnz)


def _pack_tensor(
    name: str, t: Tensor, spec: QuantSpec, allowed: tuple[str, ...]
) -> tuple[Tensor, Tensor, dict, TensorSize]:
    """Codes, codebook, header entry and size entry of a quantized tensor in the smallest of
    the `allowed` layouts."""
    q = _analyze(name, t, spec)
    layout, nbytes, index_bits = _choose(q, allowed)
    codes, codebook, entry = _write(q, layout, index_bits)
    assert codes.numel() + 4 * codebook.numel() == nbytes, (name, layout)  # sizes are exact
    header = {
        "shape": list(t.shape),
        "dtype": str(t.dtype).removeprefix("torch."),
        "scheme": spec.scheme,
        "bits": spec.bits,
        "per_channel": spec.per_channel,
        **({"blocks": spec.blocks} if spec.blocks > 1 else {}),
        **entry,
    }
    size = TensorSize(name, t.numel(), spec.bits, t.numel() * 4, nbytes, True, layout, q.nnz)
    return codes, codebook, header, size


def layout_sizes(t: Tensor, spec: QuantSpec, name: str = "tensor") -> dict[str, int]:
    """Bytes (codes and codebook) each layout of LAYOUTS would store for `t`; `export_packed`
    picks the smallest. The index size is that of its best width. Errors as `export_packed`."""
    q = _analyze(name, t.detach().cpu(), spec)
    return {layout: _choose(q, (layout,))[1] for layout in LAYOUTS}


def load_packed(path: str | os.PathLike) -> dict[str, Tensor]:
    """Rebuild every tensor of a file written by `export_packed`, original shapes and dtypes.

    Reads layout_version 1 and 2; raises ValueError naming the file and tensor for metadata or
    stored codes that are missing, malformed, inconsistent or not matching their digest, and
    for a codebook holding NaN or Inf.
    """
    with safe_open(os.fspath(path), framework="pt") as f:
        version, header, digests = _read_header(path, f.metadata())
        stored = set(f.keys())
        if digests is not None and set(digests) != stored:
            raise ValueError(f"{path}: the stored tensors are not those its digests list")

        def get(name: str) -> Tensor:
            t = f.get_tensor(name)
            if digests is not None and _digest(t) != digests[name]:
                raise ValueError(f"{path}: tensor {name!r} is corrupt (its digest differs)")
            return t

        out: dict[str, Tensor] = {}
        for name, info in header.items():
            missing = {name + ".codes", name + ".codebook"} - stored
            if missing:
                raise ValueError(f"{path}: quantized tensor {name!r} lacks {sorted(missing)}")
            codes, codebook = get(name + ".codes"), get(name + ".codebook")
            try:
                if codebook.is_floating_point() and not codebook.isfinite().all():
                    raise ValueError(f"tensor {name!r}: codebook holds NaN or Inf")
                entry = _check_entry(name, info, version)
                if entry["layout"] == "dense":
                    out[name] = _decode(name, codes, codebook, entry)
                else:
                    out[name] = _decode_sparse(name, codes, codebook, entry)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
            stored -= {name + ".codes", name + ".codebook"}
        out.update((name, get(name)) for name in sorted(stored))
    return out


def _digest(t: Tensor) -> str:
    """64-bit BLAKE2b of a tensor's bytes as stored (row-major), in hex."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=8).hexdigest()


def _rows(
    name: str, shape: torch.Size | list[int], per_channel: bool, blocks: int = 1
) -> tuple[int, int]:
    """(G, n): the codebook rows (first-dim channels, first-dim blocks, or 1) and the elements
    each covers."""
    numel = int(torch.Size(shape).numel())
    if not per_channel:
        if blocks > 1 and (len(shape) == 0 or shape[0] % blocks):
            raise ValueError(f"tensor {name!r}: {blocks} blocks do not split shape {list(shape)}")
        return blocks, numel // blocks
    if len(shape) == 0:
        raise ValueError(f"tensor {name!r} is 0-d and cannot be per-channel")
    return int(shape[0]), int(torch.Size(shape[1:]).numel())


@dataclass(frozen=True)
class _Quantized:
    """One quantized tensor as [G, n] rows: its dense codes and its non-zeros."""

    bits: int
    codes: Tensor  # [G, n] int64: each element's rank among its row's distinct values
    codebook: Tensor  # [G, 2**bits] float32: the dense codebook
    positions: Tensor  # [nnz] int64: flat positions of the non-zeros, ascending
    nz_codes: Tensor  # [nnz] int64: each non-zero's rank among its row's distinct non-zeros
    nz_codebook: Tensor  # [G, k] float32: each row's distinct non-zero values, 0-padded
    neg_zero: Tensor  # [G] bool: the row's zeros rebuild as -0.0

    @property
    def nnz(self) -> int:
        return self.positions.numel()

    @property
    def nz_bits(self) -> int:
        return _nz_bits(self.nz_codebook.shape[1])

    def sparse_bytes(self) -> int:
        """Bytes of a sparse layout besides its positions: non-zero codes, zero signs, codebook."""
        G = self.codebook.shape[0]
        signs = (G + 7) // 8 if bool(self.neg_zero.any()) else 0
        nz = (self.nnz * self.nz_bits + 7) // 8
        return nz + signs + 4 * self.nz_codebook.numel()


def _analyze(name: str, t: Tensor, spec: QuantSpec) -> _Quantized:
    """Dense codes and codebook of `t` (rows' distinct values) and its non-zeros' codes."""
    if t.dtype not in _CODEBOOK_DTYPES:
        raise ValueError(
            f"quantized tensor {name!r} has dtype {t.dtype}; "
            f"supported: {[str(d) for d in _CODEBOOK_DTYPES]}"
        )
    if torch.isnan(t).any():
        raise ValueError(f"quantized tensor {name!r} contains NaN")
    G, n = _rows(name, t.shape, spec.per_channel, spec.blocks)
    levels = 1 << spec.bits
    x = t.reshape(G, n).to(torch.float32)
    values, order = torch.sort(x, dim=1, stable=True)
    first = torch.ones_like(values, dtype=torch.bool)
    first[:, 1:] = values[:, 1:] != values[:, :-1]  # -0.0 == +0.0: the row's first zero stands
    ranks = first.cumsum(dim=1) - 1  # rank of each sorted value among its row's distinct ones
    distinct = int(ranks[:, -1].max()) + 1 if ranks.numel() else 0
    if distinct > levels:
        raise ValueError(
            f"tensor {name!r} has {distinct} distinct values in a "
            f"{'channel' if spec.per_channel else 'block' if spec.blocks > 1 else 'tensor'}, "
            f"more than the {levels} that "
            f"{spec.bits} bits hold: it was not quantized to {spec.bits} bits"
        )
    codes = torch.empty_like(ranks).scatter_(1, order, ranks)
    codebook = values.new_zeros(G, levels)
    row = torch.arange(G).unsqueeze(1).expand_as(ranks)
    codebook[row[first], ranks[first]] = values[first]

    nonzero = x != 0
    has_zero = ~nonzero.all(dim=1)
    zero_rank = (first & (values < 0)).sum(dim=1)  # distinct negatives come before the zero
    per_row = first.sum(dim=1) - has_zero.long()  # distinct non-zeros per row
    k = int(per_row.max()) if G else 0
    col = torch.arange(k).unsqueeze(0)
    src = (col + (has_zero.unsqueeze(1) & (col >= zero_rank.unsqueeze(1))).long()).clamp(
        max=levels - 1
    )  # the dense column of each non-zero column: past the zero's, one further
    nz_codebook = torch.where(col < per_row.unsqueeze(1), codebook.gather(1, src), 0.0)
    zero_value = codebook.gather(1, zero_rank.clamp(max=levels - 1).unsqueeze(1)).squeeze(1)
    neg_zero = has_zero & torch.signbit(zero_value)
    nz_codes = (codes - (has_zero.unsqueeze(1) & (x > 0)).long())[nonzero]
    positions = nonzero.reshape(-1).nonzero().squeeze(1)
    return _Quantized(spec.bits, codes, codebook, positions, nz_codes, nz_codebook, neg_zero)


def _nz_bits(k: int) -> int:
    """Bits of a code that picks one of k values: ceil(log2 k), 0 for k <= 1."""
    return (k - 1).bit_length()


def _choose(q: _Quantized, allowed: Collection[str]) -> tuple[str, int, int | None]:
    """(layout, bytes, index width or None) of the smallest allowed layout; ties: LAYOUTS order."""
    G, n = q.codes.shape
    numel = G * n
    best: tuple[str, int, int | None] | None = None
    for layout in LAYOUTS:
        if layout not in allowed:
            continue
        width = None
        if layout == "dense":
            nbytes = packed_nbytes(numel, q.bits) + 4 * q.codebook.numel()
        elif layout == "bitmap":
            nbytes = (numel + 7) // 8 + q.sparse_bytes()
        else:
            stream = {}
            for w in GAP_WIDTHS:
                count = gap_symbols(q.positions, w)
                if count is not None:
                    stream[w] = uint_nbytes(count, w) if w else 0
            width = min(stream, key=lambda w: (stream[w], w))
            nbytes = stream[width] + q.sparse_bytes()
        if best is None or nbytes < best[1]:
            best = (layout, nbytes, width)
    assert best is not None
    return best


def _write(q: _Quantized, layout: str, index_bits: int | None) -> tuple[Tensor, Tensor, dict]:
    """(codes, codebook, metadata fields) of `q` in `layout`."""
    if layout == "dense":
        return pack(q.codes, q.bits), q.codebook, {"layout": "dense"}
    neg_zero = bool(q.neg_zero.any())
    entry: dict = {"layout": layout, "nnz": q.nnz, "nz_bits": q.nz_bits, "neg_zero": neg_zero}
    if layout == "bitmap":
        numel = q.codes.numel()
        mask = torch.zeros(numel, dtype=torch.uint8)
        mask[q.positions] = 1
        where = pack(mask, 1)
    else:
        assert index_bits is not None
        where = gap_encode(q.positions, index_bits)
        entry["index_bits"] = index_bits
        entry["index_count"] = gap_symbols(q.positions, index_bits)
    parts = [where]
    if q.nz_bits:
        parts.append(pack(q.nz_codes, q.nz_bits))
    if neg_zero:
        parts.append(pack(q.neg_zero.to(torch.uint8), 1))
    return torch.cat(parts), q.nz_codebook, entry


def _decode(name: str, codes: Tensor, codebook: Tensor, info: Mapping) -> Tensor:
    """Rebuild one quantized tensor from its packed codes and codebook (dense layout)."""
    shape, bits = info["shape"], int(info["bits"])
    dtype = getattr(torch, info["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"tensor {name!r} has unknown dtype {info['dtype']!r}")
    G, n = _rows(name, shape, bool(info["per_channel"]), info["blocks"])
    if tuple(codebook.shape) != (G, 1 << bits) or codes.numel() != packed_nbytes(G * n, bits):
        raise ValueError(f"tensor {name!r}: stored codes/codebook do not match shape {shape}")
    idx = unpack(codes, bits, G * n).long().view(G, n)
    return codebook.gather(1, idx).to(dtype).reshape(shape)


def _decode_sparse(name: str, codes: Tensor, codebook: Tensor, info: Mapping) -> Tensor:
    """Rebuild one quantized tensor stored in the bitmap or index layout."""
    shape, dtype = info["shape"], getattr(torch, info["dtype"])
    G, n = _rows(name, shape, info["per_channel"], info["blocks"])
    numel, nnz, nz_bits = G * n, info["nnz"], info["nz_bits"]
    if codebook.dtype != torch.float32 or codebook.dim() != 2 or codebook.shape[0] != G:
        raise ValueError(
            f"tensor {name!r}: codebook is {codebook.dtype} {tuple(codebook.shape)}, "
            f"expected float32 with {G} rows"
        )
    k = codebook.shape[1]
    if _nz_bits(k) != nz_bits or k > 1 << info["bits"] or (nnz and not k):
        raise ValueError(
            f"tensor {name!r}: a codebook of {k} non-zero values does not fit nz_bits={nz_bits}, "
            f"bits={info['bits']} and nnz={nnz}"
        )
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError(f"tensor {name!r}: codes must be 1-D uint8, got {codes.dtype}")
    if info["layout"] == "bitmap":
        where = (numel + 7) // 8
    else:
        width = info["index_bits"]
        where = uint_nbytes(info["index_count"], width) if width else 0
    nz = (nnz * nz_bits + 7) // 8
    signs = (G + 7) // 8 if info["neg_zero"] else 0
    if codes.numel() != where + nz + signs:
        raise ValueError(
            f"tensor {name!r}: {codes.numel()} code bytes, but its {info['layout']} layout "
            f"needs {where + nz + signs} ({where} for positions, {nz} for non-zero codes, "
            f"{signs} for zero signs)"
        )
    if info["layout"] == "bitmap":
        positions = unpack(codes[:where], 1, numel).nonzero().squeeze(1)
    else:
        if width == 0 and info["index_count"]:
            raise ValueError(f"tensor {name!r}: index_bits 0 has no symbols, index_count is not 0")
        count = info["index_count"] if width else nnz  # width 0: the first nnz positions
        try:
            positions = gap_decode(codes[:where], width, count, numel)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: index: {e}") from e
    if positions.numel() != nnz:
        raise ValueError(
            f"tensor {name!r}: the {info['layout']} holds {positions.numel()} non-zeros, "
            f"nnz is {nnz}"
        )
    if nz_bits:
        nz_codes = unpack(codes[where : where + nz], nz_bits, nnz).long()
    else:
        nz_codes = torch.zeros(nnz, dtype=torch.long)
    if nnz and int(nz_codes.max()) >= k:
        raise ValueError(f"tensor {name!r}: a non-zero code is past the codebook's {k} values")
    out = torch.zeros(G, n, dtype=torch.float32)
    if signs:
        out[unpack(codes[where + nz :], 1, G).bool()] = -0.0
    if nnz:
        out.view(-1)[positions] = codebook[positions // n, nz_codes]
    return out.to(dtype).reshape(shape)


def _check_layouts(layouts: Collection[str]) -> tuple[str, ...]:
    """The layouts export may choose from, validated."""
    if isinstance(layouts, str):
        layouts = (layouts,)
    chosen = tuple(layouts)
    bad = [x for x in chosen if x not in LAYOUTS]
    if bad or not chosen:
        raise ValueError(f"layouts must name some of {LAYOUTS}, got {chosen!r}")
    return chosen


def _check_entry(name: str, info: object, version: int) -> dict:
    """A quantized tensor's metadata entry, its fields checked; ValueError naming what's wrong."""

    def field(key: str, ok, want: str):
        if key not in info:
            raise ValueError(f"tensor {name!r}: metadata lacks {key!r} ({want})")
        value = info[key]
        if not ok(value):
            raise ValueError(f"tensor {name!r}: metadata {key!r} is {value!r}, expected {want}")
        return value

    def is_int(v: object, lo: int, hi: float = float("inf")) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r}: metadata entry is {info!r}, expected an object")
    dtypes = [str(d).removeprefix("torch.") for d in _CODEBOOK_DTYPES]
    entry = {
        "shape": field(
            "shape",
            lambda v: isinstance(v, list) and all(is_int(d, 0) for d in v),
            "a list of sizes",
        ),
        "dtype": field("dtype", lambda v: v in dtypes, f"one of {dtypes}"),
        "bits": field("bits", lambda v: is_int(v, 1, 8), "an integer in 1..8"),
        "per_channel": field("per_channel", lambda v: isinstance(v, bool), "true or false"),
        "blocks": 1,
    }
    if "blocks" in info:
        entry["blocks"] = field("blocks", lambda v: is_int(v, 2), "an integer >= 2")
    if version == 1:
        if "layout" in info:
            raise ValueError(f"tensor {name!r}: layout_version 1 has no 'layout' field")
        entry["layout"] = "dense"
        return entry
    layout = entry["layout"] = field("layout", lambda v: v in LAYOUTS, f"one of {LAYOUTS}")
    if entry["per_channel"] and not entry["shape"]:
        raise ValueError(f"tensor {name!r} is 0-d and cannot be per-channel")
    if layout == "dense":
        return entry
    numel = int(torch.Size(entry["shape"]).numel())
    entry["nnz"] = field("nnz", lambda v: is_int(v, 0, numel), f"an integer in 0..{numel}")
    entry["nz_bits"] = field("nz_bits", lambda v: is_int(v, 0, 8), "an integer in 0..8")
    entry["neg_zero"] = field("neg_zero", lambda v: isinstance(v, bool), "true or false")
    if layout == "index":
        entry["index_bits"] = field("index_bits", lambda v: v in GAP_WIDTHS, f"one of {GAP_WIDTHS}")
        entry["index_count"] = field(
            "index_count", lambda v: is_int(v, 0), "a non-negative integer"
        )
    return entry


def _read_header(
    path: str | os.PathLike, meta: Mapping[str, str] | None
) -> tuple[int, dict[str, object], dict[str, str] | None]:
    """(layout_version, quantized-tensor table, tensor digests or None) of a distq file;
    ValueError for other or newer files."""
    if not meta or META_KEY not in meta:
        raise ValueError(f"{path} is not a distq packed export (no {META_KEY!r} metadata)")
    try:
        doc = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {META_KEY!r} metadata is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a distq packed export (format is not {FORMAT!r})")
    version = doc.get("layout_version")
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or version > LAYOUT_VERSION
        or version < 1
    ):
        raise ValueError(
            f"{path} has layout_version {version!r}; this distq reads "
            f"1..{LAYOUT_VERSION} (a newer distq wrote it?)"
        )
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict):
        raise ValueError(f"{path}: {META_KEY!r} metadata has no 'tensors' table")
    digests = doc.get(DIGESTS_KEY)
    if digests is not None and not (
        isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())
    ):
        raise ValueError(f"{path}: {META_KEY!r} metadata's {DIGESTS_KEY!r} is not a table")
    return version, tensors, digests


def _row(
    name: str, numel: int | str, bits: int | str, layout: str, density: str, fp32: int, packed: int
) -> tuple[str, ...]:
    """One table row as strings, with the fp32/packed ratio ('-' when nothing is stored)."""
    ratio = f"{fp32 / packed:.2f}x" if packed else "-"
    return (name, str(numel), str(bits), layout, density, str(fp32), str(packed), ratio)
