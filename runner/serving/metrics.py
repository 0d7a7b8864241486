"""Prometheus metrics of one app, in the app's own registry (several apps in one process, as in tests, stay apart)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "serve_requests", "HTTP requests by route, method and status code.", ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "serve_request_duration_seconds", "Time from request to response, by route.", ["route"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "serve_batch_size", "Texts per ONNX Runtime run of /predict (above 1 when batching merges requests).",
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge("serve_in_flight", "Limited requests being handled now.", registry=self.registry)
        self.generated_tokens = Counter("serve_generated_tokens", "Tokens produced by /generate.", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
