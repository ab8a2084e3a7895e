"""Packed low-bit checkpoints: quantized tensors stored as bit-packed codes plus a codebook.

A safetensors file; every quantized `name` becomes `name.codes` and `name.codebook`, the rest is
stored as it is, and metadata key "distq" holds the JSON that `load_packed` rebuilds from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from distq.packing import pack, packed_nbytes, unpack

__all__ = ["ExportReport", "QuantSpec", "TensorSize", "export_packed", "load_packed"]

FORMAT = "distq-packed"
LAYOUT_VERSION = 1
META_KEY = "distq"
_CODEBOOK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # exact through a float32 table


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor was quantized: scheme name (a label), bits per stored code, scale layout."""

    scheme: str
    bits: int
    per_channel: bool = False

    def __post_init__(self) -> None:
        """Reject code widths the packed layout does not have."""
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"QuantSpec bits must be an integer in 1..8, got {self.bits!r}")


@dataclass(frozen=True)
class TensorSize:
    """Size of one tensor: fp32_bytes in a full-precision checkpoint, packed_bytes in this one.

    fp32_bytes is 4 bytes per element for floating tensors (integer tensors: their own size);
    bits is the code width of a quantized tensor, else the stored element width (32 for fp32);
    packed_bytes of a quantized tensor counts its codes and its codebook.
    """

    name: str
    numel: int
    bits: int
    fp32_bytes: int
    packed_bytes: int
    quantized: bool


@dataclass(frozen=True)
class ExportReport:
    """What `export_packed` wrote: per-tensor sizes and the size of the file on disk."""

    path: str
    tensors: tuple[TensorSize, ...]
    file_bytes: int

    @property
    def quantized_fp32_bytes(self) -> int:
        """Full-precision bytes of the quantized tensors."""
        return sum(t.fp32_bytes for t in self.tensors if t.quantized)

    @property
    def quantized_packed_bytes(self) -> int:
        """Stored bytes (codes and codebooks) of the quantized tensors."""
        return sum(t.packed_bytes for t in self.tensors if t.quantized)

    @property
    def total_fp32_bytes(self) -> int:
        """Full-precision bytes of all tensors: the size of the checkpoint this one replaces."""
        return sum(t.fp32_bytes for t in self.tensors)

    @property
    def ratio(self) -> float:
        """Compression on disk: total full-precision bytes over the file size."""
        return self.total_fp32_bytes / self.file_bytes

    def to_str(self) -> str:
        """A readable table of the tensors, the totals, and the file size and ratio."""
        head = ("tensor", "numel", "bits", "fp32 bytes", "packed bytes", "ratio")
        body = [_row(t.name, t.numel, t.bits, t.fp32_bytes, t.packed_bytes) for t in self.tensors]
        numel = sum(t.numel for t in self.tensors)
        packed = sum(t.packed_bytes for t in self.tensors)
        q_fp32, q_packed = self.quantized_fp32_bytes, self.quantized_packed_bytes
        totals = [
            _row("total quantized", "", "", q_fp32, q_packed),
            _row("total", numel, "", self.total_fp32_bytes, packed),
        ]
        widths = [max(map(len, col)) for col in zip(head, *body, *totals, strict=True)]
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))

        def fmt(row: tuple[str, ...]) -> str:
            cells = [c.rjust(w) for c, w in zip(row, widths, strict=True)]
            return "  ".join([row[0].ljust(widths[0]), *cells[1:]])

        file_line = (
            f"file {self.path}: {self.file_bytes} bytes on disk, "
            f"{self.ratio:.2f}x smaller than fp32 ({self.total_fp32_bytes} bytes)"
        )
        return "\n".join([fmt(head), rule, *map(fmt, body), rule, *map(fmt, totals), file_line])


