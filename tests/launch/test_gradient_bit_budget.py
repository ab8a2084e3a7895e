"""`--grad-bits-budget` in `distq train`: its config errors, the flags and YAML keys, gradient
widths chosen at grad_allocate_after from every rank's own gradients and recorded
(grad_bit_widths.json, the hook's checkpoint state), fewer bytes on the wire from the next step,
a resume that keeps them bit-exactly and refuses another budget, and a calibration that leaves
training untouched."""

import argparse
import itertools
import json
import re
import subprocess

import pytest
import torch

from distq.launch import config
from distq.launch.allocation import GRAD_BIT_WIDTHS_NAME
from distq.monitor.report import gradient_widths, write_layer_report
from tests.launch.commands import QUIET, torchrun
from tests.launch.test_distill import final

BUDGET = {
    "grad_bits": 3,
    "grad_bits_budget": 2.5,
    "grad_allocate_after": 5,
    "bucket_size": 64,
    "hidden": 32,
    "depth": 2,
    "lr_schedule": "constant",
}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"grad_bits": "auto", "grad_bits_budget": 3.0}, "grad_bits_budget needs grad_bits a "
         "number, grad_compressor 'quantize', no error_feedback and collective scatter or "
         "allgather; got grad_bits='auto'"),
        ({"grad_bits": None, "grad_bits_budget": 3.0}, "got grad_bits=None"),
        ({"grad_compressor": "terngrad", "grad_bits_budget": 2.0},
         "got grad_bits=2, grad_compressor='terngrad'"),
        ({"collective": "hierarchical", "grad_bits_budget": 2.0}, "collective='hierarchical'"),
        ({"error_feedback": True, "grad_bits_budget": 2.0}, "error_feedback=True"),
        ({"grad_bits_budget": 4.5}, "grad_bits_budget=4.5 is outside grad_bit_candidates "
         "[2, 3, 4]; allowed: 2..4"),
        ({"grad_bits_budget": 3, "grad_bit_candidates": [2, 9]},
         "grad_bit_candidates=[2, 9]: allowed: distinct widths 1..8"),
        ({"grad_bits_budget": 3, "grad_bit_candidates": [3, 3]},
         "grad_bit_candidates=[3, 3]: allowed: distinct widths 1..8"),
        ({"grad_bits_metric": "bytes"}, "grad_bits_metric='bytes' is not allowed; allowed: "
         "loss, update"),
        ({"grad_calibration": 0}, "grad_calibration=0 is below the minimum 1"),
        ({"parallel": "fsdp", "grad_bits_budget": 2.0}, "parallel='fsdp' does not run with "
         "grad_bits_budget=2.0"),
    ],
)  # fmt: skip
def test_bad_values_name_the_key_and_what_is_allowed(values, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.from_mapping(values)


def test_flags_and_yaml_keys_set_the_gradient_section(tmp_path):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    argv = ["--grad-bits", "4", "--grad-bits-budget", "2.5", "--grad-bit-candidates", "2", "4"]
    argv += ["--grad-allocate-after", "7", "--grad-calibration", "2"]
    argv += ["--grad-bits-metric", "update"]
    grads = config.from_args(parser.parse_args(argv)).gradients
    assert (grads.bits_budget, grads.bit_candidates, grads.allocate_after) == (2.5, [2, 4], 7)
    assert (grads.calibration, grads.metric) == (2, "update")
    path = tmp_path / "run.yaml"
    path.write_text("gradients: {bits: 3, bits_budget: 3, bit_candidates: [2, 3, 4]}\n")
    grads = config.from_args(parser.parse_args([str(path)])).gradients
    assert (grads.bits_budget, grads.bit_candidates) == (3, [2, 3, 4])
    assert "bits_budget" not in grads.as_kwargs()  # not QuantizedCommState's


def train(out, nproc=2, **options):
    """`distq train` under torchrun with BUDGET changed by `options`, finished (monitor=True:
    the monitor's log on, as by default: torchrun takes a bare --monitor for its own flag)."""
    options = {**QUIET, **BUDGET, "out_dir": out, **options}
    if options["monitor"]:
        del options["monitor"]
    return subprocess.run(
        torchrun(nproc, **options),
        capture_output=True,
        text=True,
        timeout=300,
    )


def weights_of(out):
    return {k: v for k, v in final(out)[1].items() if torch.is_tensor(v)}


@pytest.mark.slow
def test_widths_are_allocated_sent_recorded_and_kept_bit_exactly_by_a_resume(tmp_path):
    done = train(tmp_path / "whole", epochs=2, monitor=True)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "whole" / "monitor-rank0.jsonl").read_text().splitlines()
    sent = [json.loads(line)["bytes_sent"] for line in log if '"bytes_sent"' in line]
    per_step = [b - a for a, b in itertools.pairwise([0, *sent])]
    assert per_step[:2] == [0, 0]  # the hook's full-precision start
    (uniform,), (allocated,) = set(per_step[2:5]), set(per_step[5:])
    assert allocated < uniform  # fewer bytes from step 6 on, every step alike
    assert done.stdout.count("step 5: gradient widths for an average of 2.5 bits") == 1
    record = json.loads((tmp_path / "whole" / GRAD_BIT_WIDTHS_NAME).read_text())
    bits, numel = record["bits"], record["numel"]
    assert (record["step"], record["candidates"], record["metric"]) == (5, [2, 3, 4], "loss")
    assert len(set(bits.values())) > 1 and record["exact"]
    assert sum(numel[n] * b for n, b in bits.items()) <= 2.5 * sum(numel.values())
    state, whole = final(tmp_path / "whole")
    assert [r["comm"]["allocated"] for r in state["ranks"]] == [bits, bits]
    assert gradient_widths(tmp_path / "whole").bits == bits  # what distq report draws
    assert tmp_path / "whole" / "grad_bit_widths.png" in write_layer_report(tmp_path / "whole")[1]

    first = train(tmp_path / "split", epochs=1)
    assert first.returncode == 0, first.stdout + first.stderr
    refused = train(tmp_path / "split", epochs=2, resume=True, grad_bits_budget=3.0)
    assert refused.returncode != 0
    assert "grad_bits_budget: checkpoint 2.5 vs now 3.0" in refused.stdout + refused.stderr
    resumed = train(tmp_path / "split", epochs=2, resume=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "gradient widths" not in resumed.stdout  # chosen once, restored from the checkpoint
    split = weights_of(tmp_path / "split")
    assert split.keys() == {k for k, v in whole.items() if torch.is_tensor(v)}
    assert all(torch.equal(whole[k], split[k]) for k in split)


@pytest.mark.slow
def test_one_candidate_trains_bit_for_bit_like_the_uniform_width(tmp_path):
    """Budget 3 from candidates [3]: every tensor keeps 3 bits, so the run must equal a plain
    3-bit one; it would not if measuring the ranks' own gradients moved the RNG, the batch-norm
    statistics or the gradients."""
    same = {"bn_recalibration": 0}  # the running statistics as training left them
    plain = train(tmp_path / "plain", grad_bits_budget=None, **same)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    budget = train(tmp_path / "budget", grad_bits_budget=3, grad_bit_candidates=3, **same)
    assert budget.returncode == 0, budget.stdout + budget.stderr
    assert "step 5: gradient widths" in budget.stdout
    a, b = weights_of(tmp_path / "plain"), weights_of(tmp_path / "budget")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
