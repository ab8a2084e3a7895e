"""Run a function in N real processes joined by a gloo process group (no mocks)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def run_workers(fn: Callable, world_size: int, *args) -> None:
    """Call fn(rank, world_size, *args) in `world_size` spawned processes; raise if any fails."""
    mp.start_processes(
        _entry, args=(fn, world_size, free_port(), args), nprocs=world_size, start_method="spawn"
    )
