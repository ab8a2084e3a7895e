"""Error feedback (Seide et al. 2014; Karimireddy et al. 2019): compress(g) sends Q(g + e) and
keeps e ← (g + e) − Q(g + e) in a `ResidualMemory` that the exchange owns and checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distq.comm.compressors import Compressor
from distq.comm.noise import Key


class ResidualMemory:
    """Residuals e per (bit width, slot): one gradient-sized float32 tensor per rank and slot."""

    def __init__(self) -> None:
        self.residuals: dict[tuple[int, int], Tensor] = {}

    def get(self, bits: int, slot: int, numel: int) -> Tensor | None:
        """The residual of `slot` (None before its first step; ValueError if not `numel` long)."""
        residual = self.residuals.get((bits, slot))
        if residual is not None and residual.numel() != numel:
            raise ValueError(
                f"error-feedback slot {slot} holds {residual.numel()} elements, got {numel}: "
                "the bucket layout changed; call discard_mismatched() or reset()"
            )
        return residual

    def discard_mismatched(self, slot: int, numel: int) -> bool:
        """Drop slot's residuals of another size than `numel`; True if one was dropped."""
        stale = [k for k, r in self.residuals.items() if k[1] == slot and r.numel() != numel]
        for k in stale:
            del self.residuals[k]
        return bool(stale)

    def reset(self) -> None:
        """Forget all residuals (a new bucket layout or world size)."""
        self.residuals.clear()

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{bits}/{slot}": r.clone() for (bits, slot), r in self.residuals.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        for name, residual in state.items():
            bits, slot = (int(v) for v in name.split("/"))
            self.residuals[bits, slot] = residual.clone()


class ErrorFeedback(Compressor):
    """`inner` with error feedback from `memory` (a fresh one by default), per key.slot, on a
    rank's own gradient (key.phase 0; the `scatter` owner's re-quantization passes through).
    inplace=True adds e into the caller's x (a scratch buffer) instead of allocating g + e."""

    stateful = True  # the residual belongs to the whole tensor: collectives never split it

    def __init__(
        self, inner: Compressor, memory: ResidualMemory | None = None, inplace: bool = False
    ) -> None:
        self.inner = inner
        self.wire = inner.wire
        self.memory = ResidualMemory() if memory is None else memory
        self.inplace = inplace

    @property
    def residuals(self) -> dict[int, Tensor]:
        """This width's residuals by slot (a copy of the mapping; the tensors are live)."""
        bits = self.wire.bits
        return {slot: r for (b, slot), r in self.memory.residuals.items() if b == bits}

    def _residual(self, x: Tensor, key: Key) -> Tensor | None:
        if key.phase != 0:
            return None
        return self.memory.get(self.wire.bits, key.slot, x.numel())

    def scales(self, x: Tensor, key: Key) -> Tensor:
        residual = self._residual(x, key)
        return self.inner.scales(x if residual is None else x + residual, key)

    def compress(self, x: Tensor, key: Key, scales: Tensor | None = None, start: int = 0) -> Tensor:
        if key.phase != 0:
            return self.inner.compress(x, key, scales, start)
        residual = self._residual(x, key)
        if residual is not None:
            x = x.add_(residual) if self.inplace else x + residual
        payload = self.inner.compress(x, key, scales, start)
        if residual is None:
            residual = self.memory.residuals[self.wire.bits, key.slot] = torch.empty_like(x)
        self.inner.decompress_into(payload, residual, key=key).neg_().add_(x)  # e = t − Q(t)
        torch.nan_to_num_(residual, nan=0.0, posinf=0.0, neginf=0.0)
        return payload

    def decompress_into(
        self, payload: Tensor, out: Tensor, accumulate: bool = False, *, key: Key | None = None
    ) -> Tensor:
        return self.inner.decompress_into(payload, out, accumulate, key=key)

    def decode_rows_into(self, rows: Tensor, out: Tensor, *, key: Key | None = None) -> Tensor:
        return self.inner.decode_rows_into(rows, out, key=key)

    def decode_sum_into(
        self,
        rows: Tensor,
        out: Tensor,
        skip: int | None = None,
        accumulate: bool = False,
        *,
        key: Key | None = None,
    ) -> Tensor:
        return self.inner.decode_sum_into(rows, out, skip, accumulate, key=key)

    def reset(self) -> None:
        """Forget all residuals."""
        self.memory.reset()
