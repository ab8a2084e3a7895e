"""Recipes: a model and the data it trains on, by name.

digits: scikit-learn's bundled 8×8 digits and an MLP (the default; offline).
cifar: CIFAR-10 from a folder of its python batches, or a synthetic CIFAR-style set, and a
small VGG-style CNN.
charlm: a character-level LSTM language model on a text file or folder (default: the Python
standard library's sources, offline), scored in bits per character.
gpt: a byte-level decoder-only transformer on charlm's corpus, scored in bits per byte.
"""

from __future__ import annotations

from torch import Tensor, nn

from distq.launch.recipes import charlm, cifar, digits, gpt
from distq.launch.recipes.base import Split, accuracy

RECIPES = ("digits", "cifar", "charlm", "gpt")
DATA_DIR_RECIPES = ("cifar", "charlm", "gpt")
TEXT_RECIPES = ("charlm", "gpt")  # their data_dir: a text file or folder

__all__ = [
    "DATA_DIR_RECIPES",
    "RECIPES",
    "TEXT_RECIPES",
    "Split",
    "accuracy",
    "build_model",
    "extra_metrics",
    "load",
]


def load(
    recipe: str, test_fraction: float, seed: int, data_dir: str | None = None, bptt: int = 100
) -> Split:
    """The recipe's train/test split (the same on every rank for a seed)."""
    if recipe == "cifar":
        return cifar.load(test_fraction, seed, data_dir)
    if recipe == "charlm":
        return charlm.load(test_fraction, seed, data_dir, bptt)
    if recipe == "gpt":
        return gpt.load(test_fraction, seed, data_dir, bptt)
    if data_dir is not None:
        raise ValueError(
            f"data_dir is read by the {'/'.join(DATA_DIR_RECIPES)} recipes only, not by {recipe!r}"
        )
    return digits.load(test_fraction, seed)


def build_model(
    recipe: str,
    hidden: int,
    depth: int,
    *,
    classes: int | None = None,
    lstm_norm: str = "none",
    bptt: int = 100,
) -> nn.Module:
    """The recipe's model, built from the current torch seed (charlm: `classes` characters;
    gpt: `hidden` wide, `depth` blocks, a context of `bptt` bytes)."""
    if recipe == "cifar":
        return cifar.build_model(hidden, depth)
    if recipe == "charlm":
        if classes is None:
            raise ValueError("the charlm model needs classes= (the vocabulary size)")
        return charlm.build_model(classes, hidden, depth, lstm_norm, bptt)
    if recipe == "gpt":
        return gpt.build_model(hidden, depth, bptt)
    return digits.build_model(hidden, depth)


def extra_metrics(recipe: str, model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Held-out scores besides accuracy: charlm's bits per character, gpt's loss per byte in
    nats and bits ({} for the others)."""
    if recipe == "charlm":
        return {"test_bpc": charlm.bits_per_char(model, x, y)}
    if recipe == "gpt":
        return gpt.scores(model, x, y)
    return {}
