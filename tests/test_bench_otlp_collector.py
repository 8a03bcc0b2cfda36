"""The benchmark's in-process OTLP/HTTP collector (bench/otlp_collector.py): the real OTLP exporter, as the service
configures it from OTEL_* variables, exports to it successfully, and it counts what arrives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bench.otlp_collector import TRACES_PATH, OtlpCollector


@pytest.fixture
async def collector() -> AsyncIterator[OtlpCollector]:
    running = OtlpCollector()
    await running.start()
    yield running
    await running.close()


def three_spans() -> tuple[ReadableSpan, ...]:
    finished = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(finished))
    tracer = provider.get_tracer("bench-test")
    with tracer.start_as_current_span("request"):
        with tracer.start_as_current_span("claim"):
            pass
        with tracer.start_as_current_span("send"):
            pass
    return finished.get_finished_spans()


async def export(collector: OtlpCollector, compression: Compression = Compression.NoCompression) -> SpanExportResult:
    exporter = OTLPSpanExporter(endpoint=collector.url + TRACES_PATH, compression=compression)
    try:
        return await asyncio.to_thread(exporter.export, three_spans())
    finally:
        exporter.shutdown()


async def test_the_otlp_exporter_succeeds_and_every_span_it_sends_is_counted(collector: OtlpCollector) -> None:
    assert await export(collector) is SpanExportResult.SUCCESS
    assert (collector.counts.requests, collector.counts.spans, collector.counts.undecodable) == (1, 3, 0)
    assert collector.counts.bytes > 0


async def test_gzip_compressed_exports_are_counted_too(collector: OtlpCollector) -> None:
    assert await export(collector, Compression.Gzip) is SpanExportResult.SUCCESS
    assert (collector.counts.spans, collector.counts.undecodable) == (3, 0)


def test_the_environment_points_a_service_at_the_collector_over_http_protobuf() -> None:
    collector = OtlpCollector()
    collector._server = type("Bound", (), {"url": "http://127.0.0.1:4318"})()  # type: ignore[assignment]
    assert collector.environment() == {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    }
