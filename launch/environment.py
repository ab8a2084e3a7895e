"""Where this process sits in the job: rank, local rank and world size from torchrun or SLURM.

torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; under `srun` without torchrun they come from
SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS. A process started by neither is a world of one.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> DistEnv:
        env = os.environ if environ is None else environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            return cls(
                int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
            )
        return cls()


def choose_backend(requested: str) -> str:
    """'auto' means nccl when CUDA is usable, gloo otherwise."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return requested


def device_for(env: DistEnv, backend: str) -> torch.device:
    """The GPU of this local rank under nccl, the CPU otherwise."""
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


class RendezvousError(RuntimeError):
    """The job's process group did not form (in time)."""


def init_process_group(env: DistEnv, backend: str, timeout_s: float = 600) -> None:
    """Join the job's process group (env:// rendezvous, as torchrun and our SLURM scripts set).

    `timeout_s` bounds the rendezvous and every collective after it: a rank that waits for
    peers that never come (another WORLD_SIZE, a rank that did not start) stops with
    RendezvousError naming the likely causes instead of hanging.
    """
    if env.distributed and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RendezvousError(
                f"WORLD_SIZE={env.world_size} but MASTER_ADDR is not set: start with torchrun, "
                "or export MASTER_ADDR/MASTER_PORT (see slurm/ for SLURM jobs)"
            )
        try:
            dist.init_process_group(
                backend,
                store=_restart_store(env),
                rank=env.rank,
                world_size=env.world_size,
                timeout=timedelta(seconds=timeout_s),
            )
            dist.barrier()  # gloo connects lazily: make every rank meet every other one now
        except (RuntimeError, ValueError) as exc:  # DistError subclasses RuntimeError
            where = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '?')}"
            raise RendezvousError(
                f"rank {env.rank} of WORLD_SIZE={env.world_size} could not form the process group "
                f"at {where} within {timeout_s:g} s ({type(exc).__name__}); likely: the ranks "
                "were started with different WORLD_SIZE (nproc_per_node, nnodes, --ntasks), a "
                "rank did not start, or MASTER_ADDR/MASTER_PORT is not reachable"
            ) from None


def _restart_store(env: DistEnv) -> dist.Store | None:
    """After torchrun restarts a failed group, a store whose keys are fresh (None: the default).

    torchrun's agents share one TCPStore across restarts and hand it to the workers without a
    per-attempt prefix, so the restarted ranks would read the dead ranks' addresses and fail with
    "Connection refused"; prefixing the keys with the restart count keeps attempts apart.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        env.world_size,
        is_master=False,
        timeout=default_pg_timeout,
    )
    return dist.PrefixStore(f"distq/attempt_{restart}", store)


def on_main(env: DistEnv, action: Callable[[], T], errors: tuple[type[Exception], ...]) -> T:
    """`action()` run on rank 0, its result sent to every rank; if it raises one of `errors`,
    every rank raises the same (a collective: no rank is left waiting for one that stopped)."""
    result, failure = None, None
    if env.is_main:
        try:
            result = action()
        except errors as exc:
            failure = (next(i for i, e in enumerate(errors) if isinstance(exc, e)), str(exc))
    if env.distributed:
        box = [(result, failure)]
        dist.broadcast_object_list(box, src=0)
        result, failure = box[0]
    if failure is not None:
        raise errors[failure[0]](failure[1])
    return result


def shutdown(*objects_to_drop: object, destroy_group: bool = True) -> None:
    """Leave the process group cleanly (destroy_group=False: leave it to whoever made it).

    DDP on gloo sometimes aborts at interpreter exit ("terminate called without an active
    exception") when the reducer outlives the group; collecting it first, then a barrier, then
    destroying the group avoids that.
    """
    del objects_to_drop
    gc.collect()
    if destroy_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
