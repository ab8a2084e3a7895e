"""distq in the Hugging Face Trainer: which tensors of GPT-2 and Llama quantize, and the
callback with ternary weights on 2 real ranks (torchrun, gloo, a real Trainer)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from .conftest import launch, need, torchrun
from .test_imports import BLOCK, python


def tiny(kind: str):
    need("transformers")
    from tests.integrations.transformers_worker import tiny_model

    return tiny_model(kind, seed=0)


def quantized(model, **options):
    from distq.optim import QuantizedOptimizer

    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "quantizes no tensor" would fail here
        return QuantizedOptimizer(adam, model, scheme="ternary", **options)


def test_distq_never_imports_transformers_and_names_the_extra_when_missing():
    python("import sys, distq, distq.optim, distq.comm\nassert 'transformers' not in sys.modules")
    message = python(BLOCK.format(engine="transformers", module="distq.comm.transformers"))
    assert "pip install 'distq[transformers]'" in message, message


def test_gpt2_conv1d_layers_are_quantized_head_and_embeddings_full_precision():
    model = tiny("gpt2")
    opt = quantized(model)
    layers = [f"transformer.h.{i}.{m}.weight" for i in range(2)
              for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]  # fmt: skip
    assert opt.names == layers[1:]  # "first" keeps h.0.attn.c_attn, "last" the tied head
    assert "transformer.wte.weight" not in opt.names and "transformer.wpe.weight" not in opt.names
    for name in opt.names:
        assert model.get_parameter(name).unique().numel() <= 3


def test_gpt2_tied_head_quantized_once_when_nothing_is_kept():
    model = tiny("gpt2")
    opt = quantized(model, keep_full_precision=())  # KeyError: 'lm_head.weight' before
    assert opt.names[-1] == "transformer.wte.weight" and len(opt.names) == 9
    assert model.lm_head.weight is model.transformer.wte.weight
    assert quantized(tiny("gpt2"), keep_full_precision=("lm_head",)).names == opt.names[:-1]


def test_llama_linear_layers_are_quantized():
    model = tiny("llama")
    opt = quantized(model)
    assert len(opt.names) == 2 * 7 - 1 and "lm_head.weight" not in opt.names
    assert "model.embed_tokens.weight" not in opt.names


WORKER = Path(__file__).with_name("transformers_worker.py")


def run_trainer(out: Path, *options: str) -> list[dict]:
    need("transformers")
    launch(torchrun(str(WORKER), str(out), *options))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("options", [("--accumulation", "2"), ("--static-graph",)])
def test_trainer_with_callback_and_ternary_weights_keeps_replicas_identical(tmp_path, options):
    """Seeded differently per rank, optimizer built before the Trainer's DDP wrap, gradient
    accumulation or a static graph (both at once fail in the plain Trainer too: torch's reducer
    asserts): replicas end bit-identical, and the hook ran once per optimizer step."""
    steps = 12
    ranks = run_trainer(tmp_path, "--steps", str(steps), *options)
    first, second = ranks
    assert any(not torch.equal(first["initial"][n], second["initial"][n]) for n in first["initial"])
    for kind in ("params", "latent"):
        different = [n for n in first[kind] if not torch.equal(first[kind][n], second[kind][n])]
        assert not different, (kind, different)
    for r in ranks:
        stats = r["stats"]
        assert stats["steps"] == steps - 2  # once per optimizer step, after 2 fp32 warm-up steps
        assert stats["uncompressed_bytes_sent"] == 0
        fp32 = stats["steps"] * 2 * (2 - 1) * r["numel"] * 4 // 2  # ring all-reduce, 2 ranks
        assert 0 < stats["bytes_sent"] * 14 < fp32
    assert first["stats"] == second["stats"]
    losses = first["losses"]
    assert len(losses) == steps and sum(losses[-3:]) < sum(losses[:3])
