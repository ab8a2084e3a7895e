"""`distq train --channel-sparsity`: recorded in checkpoints, resumed bit-exactly, and packed by
`distq export` as the smaller model, which loads and scores as the masked model does."""

import shutil
import subprocess
import sys

import pytest
import torch

from distq.channels import count_macs, resize_to, rewrite
from distq.export import load_packed
from distq.launch import checkpoint, config, recipes, train
from tests.launch.commands import QUIET

pytestmark = pytest.mark.slow
CIFAR = {
    "recipe": "cifar", "hidden": 64, "epochs": 2, "batch_size": 64, "scheme": "linear",
    "bits": 3, "lr": 0.005, "channel_sparsity": 0.5, "channel_every": 10,
    "checkpoint_every": None, **QUIET,
}  # fmt: skip


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned")
    result = train.run(config.TrainConfig(**CIFAR, out_dir=str(out)))
    return out, result


def test_export_writes_the_smaller_model_that_scores_as_the_masked_one(cifar_run, tmp_path):
    out, result = cifar_run
    state = checkpoint.load(out / "checkpoint.pt")
    assert config.flatten(state["config"])["channel_sparsity"] == 0.5
    keep = state["channels"]["keep"]
    assert {n: int(k.sum()) for n, k in keep.items()} == {"0": 4, "3": 4, "7": 8, "10": 8,
                                                          "14": 16, "17": 16}  # fmt: skip
    packed = tmp_path / "model.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "distq.launch.cli", "export", str(out / "checkpoint.pt"),
         str(packed)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "channel pruning: 56 of 112 channels removed" in done.stdout
    tensors = load_packed(packed)
    assert tensors["3.weight"].shape == (4, 4, 3, 3)
    assert tensors["23.weight"].shape == (10, 16)  # the classifier takes the 16 kept channels
    assert len(tensors["10.weight"].unique()) <= 7  # still 3-bit (7 levels)

    data = recipes.load("cifar", 0.2, 0)
    torch.manual_seed(0)
    masked = recipes.build_model("cifar", 64, 3)
    masked.load_state_dict(state["model"])
    smaller = resize_to(recipes.build_model("cifar", 64, 3), tensors)
    smaller.load_state_dict(tensors)
    masked.eval(), smaller.eval()
    with torch.no_grad():
        x = data.test_x[:256]
        torch.testing.assert_close(smaller(x), masked(x), rtol=1e-4, atol=1e-4)
    accuracy = recipes.accuracy(smaller, data.test_x, data.test_y)
    assert accuracy == pytest.approx(result.test_accuracy, abs=2 / len(data.test_y))
    assert accuracy > 0.15  # it learned (10 classes: chance is 0.1)
    assert sum(t.numel() for t in tensors.values()) < 0.4 * sum(
        t.numel() for t in state["model"].values()
    )


def test_a_resumed_pruning_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path):
    digits = {
        "hidden": 32, "depth": 2, "epochs": 2, "channel_sparsity": 0.5, "channel_every": 5,
        "channel_rank_weight": 0.2, "checkpoint_every": None, "keep_checkpoints": 5, **QUIET,
    }  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.run(config.TrainConfig(**digits, out_dir=str(straight)))
    first_epoch = sorted((straight / "checkpoints").glob("step-*.pt"))[0]
    (split / "checkpoints").mkdir(parents=True)
    for path in (first_epoch, first_epoch.with_name(first_epoch.name + ".sha256")):
        shutil.copy(path, split / "checkpoints" / path.name)
    train.run(config.TrainConfig(**digits, out_dir=str(split), resume=True))
    a, b = (checkpoint.load(d / "checkpoint.pt") for d in (straight, split))
    assert a["step"] == b["step"] > checkpoint.load(first_epoch)["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, keep in a["channels"]["keep"].items():
        assert torch.equal(keep, b["channels"]["keep"][name])
        assert int(keep.sum()) == 16


def test_bad_channel_settings_are_named(tmp_path):
    with pytest.raises(config.ConfigError, match=r"channel_begin=0\.5 must be below channel_end"):
        config.TrainConfig(channel_sparsity=0.5, channel_begin=0.5, channel_end=0.5)
    with pytest.raises(config.ConfigError, match="channel_sparsity"):
        config.TrainConfig(channel_sparsity=1.5)
    with pytest.raises(config.ConfigError, match=r"channel_floor=0; allowed: a share in \(0, 1\]"):
        config.TrainConfig(channel_sparsity=0.5, channel_allocation="global", channel_floor=0)
    with pytest.raises(config.ConfigError, match=r"channel_allocation.*uniform, global"):
        config.TrainConfig(channel_allocation="layerwise")
    cfg = config.TrainConfig(
        recipe="charlm", hidden=8, depth=1, epochs=1, channel_sparsity=0.5,
        out_dir=str(tmp_path), **QUIET,
    )  # fmt: skip
    message = r"channel_sparsity=0\.5 on the charlm model: channel pruning rewrites nn\.Sequential"
    with pytest.raises(config.ConfigError, match=message):
        train.run(cfg)



def test_global_allocation_removes_the_share_of_macs_and_keeps_each_floor(cifar_run, tmp_path):
    """--channel-allocation global: ρ is the share of multiply-accumulates removed (uniform
    removes ρ of every layer's channels instead), no layer keeps less than --channel-floor of
    its channels, and the setting is recorded in the checkpoint."""
    cfg = {**CIFAR, "epochs": 1, "channel_allocation": "global", "channel_floor": 0.5}
    train.run(config.TrainConfig(**cfg, out_dir=str(tmp_path)))
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert config.flatten(state["config"])["channel_allocation"] == "global"
    keep = state["channels"]["keep"]
    kept = {n: int(k.sum()) for n, k in keep.items()}
    assert all(kept[n] >= 0.5 * k.numel() for n, k in keep.items()), kept
    uniform = checkpoint.load(cifar_run[0] / "checkpoint.pt")["channels"]["keep"]
    assert kept != {n: int(k.sum()) for n, k in uniform.items()}

    example = recipes.load("cifar", 0.2, 0).test_x[:1]
    model = recipes.build_model("cifar", 64, 3)
    model.load_state_dict(state["model"])
    full = count_macs(model, example)
    assert count_macs(rewrite(model, keep), example) <= 0.5 * full
