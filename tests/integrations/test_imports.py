"""Each integration is an optional extra: importing distq never imports an engine, and an
integration whose engine is missing raises an ImportError naming the pip extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ENGINES = ("deepspeed", "horovod", "pytorch_lightning", "lightning", "accelerate")

# Make `import <name>` fail as if the package were not installed, then import the integration.
BLOCK = """
import sys
from pathlib import Path
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {engine!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, Missing())
try:
    import {module}
except ImportError as exc:
    print(exc)
else:
    raise SystemExit("imported without its engine")
"""


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_importing_distq_imports_no_engine():
    python(
        "import sys, distq, distq.comm, distq.optim, distq.launch.train\n"
        f"loaded = [m for m in {ENGINES!r} if m in sys.modules]\n"
        "assert not loaded, loaded"
    )


@pytest.mark.parametrize(
    ("module", "engine", "extra"),
    [("distq.comm.deepspeed", "deepspeed", "deepspeed"),
     ("distq.comm.horovod", "horovod", "horovod"),
     ("distq.comm.lightning", "pytorch_lightning", "lightning")],
)  # fmt: skip
def test_missing_engine_names_the_extra(module, engine, extra):
    message = python(BLOCK.format(engine=engine, module=module))
    assert f"pip install 'distq[{extra}]'" in message, message


@pytest.mark.parametrize(
    ("bare", "installed"),
    [("comm.compressors", "distq.comm"), ("theory.bounds", "distq.theory"),
     ("launch.train", "distq.launch")],
)
def test_source_folders_refuse_their_bare_names(bare, installed):
    """From the repository root (where pytest and torchrun run) `import comm.compressors`
    loaded a second copy beside distq.comm.compressors, whose isinstance checks then failed."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", f"import {bare}"], capture_output=True,
                          text=True, timeout=120, cwd=root)  # fmt: skip
    assert done.returncode != 0
    assert f"ImportError: '{bare.split('.')[0]}' is distq's source folder" in done.stderr
    assert f"import {installed}" in done.stderr
