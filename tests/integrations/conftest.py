"""Launch helpers for the integration tests: real launchers (torchrun, the deepspeed launcher,
horovodrun), 2 ranks, the venv's own executables.

An extra that is not installed skips its tests, except when DISTQ_REQUIRE_EXTRAS=1 (set by
`make test`, so CI, which installs every extra, never skips them silently)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORKER = Path(__file__).with_name("worker.py")
LAUNCH_TIMEOUT = 300


def need(module: str) -> None:
    """Skip the test when `module` is missing, or fail under DISTQ_REQUIRE_EXTRAS=1."""
    if os.environ.get("DISTQ_REQUIRE_EXTRAS") == "1":
        __import__(module)
    else:
        pytest.importorskip(module)


def env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def launch(command: list[str], cwd: Path = ROOT) -> str:
    """Run `command`; return its output, or fail with the output's tail."""
    done = subprocess.run(
        command, cwd=cwd, env=env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output[-4000:]}"
    return output


def torchrun(*args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", *args]


def horovodrun(*args: str) -> list[str]:
    return [str(BIN / "horovodrun"), "-np", "2", "--gloo", str(BIN / "python"), *args]


def run_worker(engine: str, out: Path, *options: str) -> list[dict]:
    """Train with `engine` (2 ranks); the two ranks' saved results."""
    args = [str(WORKER), engine, str(out), *options]
    launch(horovodrun(*args) if engine.startswith("horovod") else torchrun(*args))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory) -> list[dict]:
    """The plain-DDP distq run every engine is compared with."""
    return run_worker("ddp", tmp_path_factory.mktemp("ddp"))
