"""The charlm recipe: corpus reading and its errors, windows for truncated BPTT, bits per
character, a short in-process run with a packed export, and a real 2-worker torchrun with
quantized gradients whose replicas stay identical."""

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from distq.export import QuantSpec, export_packed, load_packed
from distq.launch import config, recipes, train
from distq.launch.recipes import charlm
from tests.launch.commands import torchrun

TEXT = "def f(x):\n    return x * 2  # twice\n" * 150


def test_windows_score_consecutive_characters_after_their_burn_in():
    ids = torch.arange(103)
    x, y = charlm.windows(ids, bptt=10)
    W = charlm.burn_in(10)
    assert x.shape == (9, W + 10) and y.shape == (9, 10)
    assert torch.equal(y.reshape(-1), ids[W + 1 : W + 1 + 90])  # every target once, in order
    assert torch.equal(x[:, W + 1 :], y[:, :-1])  # the input at t is the target of t − 1
    with pytest.raises(ValueError, match="too short"):
        charlm.windows(torch.arange(10), bptt=10)


def test_corpus_from_a_file_a_folder_and_clear_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello ")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("world")
    (tmp_path / "sub" / "c.bin").write_bytes(b"\xff\xfe\x00")  # not UTF-8: skipped
    assert charlm.read_corpus(tmp_path) == "hello world"
    assert charlm.read_corpus(tmp_path / "a.txt") == "hello "
    with pytest.raises(FileNotFoundError, match="nowhere"):
        charlm.read_corpus(tmp_path / "nowhere")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt"):
        charlm.read_corpus(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="not UTF-8"):
        charlm.read_corpus(tmp_path / "sub" / "c.bin")


def test_default_corpus_is_python_source_and_reproducible():
    a, b = charlm.default_corpus(50_000), charlm.default_corpus(50_000)
    assert a == b and len(a) == 50_000
    assert "def " in a and "import " in a


def test_split_holds_out_the_end_of_the_text(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT)
    split = recipes.load("charlm", 0.25, 0, str(tmp_path / "c.txt"), bptt=20)
    assert split.classes == len(set(TEXT))
    held_out = split.test_y.numel()
    assert len(TEXT) * 0.25 - 20 - 1 <= held_out <= len(TEXT) * 0.25  # whole windows
    vocab = sorted(set(TEXT))
    scored = "".join(vocab[i] for i in split.test_y.reshape(-1).tolist())
    cut = len(TEXT) - round(0.25 * len(TEXT))
    assert scored == TEXT[cut + 1 : cut + 1 + held_out]  # the last quarter, never seen in training
    trained = "".join(vocab[i] for i in split.train_y.reshape(-1).tolist())
    W = charlm.burn_in(20)
    assert trained == TEXT[W + 1 : W + 1 + len(trained)] and W + len(trained) < cut


class Uniform(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(ids.shape[0], self.vocab, 7)


def test_bits_per_char_of_a_uniform_model_is_log2_of_the_vocabulary():
    y = torch.randint(0, 37, (5, 7))
    bpc = charlm.bits_per_char(Uniform(37), torch.zeros(5, 10), y, batch=2)
    assert bpc == pytest.approx(math.log2(37), rel=1e-6)


def test_config_knows_the_lstm_options(tmp_path):
    (tmp_path / "x.txt").write_text("abc")
    cfg = config.TrainConfig(recipe="charlm", data_dir=str(tmp_path / "x.txt"), lstm_norm="layer")
    assert cfg.run.bptt == 100
    with pytest.raises(config.ConfigError, match=r"missing\.txt' does not exist"):
        config.TrainConfig(recipe="charlm", data_dir=str(tmp_path / "missing.txt"))
    with pytest.raises(config.ConfigError, match="lstm_norm='group'"):
        config.TrainConfig(recipe="charlm", lstm_norm="group")


def test_short_run_reports_bpc_and_exports_one_bit_gate_blocks(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "run"
    cfg = config.TrainConfig(
        recipe="charlm", data_dir=str(corpus), scheme="binary", lstm_norm="layer", hidden=16,
        depth=1, bptt=20, batch_size=8, epochs=2, lr=0.02, out_dir=str(out), progress=False,
        metrics_port=None, grad_bits=None, monitor_every=5,
    )  # fmt: skip
    result = train.run(cfg)
    vocab = len(set(TEXT))
    assert result.metrics["test_bpc"] < math.log2(vocab)  # learned something
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["test_bpc"] == pytest.approx(result.metrics["test_bpc"])
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["quantized"] == {
        f"lstm.layers.0.{m}.weight": {
            "scheme": "binary",
            "bits": 1,
            "per_channel": False,
            "blocks": 4,
        }
        for m in ("ih", "hh")
    }
    specs = {n: QuantSpec(**s) for n, s in state["quantized"].items()}
    report = export_packed(state["model"], specs, tmp_path / "m.safetensors")
    rebuilt = load_packed(tmp_path / "m.safetensors")
    assert all(torch.equal(rebuilt[n], t) for n, t in state["model"].items())
    assert {t.name: t.bits for t in report.tensors if t.quantized} == {
        "lstm.layers.0.ih.weight": 1,
        "lstm.layers.0.hh.weight": 1,
    }


@pytest.mark.slow
def test_torchrun_two_workers_quantized_gradients_identical_replicas(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "run"
    cmd = torchrun(
        recipe="charlm", data_dir=corpus, scheme="binary", lstm_norm="weight", hidden=16, depth=1,
        bptt=20, batch_size=8, epochs=1, grad_bits=2, monitor_every=3, metrics_port=None,
        out_dir=out, progress=False,
    )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 worker(s) on gloo, weights binary, 2-bit quantize gradients" in done.stdout
    assert "test bpc" in done.stdout
    logs = [[json.loads(line) for line in (out / f"monitor-rank{r}.jsonl").open()] for r in (0, 1)]
    checks = [[r for r in log if "recurrent" in r] for log in logs]
    assert len(checks[0]) >= 2 and len(checks[0]) == len(checks[1])
    for mine, theirs in zip(*checks, strict=True):  # same ŵ on both ranks, step after step
        assert (
            mine["recurrent"]["lstm.layers.0"]["spectral_norm_blocks"]
            == (theirs["recurrent"]["lstm.layers.0"]["spectral_norm_blocks"])
        )
        assert mine["weights"] == theirs["weights"]
        assert "grad_norms" in mine["recurrent"]["lstm.layers.0"]
    assert logs[0][-1]["loss"] != logs[1][-1]["loss"]  # each rank saw its own data
    report = subprocess.run(
        [sys.executable, "-m", "distq.launch.cli", "report", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    assert (out / "lstm_gradients.png").stat().st_size > 10_000
