"""A real Prometheus server scrapes a real 2-rank torchrun training job's distq metrics."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="Debian's prometheus is not installed (.ci/system-deps.sh)"),
]


def free_ports(count: int) -> int:
    """A base port with `count` consecutive free ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65535:
            continue
        try:
            for offset in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError("no consecutive free ports")


def query(api_port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{api_port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]["result"]


def test_prometheus_scrapes_both_ranks(tmp_path):
    metrics_port, api_port = free_ports(2), free_ports(1)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: distq\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}', "
        f"'127.0.0.1:{metrics_port + 1}']\n"
    )
    server = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{api_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    training = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "distq.launch.train", "--epochs", "40", "--monitor-every", "2",
         "--metrics-port", str(metrics_port), "--out-dir", str(tmp_path / "run"),
         "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        found: dict[str, set[str]] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and training.poll() is None:
            try:
                for name in ("distq_weight_quant_error", "distq_wire_bytes_total"):
                    found[name] = {r["metric"]["rank"] for r in query(api_port, name)}
            except OSError:
                pass  # the server is still starting
            if all(found.get(n) == {"0", "1"} for n in ("distq_weight_quant_error",
                                                         "distq_wire_bytes_total")):
                break
            time.sleep(1)
        assert found.get("distq_weight_quant_error") == {"0", "1"}, found
        assert found.get("distq_wire_bytes_total") == {"0", "1"}, found
        tensors = {r["metric"]["tensor"] for r in query(api_port, "distq_weight_quant_error")}
        assert tensors == {"3.weight", "6.weight"}
        sent = query(api_port, 'distq_wire_bytes_total{direction="sent"}')
        assert all(float(r["value"][1]) > 0 for r in sent)
    finally:
        training.terminate()
        server.terminate()
        training.wait(timeout=60)
        server.wait(timeout=60)
