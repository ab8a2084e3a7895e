"""Binary weights: loss-aware binarization (LAB) and the BinaryConnect / BWN baselines.

LAB (Hou, Yao & Kwok, ICLR 2017) solves min_{α,b∈{±1}ⁿ} ‖αb − w‖²_D in closed form:
b = sign(w) (0 → +1) and α = ‖d⊙w‖₁ / ‖d‖₁. With d ≡ 1 this is BWN (Rastegari et al. 2016).
"""

from __future__ import annotations

import torch
from torch import Tensor

from distq.quant.base import always, register, safe_ratio
from distq.quant.reduction import row_sums


def signs(w: Tensor) -> Tensor:
    """sign(w) with sign(0) = +1, so every entry is ±1."""
    return torch.where(w < 0, -1.0, 1.0).to(w.dtype)


@register("binary", bits=(1,), loss_aware=True, capped_exact=always,
          summary="LAB: α·{±1}, α = ‖d⊙w‖₁/‖d‖₁")  # fmt: skip
def binary(w: Tensor, d: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    alpha = safe_ratio(*row_sums(d * w.abs(), d))
    return alpha[:, None] * signs(w), alpha


@register("bwn", bits=(1,), loss_aware=False, capped_exact=always,
          summary="BWN baseline: α·{±1}, α = mean|w|")  # fmt: skip
def bwn(w: Tensor, d: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    return binary(w, torch.ones_like(w), bits)


@register("binaryconnect", bits=(1,), loss_aware=False, summary="BinaryConnect: {±1}, no scale")
def binaryconnect(w: Tensor, d: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    return signs(w), torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
