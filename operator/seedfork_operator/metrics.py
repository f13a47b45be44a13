"""Prometheus metrics of the operator, served on ``--metrics-port`` (``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

SEED_SELECTIONS = Counter(
    "seedfork_seed_selections_total",
    "Weight sources chosen for pods, by the topology key shared with the seed (storage: no seed).",
    ["namespace", "set", "locality", "why"],
)
TRANSFERS_IN_FLIGHT = Gauge(
    "seedfork_transfers_in_flight", "Pods loading weights now (neither verified nor failed).", ["namespace", "set"]
)
TRANSFER_FAILURES = Counter(
    "seedfork_transfer_failures_total", "Failed or timed-out weight loads.", ["namespace", "set", "source"]
)
FALLBACKS = Counter(
    "seedfork_fallbacks_total", "Pods sent to storage after their seed transfers failed.", ["namespace", "set"]
)
VERIFIED = Counter("seedfork_transfers_verified_total", "Pods whose weights were verified.", ["namespace", "set"])
POD_READY_SECONDS = Histogram(
    "seedfork_pod_ready_seconds",
    "Time from pod creation to PodReady (weights verified and containers ready).",
    ["namespace", "set"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)


_serving: set[int] = set()


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Start the metrics endpoint (a daemon thread), once per port per process. Port 0: no endpoint."""
    if port > 0 and port not in _serving:
        start_http_server(port, addr=addr)
        _serving.add(port)
