"""The gpt recipe: byte windows and the held-out split, the transformer's shapes, causality and
which weights it quantizes, bits per byte against a brute-force log-softmax, a short run that
learns and exports exactly, a resume that ends bit-identical to an uninterrupted run, and a real
2-worker torchrun whose replicas stay identical."""

import json
import math
import shutil
import subprocess

import pytest
import torch
from torch import nn

from distq.export import QuantSpec, export_packed, load_packed
from distq.launch import checkpoint, config, recipes, train
from distq.launch.recipes import charlm, gpt
from distq.selection import select_quantized
from tests.launch.commands import QUIET, torchrun

TINY = {"hidden": 32, "depth": 2, "bptt": 32, "batch_size": 16, "lr": 0.003}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """30 000 characters of the default corpus (Python sources), as a file."""
    path = tmp_path_factory.mktemp("corpus") / "stdlib.py"
    path.write_text(charlm.default_corpus(30_000))
    return path


def test_windows_score_consecutive_bytes():
    ids = torch.arange(103)
    x, y = gpt.windows(ids, context=10)
    assert x.shape == y.shape == (10, 10)
    assert torch.equal(y.reshape(-1), ids[1:101])  # every target once, in order
    assert torch.equal(x.reshape(-1), ids[:100])  # the input at t is the target of t − 1
    with pytest.raises(ValueError, match="too short for one window of bptt=10"):
        gpt.windows(torch.arange(10), context=10)


def test_split_is_the_utf8_bytes_and_holds_out_their_end(tmp_path):
    text = "π ≈ 3.14159; naïve café\n" * 40
    (tmp_path / "t.txt").write_text(text)
    split = recipes.load("gpt", 0.25, 0, str(tmp_path / "t.txt"), bptt=16)
    data = text.encode("utf-8")
    assert split.classes == 256 and len(data) > len(text)  # multi-byte characters
    cut = len(data) - round(0.25 * len(data))
    held_out = bytes(split.test_y.reshape(-1).tolist())
    assert data[cut : cut + len(held_out)] == held_out  # scored from the first held-out byte
    assert len(data) - cut - 16 < len(held_out) <= len(data) - cut  # whole windows
    trained = bytes(split.train_y.reshape(-1).tolist())
    assert trained == data[1 : 1 + len(trained)] and len(trained) < cut
    assert torch.equal(split.train_x[:, 1:], split.train_y[:, :-1])


def test_heads_divide_the_width_at_about_32_each():
    assert [gpt.default_heads(w) for w in (8, 32, 48, 64, 100, 256)] == [1, 1, 1, 2, 2, 8]
    with pytest.raises(ValueError, match="heads=3 does not divide the width 32"):
        gpt.GPT(32, 1, 8, heads=3)


def test_logits_shape_causality_and_the_quantized_weights():
    torch.manual_seed(0)
    model = gpt.GPT(32, 2, 16, heads=2)
    ids = torch.randint(0, 256, (3, 16))
    logits = model(ids)
    assert logits.shape == (3, 256, 16)
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    other = model(changed)
    assert torch.equal(other[..., :10], logits[..., :10])  # earlier bytes do not see it
    assert (other[..., 10:] - logits[..., 10:]).abs().amax(dim=1).min() > 0  # later ones do
    with pytest.raises(ValueError, match="17 bytes is longer than the context 16"):
        model(torch.zeros(1, 17, dtype=torch.int64))
    layers = ("attn.q", "attn.k", "attn.v", "attn.out", "fc", "proj")
    assert select_quantized(model) == [f"blocks.{b}.{n}.weight" for b in (0, 1) for n in layers]
    built = recipes.build_model("gpt", 48, 3, bptt=20)
    assert len(built.blocks) == 3 and built.position.shape == (20, 48)
    assert built.blocks[0].attn.heads == 1 and built.head.out_features == 256


