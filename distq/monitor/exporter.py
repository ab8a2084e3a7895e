"""Prometheus exporter for one rank: an isolated registry served on /metrics (and /health).

Off unless asked for (the CLI turns it on): `start()` binds base_port + local_rank on a daemon
thread, on 127.0.0.1 unless another address is given (0.0.0.0 lets a Prometheus on another host
scrape it). Only /metrics and /health are served; any other path is 404. Metric names are
`distq_*` with `rank` (and `tensor`) labels; README lists them.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

log = logging.getLogger(__name__)

GAUGES = {
    "distq_weight_quant_error": ("D-weighted ‖ŵ − w‖²_D of a tensor", ("rank", "tensor")),
    "distq_weight_quant_error_relative": ("‖ŵ − w‖²_D / ‖w‖²_D (D-weighted)", ("rank", "tensor")),
    "distq_weight_alpha": ("scale α of a quantized tensor", ("rank", "tensor")),
    "distq_weight_bits": ("bits per weight of a quantized tensor", ("rank", "tensor")),
    "distq_weight_rounding_bound": (
        "Σ over scale groups of n·α²·Δ_w²/4, the theory's weight term",
        ("rank", "tensor"),
    ),
    "distq_grad_quant_error_relative": ("Σ of each quantization's ‖Q(x) − x‖²/‖·‖²", ("rank",)),
    "distq_grad_clip_bias_relative": ("‖Clip(g) − g‖²/‖g‖²", ("rank",)),
    "distq_grad_clip_bias_predicted": ("the clipping bias of zero-mean Gaussian g", ("rank",)),
    "distq_grad_blowup": ("measured ‖Q(Clip g)‖²/‖g‖², first quantization", ("rank",)),
    "distq_grad_blowup_bound": ("proven bound on the blow-up (absent: none)", ("rank",)),
    "distq_grad_second_blowup": ("measured 1 + ‖Q(s) − s‖²/‖s‖², scatter's 2nd", ("rank",)),
    "distq_compression_ratio": ("fp32 all-reduce bytes ÷ bytes sent", ("rank",)),
    "distq_lstm_spectral_norm": ("‖W_h‖₂ of an LSTM layer's recurrent matrix", ("rank", "tensor")),
    "distq_lstm_hidden_grad_norm_first": (
        "‖∂ℓ/∂h_1‖ of an LSTM layer (first time step)",
        ("rank", "tensor"),
    ),
    "distq_loss": ("training loss (this rank's last step)", ("rank",)),
    "distq_loss_ce": ("--distill: the loss' cross-entropy part, unweighted", ("rank",)),
    "distq_loss_kl": ("--distill: KL(teacher ‖ student) at T, unweighted", ("rank",)),
    "distq_step_seconds": ("wall time of the last step", ("rank",)),
    "distq_step": ("optimizer steps taken", ("rank",)),
}
COUNTERS = {
    "distq_wire_bytes": ("gradient payload bytes on the wire", ("rank", "direction")),
    "distq_alarms": ("monitor alarms raised", ("rank", "kind")),
}


class MetricsExporter:
    """The rank's metrics in an isolated registry, optionally served over HTTP."""

    def __init__(self, rank: int) -> None:
        self.rank = str(rank)
        self.registry = CollectorRegistry()
        self.gauges = {
            n: Gauge(n, h, labels, registry=self.registry) for n, (h, labels) in GAUGES.items()
        }
        self.counters = {
            n: Counter(n, h, labels, registry=self.registry) for n, (h, labels) in COUNTERS.items()
        }
        self._server: WSGIServer | None = None
        self.port: int | None = None

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges[name].labels(rank=self.rank, **labels).set(value)

    def add(self, name: str, amount: float, **labels: str) -> None:
        if amount > 0:
            self.counters[name].labels(rank=self.rank, **labels).inc(amount)

    def start(self, port: int, address: str = "127.0.0.1") -> None:
        """Serve /metrics and /health on `address`:`port` from a daemon thread."""
        metrics = make_wsgi_app(self.registry)

        def app(environ, start_response):
            path = environ.get("PATH_INFO")
            if path == "/metrics":
                return metrics(environ, start_response)
            if path == "/health":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok\n"]
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: this exporter serves /metrics and /health\n"]

        self._server = make_server(
            address, port, app, ThreadingWSGIServer, handler_class=_SilentHandler
        )
        self.port = self._server.server_port
        threading.Thread(
            target=self._server.serve_forever, name="distq-metrics", daemon=True
        ).start()
        log.info("rank %s metrics on http://%s:%d/metrics", self.rank, address, self.port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
