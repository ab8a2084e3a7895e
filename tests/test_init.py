"""`import distq.comm` keeps torch's script_method deprecation warnings, which the codec's first
torch.compile would raise 14 times, from reaching users; `import distq` alone imports no torch
(distq.theory stays pure: tests/theory)."""

import subprocess
import sys

# What the first torch.compile imports (inductor's passes import torch.utils.mkldnn)
FIRST_COMPILE = "import torch._inductor.fx_passes.post_grad"


def warnings_of(code: str) -> str:
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_the_first_compile_raises_no_script_method_warning_once_distq_is_imported():
    assert warnings_of(f"import torch\n{FIRST_COMPILE}").count("script_method") >= 1  # torch does
    assert "script_method" not in warnings_of(f"import distq.comm\n{FIRST_COMPILE}")
