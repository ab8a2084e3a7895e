"""Weight quantization error of a QuantizedOptimizer's tensors: ‖ŵ − w‖²_D (the loss-aware
projection's own objective) and ‖ŵ − w‖² (comparable with the gradient errors), α, Δ_w, and
the theory's rounding term summed over scale groups (each group's α·Δ_w from the scheme
record's `group_spacing`: a codebook's own largest gap for the shared scheme)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distq.optim import QuantizedOptimizer
from distq.quant import get_scheme


@dataclass(frozen=True)
class WeightError:
    """One quantized tensor at one step."""

    error: float  # ‖ŵ − w‖²_D with the optimizer's curvature d (d ≡ 1 for SGD)
    norm: float  # ‖w‖²_D
    error_euclidean: float  # ‖ŵ − w‖²
    norm_euclidean: float  # ‖w‖²
    alpha: float  # mean scale over scale groups (a codebook's: its largest |value|)
    delta_w: float  # mean level spacing over groups, in units of α (a codebook's: fitted)
    numel: int
    rounding_bound: float  # Σ_groups n_g·(α_g·Δ_w,g)²/4: every weight halfway between levels
    bits: int  # the tensor's width (QuantizedOptimizer.tensor_bits)

    @property
    def relative(self) -> float:
        """‖ŵ − w‖²_D / ‖w‖²_D (D-weighted)."""
        return self.error / self.norm if self.norm > 0 else 0.0

    @property
    def relative_euclidean(self) -> float:
        """‖ŵ − w‖² / ‖w‖² (Euclidean)."""
        return self.error_euclidean / self.norm_euclidean if self.norm_euclidean > 0 else 0.0


@torch.no_grad()
def weight_errors(optimizer: QuantizedOptimizer) -> dict[str, WeightError]:
    """‖ŵ − w‖²_D per quantized tensor, from the latent weights the optimizer keeps.

    `rounding_bound` is the theory's weight term d·α²·Δ_w²/4 (DESIGN §5) taken per scale group,
    Σ_g n_g·(α_g·Δ_w,g)²/4 with n_g = numel/G: the error if every weight sat halfway between
    two levels of its group's widest gap, exceeded only by weights beyond the outer levels.
    """
    scheme = get_scheme(optimizer.scheme)
    out = {}
    for name, p in optimizer.quantized_parameters().items():
        w = optimizer.latent[name].float()
        d = optimizer.curvature(p)
        d = torch.ones_like(w) if d is None else d.float()
        moved = (p.detach().float() - w).square()
        bits = optimizer.tensor_bits[name]  # each tensor's own width (bits_by_name, set_bits)
        scale, spacing = scheme.group_spacing(optimizer.alpha[name], bits)
        out[name] = WeightError(
            error=float((d * moved).sum()),
            norm=float((d * w.square()).sum()),
            error_euclidean=float(moved.sum()),
            norm_euclidean=float(w.square().sum()),
            alpha=float(scale.mean()),
            delta_w=float(spacing.mean()),
            numel=w.numel(),
            rounding_bound=w.numel() * float((scale * spacing).square().mean()) / 4,
            bits=bits,
        )
    return out
