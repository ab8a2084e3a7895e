"""run.fsdp_dtype (--fsdp-dtype): bfloat16 runs FSDP2's MixedPrecisionPolicy on real 2-rank gloo
groups (parameters gathered and used in bf16, gradients reduce-scattered in bf16, fp32 shards
kept), float32 leaves both in fp32; bfloat16 with parallel ddp is refused by name."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from distq.comm.fsdp import shard_model
from distq.launch import config
from tests.distributed import run_workers


def _dtypes(rank: int, world: int, dtype: str, out: dict) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 10))
    model, _ = shard_model(model, weights="fp32", gradients="fp32", dtype=dtype)
    seen = []  # each Linear's gathered weight while it runs, and its output
    for layer in (model[0], model[2]):
        layer.register_forward_pre_hook(lambda m, i: seen.append(m.weight.dtype))
        layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(32, 24, generator=g)
    nn.functional.cross_entropy(model(x).float(), x[:, :10].argmax(1)).backward()
    grads = [p.grad.to_local() for p in model.parameters()]
    if rank == 0:
        out["seen"] = seen
        out["shard dtypes"] = [p.to_local().dtype for p in model.parameters()]
        # a gradient reduced in bf16 (÷ 2 exact) holds only bf16 values after its fp32 cast
        out["bf16 values"] = all(torch.equal(t, t.bfloat16().float()) for t in grads)


def _run(dtype: str) -> dict:
    with torch.multiprocessing.Manager() as manager:
        out = manager.dict()
        run_workers(_dtypes, 2, dtype, out)
        return dict(out)


def test_bfloat16_gathers_and_reduces_in_bf16_float32_does_not():
    low, full = _run("bfloat16"), _run("float32")
    assert low["seen"] == [torch.bfloat16] * 4
    assert low["shard dtypes"] == [torch.float32] * 4  # the sharded weights stay fp32
    assert low["bf16 values"]
    assert full["seen"] == [torch.float32] * 4
    assert not full["bf16 values"]  # the test could fail: fp32 reductions are not bf16 values


def test_flag_and_refusal_with_ddp():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args(["--parallel", "fsdp", "--fsdp-dtype", "bfloat16"])
    assert config.from_args(args).run.fsdp_dtype == "bfloat16"
    with pytest.raises(config.ConfigError, match=r"fsdp_dtype='bfloat16' needs parallel='fsdp'"):
        config.TrainConfig(fsdp_dtype="bfloat16")
    with pytest.raises(config.ConfigError, match=r"fsdp_dtype='bfloat16' needs parallel='fsdp'"):
        config.from_mapping({"run": {"parallel": "ddp", "fsdp_dtype": "bfloat16"}})
    with pytest.raises(config.ConfigError, match="float16"):
        config.TrainConfig(parallel="fsdp", fsdp_dtype="float16")
    with pytest.raises(ValueError, match=r"dtype='float16'; allowed: 'float32', 'bfloat16'"):
        shard_model(nn.Linear(2, 2), dtype="float16")
