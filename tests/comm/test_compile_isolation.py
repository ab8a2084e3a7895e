"""The compiled codec leaves the process's torch.compile settings alone (it raised dynamo's
recompile limit from 8 to 64 for the user's own code), and still compiles every bit width."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PROBE = """
import os
os.environ["DISTQ_COMPILE"] = "1"
import torch
import torch._dynamo.utils as dynamo_utils
from distq.comm import Key, StochasticQuantizer, kernels

before = torch._dynamo.config.recompile_limit
x = torch.randn(4096)
for bits in (2, 3):
    q = StochasticQuantizer(bits, 512)
    q.decompress(q.compress(x, Key()), x.numel())
assert torch._dynamo.config.recompile_limit == before == 8, torch._dynamo.config.recompile_limit

def scaled(t, k):
    return t * k + 1.0

run = kernels.compiled(scaled)
graphs = dynamo_utils.counters["stats"]["unique_graphs"]
t = torch.ones(8)
for k in range(10):  # 10 constants: one function would fall back to eager after 8
    assert torch.equal(run(t, k), t * k + 1.0)
assert dynamo_utils.counters["stats"]["unique_graphs"] - graphs == 10
print("ok")
"""


def test_codec_compiles_without_touching_dynamo_settings():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
