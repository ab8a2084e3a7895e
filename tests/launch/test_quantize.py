"""`distq quantize`: a full-precision digits run quantized after training, exported, and resumed
for fine-tuning; what it refuses, in one line and exit 2."""

import pytest
import torch

from distq.export import load_packed
from distq.launch import checkpoint, cli, config, quantize, train
from tests.launch.commands import QUIET


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp")
    train.run(
        config.TrainConfig(
            scheme="none", grad_bits=None, epochs=1, hidden=16, depth=2, out_dir=str(out),
            checkpoint_every=None, **QUIET,
        )
    )  # fmt: skip
    return out


def test_quantize_export_and_resume(fp_run, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(fp_run / "checkpoint.pt"), "--scheme", "linear", "--bits", "3",
            "--calibration-fraction", "0.05", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    said = capsys.readouterr().out
    assert "72 of 1438 training examples (5.0%)" in said and "3.weight: output error" in said
    state = checkpoint.load(out / "checkpoint.pt")
    source = checkpoint.load(fp_run / "checkpoint.pt")
    assert state["quantized"] == {"3.weight": {"scheme": "linear", "bits": 3, "per_channel": False}}
    w_hat = state["model"]["3.weight"]
    alpha = state["optimizer"]["alpha"]["3.weight"]
    codes = w_hat / alpha * 3
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 3 + 1e-4
    assert torch.equal(state["optimizer"]["latent"]["3.weight"], source["model"]["3.weight"])
    assert torch.equal(state["model"]["0.weight"], source["model"]["0.weight"])  # first: fp32
    packed = tmp_path / "q.safetensors"
    assert cli.main(["export", str(out / "checkpoint.pt"), str(packed)]) == 0
    assert torch.allclose(load_packed(packed)["3.weight"], w_hat)
    capsys.readouterr()
    assert cli.main(["train", str(out / quantize.CONFIG_NAME), "--epochs", "1"]) == 0
    said = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoints' / 'step-00000000.pt'} at step 0" in said
    assert "done: test accuracy" in said
    assert checkpoint.load(out / "checkpoint.pt")["step"] == 44  # 1438 // 32 steps ran


def test_naive_method_and_the_python_function(fp_run, tmp_path):
    result = quantize.quantize_checkpoint(
        fp_run / "checkpoint.pt", "ternary", method="naive", out=tmp_path / "n"
    )
    assert result.checkpoint == tmp_path / "n" / "checkpoint.pt"
    [layer] = result.ptq.layers
    assert layer.source == "naive rounding (d = 1)"
    assert 0 <= result.accuracy <= 1 and result.fp_accuracy > 0.5


def refused(argv, message, capsys):
    assert cli.main(["quantize", *map(str, argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if "no recorded SHA-256" not in line]
    assert len(err) == 1 and err[0].startswith("distq quantize: error: "), err
    assert message in err[0], err[0]


def test_bad_input_is_refused(fp_run, tmp_path, capsys):
    ckpt = fp_run / "checkpoint.pt"
    for fraction in ("0", "1.5", "-0.1", "nan"):
        refused([ckpt, "--scheme", "ternary", "--calibration-fraction", fraction,
                 "--out", tmp_path / "a"], "calibration fraction", capsys)  # fmt: skip
    refused([ckpt, "--scheme", "fourary", "--out", tmp_path / "b"],
            "scheme='fourary' is not allowed; allowed: none, binary", capsys)  # fmt: skip
    refused([ckpt, "--scheme", "linear", "--out", tmp_path / "b"], "needs bits", capsys)
    refused([ckpt, "--scheme", "none", "--out", tmp_path / "b"], "full precision", capsys)
    refused(["README.md", "--scheme", "ternary"], "not a distq checkpoint: README.md", capsys)
    tensor = tmp_path / "tensor.pt"
    torch.save({"model": {}, "quantized": {}}, tensor)
    refused([tensor, "--scheme", "ternary"], "not a distq checkpoint", capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_quantized_checkpoints_and_occupied_outputs_are_refused(fp_run, tmp_path, capsys):
    ckpt = fp_run / "checkpoint.pt"
    argv = [ckpt, "--scheme", "ternary", "--out", tmp_path / "q", "--method", "naive"]
    assert cli.main(["quantize", *map(str, argv)]) == 0
    capsys.readouterr()
    refused(argv, "holds checkpoints already; name another --out", capsys)
    refused([tmp_path / "q" / "checkpoint.pt", "--scheme", "binary", "--out", tmp_path / "r"],
            "holds quantized weights (scheme 'ternary')", capsys)  # fmt: skip
