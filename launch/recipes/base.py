"""What every recipe hands the training loop: a train/test split held in memory."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Split:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
