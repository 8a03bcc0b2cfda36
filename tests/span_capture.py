"""Tracing switched on for one test, every ended span kept in memory (the SDK's InMemorySpanExporter)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import tracing


@contextmanager
def spans_in_memory() -> Iterator[InMemorySpanExporter]:
    """Tracing on through `tracing.install`; off again (and nothing kept) on the way out."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.uninstall()
        provider.shutdown()
