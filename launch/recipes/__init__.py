"""Recipes: a model and the data it trains on, by name.

digits: scikit-learn's bundled 8×8 digits and an MLP (the default; offline).
cifar: CIFAR-10 from a folder of its python batches, or a synthetic CIFAR-style set, and a
small VGG-style CNN.
"""

from __future__ import annotations

from torch import nn

from distq.launch.recipes import cifar, digits
from distq.launch.recipes.base import Split, accuracy

RECIPES = ("digits", "cifar")

__all__ = ["RECIPES", "Split", "accuracy", "build_model", "load"]


def load(recipe: str, test_fraction: float, seed: int, data_dir: str | None = None) -> Split:
    """The recipe's train/test split (the same on every rank for a seed)."""
    if recipe == "cifar":
        return cifar.load(test_fraction, seed, data_dir)
    if data_dir is not None:
        raise ValueError(f"data_dir is read by the cifar recipe only, not by {recipe!r}")
    return digits.load(test_fraction, seed)


def build_model(recipe: str, hidden: int, depth: int) -> nn.Module:
    """The recipe's model, built from the current torch seed."""
    if recipe == "cifar":
        return cifar.build_model(hidden, depth)
    return digits.build_model(hidden, depth)
