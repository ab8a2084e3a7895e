"""The metrics exporter listens on loopback unless told otherwise, and serves only /metrics and
/health (real HTTP requests)."""

import urllib.error
import urllib.request

import pytest

from distq.launch.config import TrainConfig
from distq.monitor import MetricsExporter


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def exporter():
    exporter = MetricsExporter(rank=0)
    exporter.set("distq_loss", 0.5)
    yield exporter
    exporter.close()


def test_it_binds_loopback_by_default_and_serves_only_metrics_and_health(exporter):
    assert TrainConfig().monitor.metrics_address == "127.0.0.1"
    exporter.start(0)
    assert exporter._server.server_address[0] == "127.0.0.1"
    status, body = get(exporter.port, "/metrics")
    assert status == 200 and 'distq_loss{rank="0"} 0.5' in body
    assert get(exporter.port, "/health") == (200, "ok\n")
    for path in ("/", "/metrics/x", "/favicon.ico", "/../etc/passwd"):
        assert get(exporter.port, path)[0] == 404, path


def test_another_address_can_be_chosen(exporter):
    exporter.start(0, "0.0.0.0")
    assert exporter._server.server_address[0] == "0.0.0.0"
    assert get(exporter.port, "/health") == (200, "ok\n")