def export_packed(
    state: Mapping[str, Tensor],
    quantized: Mapping[str, QuantSpec],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> ExportReport:
    """Write `state` to `path`, the tensors named in `quantized` bit-packed; report the sizes.

    Raises ValueError when a quantized name is not in `state`, a quantized tensor is not
    float32/float16/bfloat16 or holds NaN, or a row has more distinct values than 2**bits.
    """
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

    tensors: dict[str, Tensor] = {}
    header: dict[str, dict] = {}
    sizes: list[TensorSize] = []
    for name, t in state.items():
        spec = quantized.get(name)
        t = t.detach().cpu()
        if spec is None:
            tensors[name] = t.clone(memory_format=torch.contiguous_format)  # unshares storage
            nbytes = t.numel() * t.element_size()
            fp32 = t.numel() * 4 if t.is_floating_point() else nbytes
            sizes.append(TensorSize(name, t.numel(), t.element_size() * 8, fp32, nbytes, False))
            continue
        codes, codebook = _encode(name, t, spec)
        tensors[name + ".codes"], tensors[name + ".codebook"] = codes, codebook
        header[name] = {
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "scheme": spec.scheme,
            "bits": spec.bits,
            "per_channel": spec.per_channel,
        }
        packed = codes.numel() + codebook.numel() * codebook.element_size()
        sizes.append(TensorSize(name, t.numel(), spec.bits, t.numel() * 4, packed, True))

    doc = {"format": FORMAT, "layout_version": LAYOUT_VERSION, "tensors": header}
    save_file(tensors, os.fspath(path), metadata={**user_meta, META_KEY: json.dumps(doc)})
    return ExportReport(os.fspath(path), tuple(sizes), os.path.getsize(path))


def load_packed(path: str | os.PathLike) -> dict[str, Tensor]:
    """Rebuild every tensor of a file written by `export_packed`, original shapes and dtypes."""
    with safe_open(os.fspath(path), framework="pt") as f:
        header = _read_header(path, f.metadata())
        stored = set(f.keys())
        out: dict[str, Tensor] = {}
        for name, info in header.items():
            missing = {name + ".codes", name + ".codebook"} - stored
            if missing:
                raise ValueError(f"{path}: quantized tensor {name!r} lacks {sorted(missing)}")
            out[name] = _decode(
                name, f.get_tensor(name + ".codes"), f.get_tensor(name + ".codebook"), info
            )
            stored -= {name + ".codes", name + ".codebook"}
        out.update((name, f.get_tensor(name)) for name in sorted(stored))
    return out


def _rows(name: str, shape: torch.Size | list[int], per_channel: bool) -> tuple[int, int]:
    """(G, n): the codebook rows (first-dim channels or 1) and the elements each covers."""
    numel = int(torch.Size(shape).numel())
    if not per_channel:
        return 1, numel
    if len(shape) == 0:
        raise ValueError(f"tensor {name!r} is 0-d and cannot be per-channel")
    return int(shape[0]), int(torch.Size(shape[1:]).numel())


def _encode(name: str, t: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Packed codes and float32 codebook [G, 2**bits] holding each row's distinct values."""
    if t.dtype not in _CODEBOOK_DTYPES:
        raise ValueError(
            f"quantized tensor {name!r} has dtype {t.dtype}; "
            f"supported: {[str(d) for d in _CODEBOOK_DTYPES]}"
        )
    if torch.isnan(t).any():
        raise ValueError(f"quantized tensor {name!r} contains NaN")
    G, n = _rows(name, t.shape, spec.per_channel)
    levels = 1 << spec.bits
    values, order = torch.sort(t.reshape(G, n).to(torch.float32), dim=1, stable=True)
    first = torch.ones_like(values, dtype=torch.bool)
    first[:, 1:] = values[:, 1:] != values[:, :-1]
    ranks = first.cumsum(dim=1) - 1  # rank of each sorted value among its row's distinct ones
    distinct = int(ranks[:, -1].max()) + 1 if ranks.numel() else 0
    if distinct > levels:
        raise ValueError(
            f"tensor {name!r} has {distinct} distinct values in a "
            f"{'channel' if spec.per_channel else 'tensor'}, more than the {levels} that "
            f"{spec.bits} bits hold: it was not quantized to {spec.bits} bits"
        )
    codes = torch.empty_like(ranks).scatter_(1, order, ranks)
    codebook = values.new_zeros(G, levels)
    row = torch.arange(G).unsqueeze(1).expand_as(ranks)
    codebook[row[first], ranks[first]] = values[first]
    return pack(codes, spec.bits), codebook


def _decode(name: str, codes: Tensor, codebook: Tensor, info: Mapping) -> Tensor:
    """Rebuild one quantized tensor from its packed codes and codebook."""
    shape, bits = info["shape"], int(info["bits"])
    dtype = getattr(torch, info["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"tensor {name!r} has unknown dtype {info['dtype']!r}")
    G, n = _rows(name, shape, bool(info["per_channel"]))
    if tuple(codebook.shape) != (G, 1 << bits) or codes.numel() != packed_nbytes(G * n, bits):
        raise ValueError(f"tensor {name!r}: stored codes/codebook do not match shape {shape}")
    idx = unpack(codes, bits, G * n).long().view(G, n)
    return codebook.gather(1, idx).to(dtype).reshape(shape)


def _read_header(path: str | os.PathLike, meta: Mapping[str, str] | None) -> dict[str, dict]:
    """The quantized-tensor table of a distq file; ValueError for other or newer files."""
    if not meta or META_KEY not in meta:
        raise ValueError(f"{path} is not a distq packed export (no {META_KEY!r} metadata)")
    try:
        doc = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {META_KEY!r} metadata is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a distq packed export (format is not {FORMAT!r})")
    version = doc.get("layout_version")
    if not isinstance(version, int) or version > LAYOUT_VERSION or version < 1:
        raise ValueError(
            f"{path} has layout_version {version!r}; this distq reads "
            f"1..{LAYOUT_VERSION} (a newer distq wrote it?)"
        )
    tensors = doc.get("tensors")
    if not isinstance(tensors, dict):
        raise ValueError(f"{path}: {META_KEY!r} metadata has no 'tensors' table")
    return tensors


def _row(name: str, numel: int | str, bits: int | str, fp32: int, packed: int) -> tuple[str, ...]:
    """One table row as strings, with the fp32/packed ratio ('-' when nothing is stored)."""
    ratio = f"{fp32 / packed:.2f}x" if packed else "-"
    return (name, str(numel), str(bits), str(fp32), str(packed), ratio)
