"""Weight quantization error of a QuantizedOptimizer's tensors: ‖ŵ − w‖²_D (the loss-aware
projection's own objective) and ‖ŵ − w‖² (comparable with the gradient errors), α, Δ_w."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distq.optim import QuantizedOptimizer
from distq.quant import level_spacing


@dataclass(frozen=True)
class WeightError:
    """One quantized tensor at one step."""

    error: float  # ‖ŵ − w‖²_D with the optimizer's curvature d (d ≡ 1 for SGD)
    norm: float  # ‖w‖²_D
    error_euclidean: float  # ‖ŵ − w‖²
    norm_euclidean: float  # ‖w‖²
    alpha: float  # mean scale (per-channel and two-scale schemes averaged)
    delta_w: float  # level spacing in units of α
    numel: int

    @property
    def relative(self) -> float:
        """‖ŵ − w‖²_D / ‖w‖²_D (D-weighted)."""
        return self.error / self.norm if self.norm > 0 else 0.0

    @property
    def relative_euclidean(self) -> float:
        """‖ŵ − w‖² / ‖w‖² (Euclidean)."""
        return self.error_euclidean / self.norm_euclidean if self.norm_euclidean > 0 else 0.0

    @property
    def rounding_bound(self) -> float:
        """d·α²·Δ_w²/4: the error if every weight sat halfway between two levels (the weight
        term of the theory's floor; exceeded only by weights beyond the top level ±α)."""
        return self.numel * self.alpha**2 * self.delta_w**2 / 4


@torch.no_grad()
def weight_errors(optimizer: QuantizedOptimizer) -> dict[str, WeightError]:
    """‖ŵ − w‖²_D per quantized tensor, from the latent weights the optimizer keeps."""
    spacing = level_spacing(optimizer.scheme, optimizer.bits)
    out = {}
    for name, p in optimizer.quantized_parameters().items():
        w = optimizer.latent[name].float()
        d = optimizer.curvature(p)
        d = torch.ones_like(w) if d is None else d.float()
        moved = (p.detach().float() - w).square()
        out[name] = WeightError(
            error=float((d * moved).sum()),
            norm=float((d * w.square()).sum()),
            error_euclidean=float(moved.sum()),
            norm_euclidean=float(w.square().sum()),
            alpha=float(optimizer.alpha[name].float().mean()),
            delta_w=spacing,
            numel=w.numel(),
        )
    return out
