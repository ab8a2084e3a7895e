"""benchmarks/gpu_check.py: its CPU-against-CPU run over every registry compressor (a real gloo
group for the hook), its refusal without CUDA, and its mismatch reports on injected differences."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.gpu_check import KEY, Case, compare, first_difference, gradient, problem_lines
from distq.comm import StochasticQuantizer
from distq.comm.registry import COMPRESSORS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "DISTQ_COMPILE": "0", **env}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_cpu_run_checks_every_registry_compressor_without_mismatch(tmp_path):
    out = tmp_path / "check.json"
    done = run_script("--device", "cpu", "--out", str(out), "--seconds", "0.2",
                      "--sizes", "3001", "8192", "--throughput-numel", "65536")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    identity = report["identity"]
    assert identity["compressors"] == list(COMPRESSORS)
    assert identity["mismatches"] == []
    assert {c["compressor"] for c in identity["cases"]} == set(COMPRESSORS)
    quantize = {(c["bits"], c["bucket"], c["scale_dtype"])
                for c in identity["cases"] if c["compressor"] == "quantize"}  # fmt: skip
    widths = {(b, bucket, "float32") for b in (1, 2, 3, 4, 8) for bucket in (512, None)}
    assert quantize == {*widths, (2, 512, "float16")}
    # 5 encodes + 5 decodes per case and size, less the given-scales encodes a compressor refuses
    assert identity["outputs_compared"] > 8 * 2 * len(identity["cases"])
    assert {(r["compressor"], r["bits"]) for r in report["throughput"]["codecs"]} >= {
        ("quantize", 2), ("quantize", 4)}  # fmt: skip
    assert report["throughput"]["memcpy_gbps"] > 0
    hook = report["hook"]
    assert (hook["backend"], hook["world_size"], hook["errors"]) == ("gloo", 1, [])
    assert hook["quantized_steps"] == 3 == sum(s["quantized"] for s in hook["steps"])
    assert all(s["finite"] and s["relative_error"] > 0 for s in hook["steps"] if s["quantized"])
    assert hook["bytes_sent"] == hook["bytes_sent_predicted"]
    assert report["ok"] and report["compile_failures"] == []
    assert "all checks passed" in done.stdout


def test_without_cuda_and_without_device_it_exits_2(tmp_path):
    out = tmp_path / "check.json"
    done = run_script("--out", str(out), CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no CUDA device is present" in done.stderr
    assert "--device cpu" in done.stderr
    assert not out.exists()


def test_first_difference_compares_bits():
    a = torch.tensor([0.0, 1.0, float("nan"), 2.0])
    assert first_difference(a, a.clone()) is None  # NaN equals itself bit for bit
    assert first_difference(a, torch.tensor([-0.0, 1.0, float("nan"), 3.0])) == (0, 2)
    assert first_difference(a, a[:3]) == (3, 1)


def test_mismatches_name_the_path_index_and_where_in_the_payload():
    case = Case("quantize", 2, 512, torch.float32)
    c, numel = case.build(), 3001
    payload = c.compress(gradient(numel), KEY)
    code_bytes = c.wire.code_nbytes(numel)  # 751; 6 scales of 4 bytes follow
    device = payload.clone()
    device[700] ^= 1
    device[code_bytes + 4 + 2] ^= 0x80
    values = c.decompress(payload, numel)
    shifted = values.clone()
    shifted[1030] = torch.nextafter(shifted[1030], torch.tensor(9.0))
    expected = {"compress": payload, "decompress_into": values, "compress(scales)": ValueError()}
    got = {"compress": device, "decompress_into": shifted,
           "compress(scales)": torch.zeros(1)}  # fmt: skip
    found = {m["path"]: m for m in compare(case, numel, expected, got, c.wire)}
    assert set(found) == {"compress", "decompress_into"}  # the CPU refused the third: left out
    m = found["compress"]
    assert (m["compressor"], m["bits"], m["bucket"], m["size"]) == ("quantize", 2, 512, 3001)
    assert (m["first_index"], m["differing"]) == (700, 2)
    assert m["where"] == "code byte 700 (bucket 5)"
    assert (m["cpu"], m["device"]) == (int(payload[700]), int(payload[700]) ^ 1)
    d = found["decompress_into"]
    assert (d["first_index"], d["differing"], d["where"]) == (1030, 1, "element 1030 (bucket 2)")
    scale_only = payload.clone()
    scale_only[code_bytes + 4 + 2] ^= 0x80
    [s] = compare(case, numel, {"compress": payload}, {"compress": scale_only}, c.wire)
    assert s["where"] == "scale of bucket 1, byte 2"


def test_a_device_error_is_a_mismatch():
    case = Case("quantize", 2, 512, torch.float32)
    c = StochasticQuantizer(2, 512)
    payload = c.compress(gradient(3001), KEY)
    [m] = compare(case, 3001, {"compress": payload}, {"compress": RuntimeError("boom")}, c.wire)
    assert m["error"] == "device: RuntimeError: boom"


def test_every_failed_check_is_a_problem_line():
    clean = {"identity": {"mismatches": []}, "hook": {"errors": []}, "compile_failures": []}
    assert problem_lines(clean) == []
    failed = {"identity": {"mismatches": [{}, {}]}, "hook": {"errors": ["step 3: non-finite"]},
              "compile_failures": ["torch.compile failed for level_values (x)"]}  # fmt: skip
    assert problem_lines(failed) == [
        "2 identity mismatch(es)",
        "hook: step 3: non-finite",
        "compile: torch.compile failed for level_values (x)",
    ]
