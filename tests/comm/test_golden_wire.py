"""Golden bytes: the wire and the training pinned before the exchange-core refactor (issue 20).

Each value is a SHA-256 of fixed inputs and keys (tests/comm/golden.py says what): payloads of
every compressor × width, every collective's sums and counted bytes on 2 and 3 ranks, a DDP hook
run's final weights, the digits job's final weights. A refactor must leave all of them as they
are; a change meant to alter the wire regenerates them (`python -m tests.comm.golden`) and says
so in its commit.
"""

from __future__ import annotations

import json

import pytest

from tests.comm import golden
from tests.integrations.conftest import need

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pinned() -> dict:
    return json.loads(golden.GOLDEN.read_text())


def assert_same(found: dict, pinned: dict) -> None:
    assert found.keys() == pinned.keys()
    changed = sorted(k for k in found if found[k] != pinned[k])
    assert not changed, f"{len(changed)} of {len(found)} changed, e.g. {changed[:5]}"


def test_payload_bytes(pinned):
    assert_same(golden.payloads(), pinned["payloads"])


@pytest.mark.parametrize("world", [2, 3])
def test_collective_sums_and_byte_counts(pinned, world):
    assert_same(golden.collectives(world), pinned[f"collectives{world}"])


def test_hook_run_final_weights(pinned):
    assert golden.hook_run() == pinned["hook"]


def test_digits_job_final_weights(pinned):
    assert golden.digits_run() == pinned["digits"]


def test_engine_runs(pinned):
    need("deepspeed")
    need("horovod.torch")
    assert golden.engine_runs() == pinned["engines"]


def test_hook_variants(pinned):
    assert golden.hook_runs() == pinned["hooks"]
