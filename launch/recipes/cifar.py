"""A CIFAR-style recipe: 32×32 RGB images in 10 classes and a small VGG-style CNN.

Data: a folder in CIFAR-10's python format (`data_batch_1..5` and `test_batch`, pickled dicts
with b"data" uint8 N×3072 and b"labels"), given as `data_dir`; without one, a synthetic set
made from the seed (no download): each class is a random smooth colour pattern, and every
image is its class pattern, randomly shifted, recoloured and noised, so the task needs
translation-tolerant features as CIFAR does.

Model: three stages of (conv3×3 → BatchNorm → ReLU) ×2 and a 2×2 max-pool, widths c, 2c, 4c
with c = hidden / 8, then global average pooling and a linear classifier. With the default
keep_full_precision the first convolution and the classifier stay full precision.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional

from distq.launch.recipes.base import Split

CLASSES = 10
SIZE = 32
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 5000, 1000
CLASS_CONTRAST, PIXEL_NOISE = 0.05, 0.45  # tuned so that a few epochs do not reach 100%
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"


def load(test_fraction: float, seed: int, data_dir: str | None = None) -> Split:
    """CIFAR-10 from `data_dir` (its own train/test split), else the synthetic set.

    `test_fraction` applies to the synthetic set only; images are scaled to [0, 1] and
    normalized per channel with the training set's statistics.
    """
    if data_dir is None:
        n_test = round(test_fraction * (SYNTHETIC_TRAIN + SYNTHETIC_TEST))
        split = synthetic(SYNTHETIC_TRAIN + SYNTHETIC_TEST - n_test, n_test, seed)
    else:
        split = read_python_batches(Path(data_dir))
    mean = split.train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = split.train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return Split(
        (split.train_x - mean) / std, split.train_y, (split.test_x - mean) / std, split.test_y
    )


def synthetic(n_train: int, n_test: int, seed: int) -> Split:
    """Class patterns (low-frequency noise, upsampled) shifted by up to 4 px, with random
    per-image colour gains and pixel noise; the same on every rank for a seed."""
    g = torch.Generator().manual_seed(10_007 + seed)
    # Classes share one base pattern and differ by a fainter one each: close, like CIFAR's.
    coarse = torch.rand(1, 3, 8, 8, generator=g) + CLASS_CONTRAST * torch.randn(
        CLASSES, 3, 8, 8, generator=g
    )
    patterns = functional.interpolate(coarse, size=(SIZE + 8, SIZE + 8), mode="bicubic")
    n = n_train + n_test
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    dx, dy = torch.randint(0, 9, (2, n), generator=g)
    rows = dy[:, None] + torch.arange(SIZE)
    cols = dx[:, None] + torch.arange(SIZE)
    images = patterns[labels][
        torch.arange(n)[:, None, None, None],
        torch.arange(3)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    gains = 0.6 + 0.8 * torch.rand(n, 3, 1, 1, generator=g)
    noise = PIXEL_NOISE * torch.randn(n, 3, SIZE, SIZE, generator=g)
    images = (images * gains + noise).clamp(0, 1)
    return Split(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:])


def read_python_batches(folder: Path) -> Split:
    """CIFAR-10's python-format batches from `folder` (the files that exist of data_batch_1..5;
    test_batch is required)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"data_dir {str(folder)!r} is not a directory")
    train_files = [folder / name for name in TRAIN_FILES if (folder / name).is_file()]
    if not train_files or not (folder / TEST_FILE).is_file():
        raise FileNotFoundError(
            f"data_dir {str(folder)!r} needs CIFAR-10 python batches: data_batch_1..5 (at least "
            f"one) and {TEST_FILE}"
        )
    train = [_read_batch(path) for path in train_files]
    test_x, test_y = _read_batch(folder / TEST_FILE)
    return Split(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_x, test_y)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10 batches hold (dicts, lists, bytes, numpy arrays): any other
    global, the way a malicious pickle runs code, is refused."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),  # numpy 1 pickles (the dataset's own)
            ("numpy._core.multiarray", "_reconstruct"),  # numpy 2 pickles
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        }
    )

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refused {module}.{name}: a CIFAR-10 batch holds only dicts, lists, bytes and "
                "numpy arrays"
            )
        return super().find_class(module, name)


def _read_batch(path: Path) -> tuple[Tensor, Tensor]:
    with path.open("rb") as f:
        try:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ValueError(f"{path} is not a CIFAR-10 python batch: {exc}") from None
    try:
        data, labels = batch[b"data"], batch[b"labels"]
    except (KeyError, TypeError):
        raise ValueError(f"{path} is not a CIFAR-10 python batch (no b'data'/b'labels')") from None
    x = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, SIZE, SIZE).float() / 255.0
    y = torch.as_tensor(labels, dtype=torch.int64)
    if len(x) != len(y) or (len(y) and not 0 <= int(y.min()) <= int(y.max()) < CLASSES):
        raise ValueError(f"{path}: {len(x)} images, {len(y)} labels, labels must be in 0..9")
    return x, y


def build_model(hidden: int, depth: int = 3) -> nn.Module:
    """The VGG-style CNN; `hidden` sets the widths (c = hidden / 8), `depth` is ignored."""
    del depth
    c = max(4, hidden // 8)
    layers: list[nn.Module] = []
    width = 3
    for stage in range(3):
        out = c * 2**stage
        for _ in range(2):
            layers += [
                nn.Conv2d(width, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
            width = out
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, CLASSES)]
    return nn.Sequential(*layers)