class Fixed(nn.Module):
    """Logits given in advance, for whichever windows are asked."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, ids):
        return self.logits[ids[:, 0]]


def test_bits_per_byte_is_the_mean_negative_log2_probability_of_each_target():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 256, 7, generator=g) * 3
    x = torch.arange(5)[:, None].expand(5, 7)  # window k reads its own logits
    y = torch.randint(0, 256, (5, 7), generator=g)
    found = recipes.extra_metrics("gpt", Fixed(logits), x, y)
    total = 0.0
    for k in range(5):
        for t in range(7):
            row = logits[k, :, t].double()
            log_z = math.log(sum(math.exp(v) for v in row.tolist()))
            total += log_z - row[y[k, t]].item()  # −ln p(target)
    nats = total / 35
    assert found["test_loss"] == pytest.approx(nats, rel=1e-6)
    assert found["test_bpb"] == pytest.approx(nats / math.log(2), rel=1e-6)
    uniform = recipes.extra_metrics("gpt", Fixed(torch.zeros(5, 256, 7)), x, y)
    assert uniform["test_bpb"] == pytest.approx(8.0, rel=1e-6)


def test_config_takes_the_text_recipes_data_dir(tmp_path):
    (tmp_path / "x.txt").write_text("abc")
    assert config.TrainConfig(recipe="gpt", data_dir=str(tmp_path / "x.txt")).run.recipe == "gpt"
    with pytest.raises(config.ConfigError, match=r"missing\.txt' does not exist \(gpt: a text"):
        config.TrainConfig(recipe="gpt", data_dir=str(tmp_path / "missing.txt"))


def test_a_short_ternary_run_lowers_the_held_out_bits_per_byte(tmp_path, corpus):
    cfg = config.TrainConfig(
        recipe="gpt", data_dir=str(corpus), epochs=1, out_dir=str(tmp_path), grad_bits=None,
        **TINY, **QUIET,
    )  # fmt: skip
    data = recipes.load("gpt", 0.2, 0, str(corpus), bptt=32)
    torch.manual_seed(0)  # the run's initial model
    before = recipes.extra_metrics("gpt", recipes.build_model("gpt", 32, 2, bptt=32), data.test_x,
                                   data.test_y)  # fmt: skip
    result = train.run(cfg)
    assert before["test_bpb"] == pytest.approx(8.0, abs=0.1)  # near uniform at initialization
    assert result.metrics["test_bpb"] < before["test_bpb"] - 2.5
    assert result.metrics["test_loss"] == pytest.approx(result.metrics["test_bpb"] * math.log(2))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert len(state["quantized"]) == 12 and all(
        s["scheme"] == "ternary" for s in state["quantized"].values()
    )
    assert all(len(state["model"][n].unique()) <= 3 for n in state["quantized"])
    specs = {n: QuantSpec(**s) for n, s in state["quantized"].items()}
    export_packed(state["model"], specs, tmp_path / "m.safetensors")
    rebuilt = load_packed(tmp_path / "m.safetensors")
    assert rebuilt.keys() == state["model"].keys()
    assert all(torch.equal(rebuilt[n], t) for n, t in state["model"].items())


def test_a_run_resumed_mid_epoch_ends_bit_identical_to_an_uninterrupted_one(tmp_path, corpus):
    settings = {
        "recipe": "gpt", "data_dir": str(corpus), "epochs": 2, "checkpoint_every": 10,
        "keep_checkpoints": 20, "grad_bits": None, **TINY, **QUIET,
    }  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.run(config.TrainConfig(**settings, out_dir=str(straight)))
    mid = straight / "checkpoints" / "step-00000030.pt"  # inside the first epoch of 46 steps
    assert checkpoint.load(mid)["step"] == 30
    (split / "checkpoints").mkdir(parents=True)
    for path in (mid, mid.with_name(mid.name + ".sha256")):
        shutil.copy(path, split / "checkpoints" / path.name)
    train.run(config.TrainConfig(**settings, out_dir=str(split), resume=True))
    a, b = (checkpoint.load(d / "checkpoint.pt") for d in (straight, split))
    assert a["step"] == b["step"] == 92
    for part in ("model", "latent"):
        tensors = a["model"] if part == "model" else a["optimizer"]["latent"]
        other = b["model"] if part == "model" else b["optimizer"]["latent"]
        assert tensors.keys() == other.keys()
        assert all(torch.equal(t, other[n]) for n, t in tensors.items()), part
    for index, slots in a["optimizer"]["base"]["state"].items():
        for slot, value in slots.items():
            assert torch.equal(value, b["optimizer"]["base"]["state"][index][slot]), (index, slot)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (straight, split)]
    assert [s["steps"] for s in summaries] == [92, 62]  # the resumed run ran the rest only
    assert summaries[0]["metrics"] == summaries[1]["metrics"]


@pytest.mark.slow
def test_torchrun_two_workers_keep_identical_replicas(tmp_path, corpus):
    out = tmp_path / "run"
    cmd = torchrun(
        recipe="gpt", data_dir=corpus, epochs=1, grad_bits=2, monitor_every=5,
        metrics_port=None, out_dir=out, progress=False, **TINY,
    )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpt, 2 worker(s) on gloo, weights ternary, 2-bit quantize gradients" in done.stdout
    assert "test bpb" in done.stdout
    first, second = (monitor_log(out, rank) for rank in (0, 1))
    measured = [r["step"] for r in first if "weights" in r]
    assert len(measured) >= 3 and measured == [r["step"] for r in second if "weights" in r]
    for mine, theirs in zip(first, second, strict=True):  # the same ŵ and latent w throughout
        assert mine.get("weights") == theirs.get("weights"), mine["step"]
    assert first[-1]["loss"] != second[-1]["loss"]  # each rank saw its own data


def monitor_log(out, rank: int) -> list[dict]:
    """The records of a rank's monitor log, one per line."""
    lines = (out / f"monitor-rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
