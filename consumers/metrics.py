"""Consumer metrics: received/succeeded/failed/retried by queue and reason, in-flight, step durations.

`step` is also where each step becomes a span (a child of the message's CONSUMER span) while tracing is on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from opentelemetry.trace import Tracer
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service import tracing

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ConsumerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter("comms_messages_received_total", "Messages received", ["queue"], registry=registry)
        self.finished = Counter(
            "comms_messages_finished_total",
            "Messages finished, by disposition (done/retry/defer/dead_letter) and reason",
            ["queue", "disposition", "reason"],
            registry=registry,
        )
        self.deferrals = Counter(
            "comms_deferrals_total",
            "Messages deferred (re-queued with a delay, no receive burnt), by reason (paced, ai_paced,"
            " concurrency_capped) and result (deferred, copied_delete_failed, copy_failed: retried instead)",
            ["queue", "reason", "result"],
            registry=registry,
        )
        self.in_flight = Gauge("comms_messages_in_flight", "Messages being processed", ["queue"], registry=registry)
        self.duration = Histogram(
            "comms_message_duration_seconds",
            "Whole-message processing time",
            ["queue"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.step_duration = Histogram(
            "comms_step_duration_seconds",
            "Processing time per step (claim, secrets, ai, send, final_update)",
            ["queue", "step"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.visibility_extensions = Counter(
            "comms_visibility_extensions_total",
            "Visibility extensions by result",
            ["queue", "result"],
            registry=registry,
        )
        self.delete_failures = Counter(
            "comms_delete_failures_total", "Deletes SQS reported as Failed", ["queue"], registry=registry
        )
        self.final_update_failures = Counter(
            "comms_final_update_failures_total",
            "CRITICAL: a message was sent but its conversation record could not be updated",
            ["queue"],
            registry=registry,
        )

    def step(self, queue: str, step: str) -> AbstractContextManager[None]:
        """Time one step (claim, gather, secrets, ai, reconcile, send, final_update) and, while tracing is on,
        make it a span; off, the only cost is looking at `active_tracer()`."""
        tracer = tracing.active_tracer()
        if tracer is None:
            return self._timed(queue, step)
        return self._traced(tracer, queue, step)

    @contextmanager
    def _timed(self, queue: str, step: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.step_duration.labels(queue=queue, step=step).observe(time.perf_counter() - started)

    @contextmanager
    def _traced(self, tracer: Tracer, queue: str, step: str) -> Iterator[None]:
        with self._timed(queue, step), tracing.step_span(tracer, step):
            yield
