"""The exploding-gradient evidence of quantized LSTMs: ‖∂ℓ/∂h_t‖ across time steps and the
spectral norms of the (quantized) recurrent matrices, by warm-started power iteration.

A binary d×d matrix B = α·S, S ∈ {±1}^{d×d}, has ‖B‖₂ ≥ ‖B‖_F/√d = α√d: its recurrent Jacobian
is large unless something rescales it, which the LSTM normalizations do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distq.lstm import GATES, QuantLSTMLayer
from distq.selection import unwrap

MONITOR_ITERATIONS = 10  # per check, warm-started from the previous check's vectors


@torch.no_grad()
def spectral_norm(
    matrix: Tensor, iterations: int = 100, tol: float = 1e-6, v: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(σ, v): the largest singular value of each matrix of a (…, m, n) stack by power iteration
    on MᵀM, and the right singular vectors (…, n) to warm-start the next call with.

    Stops after `iterations` or once every σ moved less than `tol` relatively. Starts from `v`,
    where a row of it is zero (the matrix was zero at the last call) from a fixed
    pseudo-random vector (deterministic: every rank computes the same σ; the all-ones start
    lies in the null space of e.g. a ternary matrix whose rows sum to 0, and a zero vector
    stays zero). σ never exceeds the true norm; it converges to it unless v is orthogonal to
    the top vector.
    """
    m = matrix.detach().double()
    start = _start_vector(m.shape[-1], m.device)
    if v is None:
        v = start.expand(m.shape[:-2] + m.shape[-1:])
    v = v.to(m.dtype)
    v = torch.where(v.norm(dim=-1, keepdim=True) > 0, v, start)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    sigma = torch.zeros(m.shape[:-2], dtype=m.dtype, device=m.device)
    for _ in range(iterations):
        u = (m @ v.unsqueeze(-1)).squeeze(-1)
        w = (m.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)
        new_sigma = w.norm(dim=-1).sqrt()  # ‖MᵀMv‖ with ‖v‖ = 1: σ² at convergence
        v = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        done = bool(((new_sigma - sigma).abs() <= tol * new_sigma).all())
        sigma = new_sigma
        if done:
            break
    sigma = (m @ v.unsqueeze(-1)).squeeze(-1).norm(dim=-1)  # ‖Mv‖: a lower bound on σ
    return sigma.to(matrix.dtype), v.to(matrix.dtype)


def _start_vector(n: int, device: torch.device) -> Tensor:
    """The same Gaussian vector of length n on every call and rank (float64)."""
    generator = torch.Generator().manual_seed(0x5EED)
    return torch.randn(n, generator=generator, dtype=torch.float64).to(device)


@dataclass
class RecurrentProbe:
    """Reads the LSTM layers of a model for the monitor: each layer's ‖∂ℓ/∂h_t‖ of the last
    backward and the spectral norms of its W_h (the whole matrix and each gate block)."""

    layers: dict[str, QuantLSTMLayer]
    iterations: int = MONITOR_ITERATIONS
    _vectors: dict[str, tuple[Tensor | None, Tensor | None]] = field(
        default_factory=dict, init=False
    )

    @classmethod
    def of(cls, model: nn.Module) -> RecurrentProbe | None:
        """A probe over the model's QuantLSTMLayers, or None if it has none."""
        layers = {
            name: m for name, m in unwrap(model).named_modules() if isinstance(m, QuantLSTMLayer)
        }
        return cls(layers) if layers else None

    def read(self) -> dict[str, dict[str, Any]]:
        """name -> {grad_norms: [‖∂ℓ/∂h_t‖ for t = 1..T] (absent before a backward),
        spectral_norm: ‖W_h‖₂, spectral_norm_blocks: [‖W_h,gate‖₂ for i, f, g, o]}."""
        out: dict[str, dict[str, Any]] = {}
        for name, layer in self.layers.items():
            w = layer.hh.weight.detach()
            full_v, block_v = self._vectors.get(name, (None, None))
            full, full_v = spectral_norm(w, self.iterations, v=full_v)
            blocks, block_v = spectral_norm(
                w.reshape(GATES, -1, w.shape[1]), self.iterations, v=block_v
            )
            self._vectors[name] = (full_v, block_v)
            record: dict[str, Any] = {
                "spectral_norm": _round(float(full)),
                "spectral_norm_blocks": [_round(float(s)) for s in blocks],
            }
            norms = layer.grad_norms()
            if norms is not None:
                record["grad_norms"] = [_round(float(g)) for g in norms]
            out[name] = record
        return out


def _round(x: float) -> float:
    """Six significant digits: enough for plots, short in the JSONL log."""
    return float(f"{x:.6g}")
