"""Fixtures of the comm tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from distq.comm.transport import TorchTransport


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A real one-process gloo group (the exchange needs a transport)."""
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield TorchTransport()
    dist.destroy_process_group()
