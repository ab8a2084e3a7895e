"""The README's "Use distq in your trainer" examples: each is a file under examples/ that the
README includes verbatim (checked here, so the two cannot drift) and that runs on 2 ranks."""

from __future__ import annotations

import os
import re
import sys

import pytest

from distq.comm import StochasticQuantizer
from tests.distributed import free_port
from tests.slurm.local_slurm import LocalSlurm, missing_daemons

from .conftest import BIN, ROOT, horovodrun, launch, need, torchrun

EXAMPLES = ROOT / "examples"
INCLUDED = re.compile(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", re.DOTALL)
RANKS = re.compile(r"rank [01]: .*?sent (\d+) B")


def readme_examples() -> dict[str, str]:
    return dict(INCLUDED.findall((ROOT / "README.md").read_text()))


def test_readme_includes_every_example_verbatim():
    included = readme_examples()
    files = sorted(p.relative_to(ROOT).as_posix() for p in EXAMPLES.iterdir() if p.is_file())
    assert sorted(included) == files
    for path, text in included.items():
        assert text == (ROOT / path).read_text(), f"README's copy of {path} differs from the file"


def assert_both_ranks_sent_quantized_bytes(output: str) -> list[int]:
    sent = [int(b) for b in RANKS.findall(output)]
    assert len(sent) == 2 and sent[0] == sent[1] > 0, output[-2000:]
    return sent


@pytest.mark.slow
@pytest.mark.parametrize(
    ("example", "module"),
    [("train_ddp.py", None), ("train_lightning.py", "pytorch_lightning"),
     ("train_accelerate.py", "accelerate"), ("train_transformers.py", "transformers")],
)  # fmt: skip
def test_torchrun_example(example, module):
    if module:
        need(module)
    assert_both_ranks_sent_quantized_bytes(launch(torchrun(f"examples/{example}")))


@pytest.mark.slow
def test_deepspeed_example_with_the_deepspeed_launcher():
    need("deepspeed")
    # a free port: the launcher's default 29500 may still be held by an earlier job's socket
    command = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    output = launch([*command, "examples/train_deepspeed.py"])
    assert_both_ranks_sent_quantized_bytes(output)


@pytest.mark.slow
def test_horovod_example():
    need("horovod.torch")
    sent = assert_both_ranks_sent_quantized_bytes(launch(horovodrun("examples/train_horovod.py")))
    # allgather: each of 20 steps sends this rank's packed 2-bit payload of the whole model once
    numel = (32 * 256 + 256) + (256 * 10 + 10)
    assert sent[0] == 20 * StochasticQuantizer(2, 512).wire.payload_nbytes(numel)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="slurmd and munged need root")
@pytest.mark.skipif(bool(missing_daemons()), reason=f"not installed: {missing_daemons()}")
def test_slurm_example(tmp_path):
    env = {"DISTQ_PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}:{os.environ['PATH']}"}  # fmt: skip
    with LocalSlurm(tmp_path / "slurm") as slurm:
        job = slurm.submit(
            EXAMPLES / "train_slurm.sbatch", cwd=ROOT, env=env,
            sbatch=["--output", str(tmp_path / "job.out")],
        )  # fmt: skip
        assert slurm.wait(job) == "COMPLETED", slurm.describe()
    assert_both_ranks_sent_quantized_bytes((tmp_path / "job.out").read_text())
