"""The default recipe: scikit-learn's bundled 8×8 digits (1797 images, offline) and an MLP.

Hidden layers are Linear → BatchNorm → ReLU; with the default keep_full_precision the first and
last Linear stay full precision and every hidden-to-hidden weight is quantized.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

from distq.launch.recipes.base import Split

PIXEL_MAX = 16.0
CLASSES = 10


def load(test_fraction: float, seed: int) -> Split:
    """Digits scaled to [0, 1], split by a seeded permutation (the same on every rank)."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / PIXEL_MAX
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * len(y))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train], x[test], y[test])


def build_model(hidden: int, depth: int, inputs: int = 64, classes: int = CLASSES) -> nn.Module:
    """MLP with `depth` hidden layers of width `hidden`."""
    layers: list[nn.Module] = []
    width = inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)
