"""The cifar recipe: a deterministic synthetic set, CIFAR-10's python batches read exactly, clear
errors, and a CNN that trains under `distq train` with ternary weights."""

import os
import pickle

import numpy as np
import pytest
import torch

from distq.launch import config, recipes, train
from distq.launch.recipes import cifar
from tests.launch.commands import QUIET


def test_synthetic_set_is_the_same_for_a_seed_and_another_for_another():
    a, b, c = cifar.synthetic(200, 50, 0), cifar.synthetic(200, 50, 0), cifar.synthetic(200, 50, 1)
    assert a.train_x.shape == (200, 3, 32, 32) and a.test_x.shape == (50, 3, 32, 32)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert set(a.train_y.tolist()) == set(range(10))
    assert float(a.train_x.min()) >= 0.0 and float(a.train_x.max()) <= 1.0


def write_batch(path, images, labels):
    with path.open("wb") as f:
        pickle.dump({b"data": images.reshape(len(labels), -1), b"labels": labels}, f)


def test_python_batches_are_read_exactly(tmp_path):
    rng = np.random.default_rng(0)
    train1 = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    train2 = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    test = rng.integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    write_batch(tmp_path / "data_batch_1", train1, [0, 1, 2, 3, 4, 5])
    write_batch(tmp_path / "data_batch_2", train2, [6, 7, 8, 9])
    write_batch(tmp_path / "test_batch", test, [9, 8, 7, 6, 5])
    split = cifar.read_python_batches(tmp_path)
    expected = torch.from_numpy(np.concatenate([train1, train2])).float() / 255
    assert torch.equal(split.train_x, expected)
    assert split.train_y.tolist() == list(range(10)) and split.test_y.tolist() == [9, 8, 7, 6, 5]
    normalized = recipes.load("cifar", 0.2, 0, str(tmp_path))
    means = normalized.train_x.mean(dim=(0, 2, 3))
    assert torch.allclose(means, torch.zeros(3), atol=1e-5)


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        cifar.read_python_batches(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="needs CIFAR-10 python batches"):
        cifar.read_python_batches(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"x": 1}))
    (tmp_path / "test_batch").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        cifar.read_python_batches(tmp_path)
    with pytest.raises(config.ConfigError, match="data_dir is read by the cifar and charlm"):
        config.TrainConfig(data_dir=str(tmp_path))


def test_cnn_trains_with_ternary_weights(tmp_path):
    cfg = config.TrainConfig(recipe="cifar", hidden=32, epochs=1, out_dir=str(tmp_path), **QUIET)
    result = train.run(cfg)
    assert result.test_accuracy > 0.13  # chance is 0.10 (± 0.009 on 1200 test images)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    quantized = state["quantized"]
    assert len(quantized) == 5  # 6 convolutions and a classifier, first and last kept
    assert all(len(state["model"][n].unique()) <= 3 for n in quantized)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_batch_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"
    write_batch(tmp_path / "data_batch_1", np.zeros((1, 3, 32, 32), np.uint8), [0])
    (tmp_path / "test_batch").write_bytes(
        pickle.dumps({b"data": RunsCode(marker), b"labels": [0]}, protocol=2)
    )
    with pytest.raises(
        ValueError,
        match=r"test_batch is not a CIFAR-10 python batch: refused "
        r"(posix|os)\.system",
    ):
        cifar.read_python_batches(tmp_path)
    assert not marker.exists()


def test_protocol_2_batches_as_the_dataset_ships_them_still_load(tmp_path):
    images = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    for name in ("data_batch_1", "test_batch"):
        batch = {b"batch_label": b"x", b"data": images, b"labels": [3, 4], b"filenames": [b"a"]}
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=2))
    split = cifar.read_python_batches(tmp_path)
    assert split.test_y.tolist() == [3, 4]
    assert torch.equal(split.test_x.reshape(2, -1), torch.from_numpy(images).float() / 255)
