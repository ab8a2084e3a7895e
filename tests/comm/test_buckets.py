"""Gradient buckets of the engines without DDP's reducer (DeepSpeed, Horovod): every bucket's
average reaches its own parameters' gradients, whether exchanged inline or on the worker."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distq.comm.buckets import BucketedExchange
from distq.comm.exchange import ExchangeSettings, GradientExchange


@pytest.mark.parametrize("overlap", [False, True])
def test_every_bucket_keeps_its_own_average(one_rank, overlap):
    """The averages were views of the exchange's one scratch buffer, so with several buckets a
    later bucket's exchange overwrote an earlier one's average before it reached `.grad`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 64), nn.Linear(64, 64))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    sent = {p: p.grad.clone() for p in model.parameters()}
    settings = ExchangeSettings(bits=8, clip=None, min_numel=0, bucket_size=64)
    exchange = GradientExchange(settings, one_rank)
    cap_mb = 64 * 64 * 4 / 2**20  # buckets of 64, 4096 and 3168 elements: the last is smaller
    buckets = BucketedExchange(exchange, model.parameters(), lambda: 0, 0, cap_mb, overlap)
    assert [sum(p.numel() for p in b) for b in buckets.buckets] == [64, 4096, 3168]
    buckets.finish()
    buckets.close()
    level = max(g.abs().max() for g in sent.values()) / 127  # 8 bits: levels s/127, s ≤ max|g|
    for p, g in sent.items():  # one rank: the average is Q(g), within a level of each value
        assert (p.grad - g).abs().max() <= level * (1 + 1e-6)
