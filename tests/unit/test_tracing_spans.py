"""Trace context in SQS message attributes (within SQS's ten), step spans, and the logging rule on attributes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

from consumers.metrics import ConsumerMetrics
from service import tracing
from service.adapters.aws.queue_publisher import SqsPublisher
from service.domain.provider_ports import PermanentProviderError
from tests.span_capture import spans_in_memory

QUEUE_URL = "https://sqs.eu-west-2.amazonaws.com/000000000000/comms-sms"
CALLER = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "vendor=1"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with spans_in_memory() as exporter:
        yield exporter


def tracer() -> Tracer:
    found = tracing.active_tracer()
    assert found is not None
    return found


def attributes(count: int) -> dict[str, str]:
    return {f"attribute{i}": "value" for i in range(count)}


class RecordingSqs:
    """Just enough of an SQS client for the publisher: keeps each SendMessage's arguments."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send_message(self, **call: Any) -> dict[str, Any]:
        self.sent.append(call)
        return {"MessageId": f"m-{len(self.sent)}"}


# -- trace context in message attributes ----------------------------------------------------------------------


def test_the_current_span_travels_as_traceparent_and_tracestate(spans):
    with tracer().start_as_current_span("work", context=TraceContextTextMapPropagator().extract(CALLER)) as span:
        combined = tracing.with_trace_context({"conversationId": "c"})

    assert combined["conversationId"] == "c"
    assert combined["traceparent"] == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{span.get_span_context().span_id:016x}-01"
    assert combined["tracestate"] == "vendor=1"


def test_trace_context_fills_no_more_than_the_ten_attributes_sqs_allows(spans):
    with tracer().start_as_current_span("work", context=TraceContextTextMapPropagator().extract(CALLER)):
        eight, nine, ten = (tracing.with_trace_context(attributes(n)) for n in (8, 9, 10))

    assert set(eight) - set(attributes(8)) == {"traceparent", "tracestate"}
    assert set(nine) - set(attributes(9)) == {"traceparent"}
    assert ten == attributes(10)


def test_without_a_span_no_trace_context_is_added(spans):
    assert tracing.with_trace_context({"conversationId": "c"}) == {"conversationId": "c"}


async def test_a_traced_publish_is_a_producer_span_whose_context_the_message_carries(spans):
    sqs = RecordingSqs()
    await SqsPublisher(sqs).publish(QUEUE_URL, "{}", {"conversationId": "c"})  # type: ignore[arg-type]

    [producer] = spans.get_finished_spans()
    assert producer.name == "send comms-sms"
    assert producer.attributes is not None
    assert producer.attributes["messaging.message.id"] == "m-1"
    [call] = sqs.sent
    _, trace_id, parent_id, _ = call["MessageAttributes"]["traceparent"]["StringValue"].split("-")
    assert trace_id == trace.format_trace_id(producer.context.trace_id)
    assert parent_id == trace.format_span_id(producer.context.span_id)


async def test_an_untraced_publish_sends_the_attributes_as_given():
    assert tracing.active_tracer() is None
    sqs = RecordingSqs()
    await SqsPublisher(sqs).publish(QUEUE_URL, "{}", {"conversationId": "c"})  # type: ignore[arg-type]

    [call] = sqs.sent
    assert call["MessageAttributes"] == {"conversationId": {"DataType": "String", "StringValue": "c"}}


# -- consumer steps ---------------------------------------------------------------------------------------------


def test_a_consumer_step_is_a_child_span_of_the_message(spans):
    metrics = ConsumerMetrics(CollectorRegistry())
    with tracing.consumer_span(tracer(), "sms", "m-1", 2, CALLER) as message, metrics.step("sms", "ai"):
        pass

    [step, consumer] = spans.get_finished_spans()
    assert step.name == "ai"
    assert step.parent is not None
    assert step.parent.span_id == message.get_span_context().span_id
    assert trace.format_trace_id(consumer.context.trace_id) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert consumer.attributes is not None
    assert consumer.attributes["comms.receive_count"] == 2


def test_a_failed_step_is_an_error_span_naming_only_the_exception_type(spans):
    metrics = ConsumerMetrics(CollectorRegistry())
    with pytest.raises(PermanentProviderError), metrics.step("sms", "send"):
        raise PermanentProviderError("The 'To' number +447700900123 is not valid")

    [step] = spans.get_finished_spans()
    assert step.status.status_code is StatusCode.ERROR
    assert step.status.description == "PermanentProviderError"
    assert step.attributes is not None
    assert step.attributes["error.type"] == "PermanentProviderError"
    assert step.events == ()  # no exception event: its message would carry the number


def test_an_untraced_step_is_still_timed():
    registry = CollectorRegistry()
    with ConsumerMetrics(registry).step("sms", "claim"):
        pass

    assert registry.get_sample_value("comms_step_duration_seconds_count", {"queue": "sms", "step": "claim"}) == 1


# -- the logging rule on attributes -------------------------------------------------------------------------------


def test_span_attributes_follow_the_logging_rule():
    safe = tracing.safe_attributes(
        {"auth_token": "abc", "comms.to": "+447700900123", "comms.email": "lee@example.com", "count": 3, "none": None}
    )

    assert safe == {"comms.to": "+44*******123", "comms.email": "l***@example.com", "count": 3}
