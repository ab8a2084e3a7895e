"""benchmarks/cluster_worker.py against the real exchange: every option builds on a gloo group,
and the hook instrumentation (attribute replacement on distq's classes) finds what it wraps and
times each category on a real quantized DDP step, for the stochastic and the rotated codec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.distributed import run_workers

STEPS = 11  # distq quantizes from step 2 (DDP rebuilds buckets after 1), measures errors at 10
TIMED = STEPS - 2


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))  # 4810 parameters


def _every_option_builds(rank: int, world: int) -> None:
    from benchmarks import cluster_worker as cw

    for name, option in cw.OPTIONS.items():
        module, state = cw.build(option, _small_model(), repeat=0)
        local = option["kind"] == "local"
        assert isinstance(module, nn.parallel.DistributedDataParallel) != local, name
        if option["kind"] == "distq":
            settings = state.settings
            assert settings.compressor == option.get("compressor", "quantize"), name
            assert (settings.bits, settings.clip) == (option["bits"], option["clip"]), name
            state.close()


def _timed_steps(rank: int, world: int, name: str) -> None:
    from benchmarks import cluster_worker as cw

    cw.TIMERS.install()
    module, state = cw.build(cw.OPTIONS[name], _small_model(), repeat=0)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(rank))
    y = torch.arange(16) % 10
    for step in range(STEPS):
        cw.TIMERS.active = step >= 2
        module.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(module(x), y).backward()
    cw.TIMERS.active = False
    state.close()
    totals, calls = cw.TIMERS.totals, cw.TIMERS.calls
    for category in ("compress", "decompress", "all_to_all", "all_gather", "other"):
        assert calls[category] > 0 and totals[category] > 0, (category, dict(calls))
    assert calls["clip"] == TIMED, dict(calls)
    assert calls["error measurement"] == 1, dict(calls)  # error_every=10: step 10
    # the bucket timeline: DDP's one bucket, every element, once per timed step
    assert [(i, n) for i, n, _, _ in cw.TIMERS.events] == [(0, 4810)] * TIMED
    # exclusive categories add up to the buckets' wall time
    exclusive = sum(totals[c] for c in cw.HookTimers.CATEGORIES)
    assert exclusive == pytest.approx(totals["bucket total"], rel=1e-6)


def test_every_option_builds_on_a_gloo_group():
    run_workers(_every_option_builds, 2)


@pytest.mark.parametrize("name", ["distq 2-bit scatter", "distq rotated 2-bit scatter"])
def test_hook_instrumentation_times_every_category(name):
    run_workers(_timed_steps, 2, name)
