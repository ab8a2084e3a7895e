"""What every recipe hands the training loop: a train/test split held in memory, and how a
classifier is scored on it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Split:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: int | None = None  # set where the model's output size depends on the data

    def to(self, device: torch.device) -> Split:
        """The split with its tensors on `device`."""
        return Split(
            self.train_x.to(device),
            self.train_y.to(device),
            self.test_x.to(device),
            self.test_y.to(device),
            self.classes,
        )


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1024) -> float:
    """Top-1 accuracy of `model` in eval mode, in batches (bounded memory); for sequence
    targets (N, T) against logits (N, C, T), the share of the N·T positions predicted right."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(
            (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
            for i in range(0, len(y), batch)
        )
    model.train(was_training)
    return correct / y.numel()
