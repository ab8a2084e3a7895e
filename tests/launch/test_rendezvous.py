"""Ranks started with different WORLD_SIZE stop with an error naming the likely cause instead
of waiting forever (two real processes, env:// rendezvous as torchrun and srun set it up)."""

import os
import subprocess
import time

import pytest

from tests.distributed import free_port
from tests.launch.commands import distq_train

pytestmark = pytest.mark.slow


def test_ranks_with_different_world_sizes_stop_with_a_clear_error(tmp_path):
    port = str(free_port())
    procs = []
    for rank, world in ((0, 2), (1, 3)):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
        }
        procs.append(
            subprocess.Popen(
                distq_train(
                    dist_timeout=10,
                    epochs=1,
                    progress=False,
                    metrics_port=None,
                    out_dir=tmp_path / str(rank),
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    started = time.monotonic()
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert time.monotonic() - started < 120
    for rank, (proc, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 2, err
        assert f"distq train: error: rank {rank} of WORLD_SIZE=" in err
        assert "started with different WORLD_SIZE" in err and "Traceback" not in err, err
