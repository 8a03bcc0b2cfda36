"""Prometheus metrics on a registry owned by the app (no process-global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "comms_http_requests_total", "HTTP requests by route and status", ["route", "status"], registry=registry
        )
        self.latency = Histogram(
            "comms_http_request_duration_seconds",
            "HTTP latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_sends = Counter(
            "comms_queue_sends_total",
            "Context messages put on channel queues",
            ["channel", "outcome"],
            registry=registry,
        )
        self.webhooks = Counter(
            "comms_webhooks_total",
            "Twilio webhooks by kind (whatsapp/sms/status) and result (staged, unknown_conversation, forbidden, ...)",
            ["kind", "result"],
            registry=registry,
        )
        self.errors = Counter(
            "comms_api_errors_total", "API error responses by error code", ["error_code"], registry=registry
        )
