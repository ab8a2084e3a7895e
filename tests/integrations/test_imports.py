"""Each integration is an optional extra: importing distq never imports an engine, and an
integration whose engine is missing raises an ImportError naming the pip extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

ENGINES = ("deepspeed", "horovod", "pytorch_lightning", "lightning", "accelerate")

# Make `import <name>` fail as if the package were not installed, then import the integration.
BLOCK = """
import sys
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
