"""Tracing across the endpoint, the queue and the consumer, against moto and the provider sandboxes over real HTTP.

Spans are kept by the SDK's in-memory exporter, installed through `service.tracing.install` before anything is
built (the OpenTelemetry global is never touched here). The OTLP export itself is proven outside in: an aiohttp
receiver on 127.0.0.1 gets `POST /v1/traces` from the exporter the `OTEL_*` variables configure.
"""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from local_stack.moto_server import free_port
from local_stack.sandbox_http import serve
from local_stack.seed import DEMO_OPENAI_KEY, DEMO_TWILIO_AUTH_TOKEN
from service import runner, tracing
from service.config import Settings
from service.runner import run_service
from tests.conftest import initiate_body
from tests.e2e_support import E2EEnv, Tenant, e2e_env, eventually, in_process_service, new_tenant, recipient_of
from tests.fault_proxy import FaultProxy
from tests.replies_support import replies_world
from tests.replies_support import unique_tel as unique_reply_tel
from tests.span_capture import spans_in_memory
from tests.support import api_client, queued_messages

INCOMING_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_PARENT_ID = "00f067aa0ba902b7"
STEPS = {"claim", "secrets", "ai", "send", "final_update"}


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, every ended span kept in memory; off again (and nothing kept) after the test."""
    with spans_in_memory() as exporter:
        yield exporter


@pytest.fixture
async def env(settings, deps, tenant) -> AsyncIterator[E2EEnv]:
    # `tenant` seeds the demo provider secrets the e2e tenants' channel configs name.
    async with e2e_env(settings, deps.aws) as world:
        yield world


def trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return trace.format_trace_id(span.context.trace_id)


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def named(found: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [s for s in found if s.name == name]
    return span


def in_trace(found: Sequence[ReadableSpan], trace_hex: str) -> list[ReadableSpan]:
    return [s for s in found if trace_id(s) == trace_hex]


def traceparent_trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]


# -- the endpoint and the queue ------------------------------------------------------------------------------------


async def test_an_initiate_request_is_a_server_span_whose_trace_the_queued_message_carries(settings, tenant, spans):
    body = initiate_body("whatsapp")
    async with api_client(settings) as (client, deps):
        response = await client.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
        conversation_id = (await response.json())["conversation_id"]
        [message] = await queued_messages(deps, settings.queue_url("whatsapp"), conversation_id)

    server = named(spans.get_finished_spans(), "POST /initiate-conversation")
    assert server.kind is SpanKind.SERVER
    assert server.attributes is not None
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.route"] == "/initiate-conversation"
    assert server.attributes["http.response.status_code"] == 200
    assert traceparent_trace_id(message["attributes"]["traceparent"]) == trace_id(server)


async def test_the_queued_trace_context_is_the_producer_span_under_the_request(settings, tenant, spans):
    body = initiate_body("sms")
    async with api_client(settings) as (client, deps):
        response = await client.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
        conversation_id = (await response.json())["conversation_id"]
        [message] = await queued_messages(deps, settings.queue_url("sms"), conversation_id)

    finished = spans.get_finished_spans()
    server = named(finished, "POST /initiate-conversation")
    [producer] = [s for s in finished if s.kind is SpanKind.PRODUCER]
    assert parent_id(producer) == span_id(server)
    assert message["attributes"]["traceparent"].split("-")[2] == f"{span_id(producer):016x}"


async def test_aws_calls_of_a_request_are_client_spans_in_its_trace(settings, tenant, spans):
    body = initiate_body("email")
    async with api_client(settings) as (client, _):
        response = await client.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
        assert response.status == 200

    finished = spans.get_finished_spans()
    server = named(finished, "POST /initiate-conversation")
    clients = {s.name: s for s in in_trace(finished, trace_id(server)) if s.kind is SpanKind.CLIENT}
    assert {"DynamoDB.PutItem", "SQS.SendMessage"} <= set(clients)
    send = clients["SQS.SendMessage"]
    assert send.attributes is not None
    assert send.attributes["rpc.system"] == "aws-api"
    assert send.attributes["http.response.status_code"] == 200
    assert send.attributes["messaging.destination.name"] == settings.queue_url("email").rsplit("/", 1)[-1]


async def test_a_request_with_a_traceparent_continues_the_callers_trace(settings, tenant, spans):
    headers = {"x-api-key": tenant.api_key, "traceparent": f"00-{INCOMING_TRACE_ID}-{INCOMING_PARENT_ID}-01"}
    async with api_client(settings) as (client, _):
        response = await client.post("/initiate-conversation", json=initiate_body("sms"), headers=headers)
        assert response.status == 200

    server = named(spans.get_finished_spans(), "POST /initiate-conversation")
    assert trace_id(server) == INCOMING_TRACE_ID
    assert parent_id(server) == int(INCOMING_PARENT_ID, 16)


async def test_a_refused_request_is_a_server_span_with_its_status(settings, spans):
    async with api_client(settings) as (client, _):
        response = await client.post("/initiate-conversation", json=initiate_body("sms"))
        assert response.status == 401

    server = named(spans.get_finished_spans(), "POST /initiate-conversation")
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 401
    assert server.status.status_code is StatusCode.UNSET  # a caller's mistake is not the server's error


async def test_probes_make_no_spans(settings, spans):
    async with api_client(settings) as (client, _):
        assert (await client.get("/healthz")).status == 200

    assert spans.get_finished_spans() == ()


async def test_a_failed_aws_call_is_an_error_span_naming_its_code(settings, spans):
    tracer = tracing.active_tracer()
    assert tracer is not None
    async with api_client(settings) as (_, deps):
        with (
            tracer.start_as_current_span("operation"),
            pytest.raises(deps.aws.dynamodb.exceptions.ResourceNotFoundException),
        ):
            await deps.aws.dynamodb.get_item(TableName="no-such-table", Key={"pk": {"S": "x"}})

    call = named(spans.get_finished_spans(), "DynamoDB.GetItem")
    assert call.status.status_code is StatusCode.ERROR
    assert call.attributes is not None
    assert call.attributes["error.type"] == "ResourceNotFoundException"
    assert call.attributes["http.response.status_code"] == 400


async def test_an_aws_call_cancelled_mid_flight_ends_its_span_as_cancelled(settings, spans):
    tracer = tracing.active_tracer()
    assert tracer is not None
    moto_port = int(settings.aws_endpoint_url.rsplit(":", 1)[1])
    async with (
        FaultProxy("127.0.0.1", moto_port) as proxy,
        api_client(settings, aws_endpoint_url=proxy.url) as (
            _,
            deps,
        ),
    ):
        proxy.stall()
        with tracer.start_as_current_span("operation"):
            call = asyncio.create_task(
                deps.aws.dynamodb.get_item(TableName=settings.company_table, Key={"company_id": {"S": "x"}})
            )
            await eventually(lambda: proxy.connections > 0, timeout_s=10, what="the call reached the proxy")
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call

    cancelled = named(spans.get_finished_spans(), "DynamoDB.GetItem")
    assert cancelled.status.status_code is StatusCode.ERROR
    assert cancelled.attributes is not None
    assert cancelled.attributes["error.type"] == "cancelled"


async def test_aws_calls_outside_any_traced_work_make_no_spans(settings, spans):
    async with api_client(settings) as (_, deps):
        await deps.aws.sqs.get_queue_attributes(QueueUrl=settings.queue_url("sms"), AttributeNames=["QueueArn"])

    assert spans.get_finished_spans() == ()


# -- the consumer -----------------------------------------------------------------------------------------------


async def _traced_conversation(
    env: E2EEnv, deps, spans: InMemorySpanExporter, channel: str
) -> tuple[list[ReadableSpan], dict[str, Any], Tenant]:
    """Initiate one conversation on `channel`, let the consumer send it; the spans of its trace, the body sent
    and the tenant that sent it."""
    tenant = await new_tenant(deps)
    body = tenant.request(channel)
    async with in_process_service(env.settings) as service:
        conversation_id = await service.initiate(tenant, body)
        await env.record_with_status(recipient_of(body), conversation_id, "initial_message_sent", timeout_s=15)

        def consumed() -> list[ReadableSpan]:
            return [s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER]

        await eventually(consumed, timeout_s=5, what="the consumer span ended")
    server = named(spans.get_finished_spans(), "POST /initiate-conversation")
    return in_trace(spans.get_finished_spans(), trace_id(server)), body, tenant


async def test_the_consumer_continues_the_request_trace_with_a_span_per_step(env, deps, spans):
    found, _, _ = await _traced_conversation(env, deps, spans, "whatsapp")

    [producer] = [s for s in found if s.kind is SpanKind.PRODUCER]
    [consumer] = [s for s in found if s.kind is SpanKind.CONSUMER]
    assert consumer.name == "process whatsapp"
    assert parent_id(consumer) == span_id(producer)
    assert consumer.attributes is not None
    assert consumer.attributes["messaging.destination.name"] == "whatsapp"
    assert consumer.attributes["comms.receive_count"] == 1
    assert consumer.attributes["comms.outcome"] == "done"
    assert consumer.attributes["messaging.message.id"]
    steps = {s.name for s in found if parent_id(s) == span_id(consumer) and s.kind is SpanKind.INTERNAL}
    assert steps >= STEPS


async def test_provider_and_aws_calls_of_the_consumer_are_client_spans_under_their_steps(env, deps, spans):
    found, _, _ = await _traced_conversation(env, deps, spans, "whatsapp")

    steps: dict[str, set[int]] = {}
    for s in found:
        if s.kind is SpanKind.INTERNAL:
            steps.setdefault(s.name, set()).add(span_id(s))
    clients = [s for s in found if s.kind is SpanKind.CLIENT]
    openai = [s for s in clients if s.attributes and s.attributes.get("peer.service") == "openai"]
    assert openai
    assert {parent_id(s) for s in openai} == steps["ai"]
    twilio = named(clients, "twilio.messages.create")
    assert {parent_id(twilio)} == steps["send"]
    assert twilio.attributes is not None
    assert twilio.attributes["twilio.status"] == "queued"
    secrets = [s for s in clients if s.name == "Secrets Manager.GetSecretValue"]  # the OpenAI and Twilio secrets
    assert len(secrets) == 2
    assert {parent_id(s) for s in secrets} == steps["secrets"]
    updates = [s for s in clients if s.name == "DynamoDB.UpdateItem"]
    assert steps["final_update"] <= {parent_id(s) for s in updates}


async def test_an_email_send_is_a_sendgrid_client_span(env, deps, spans):
    found, _, _ = await _traced_conversation(env, deps, spans, "email")

    [send] = [s for s in found if s.kind is SpanKind.INTERNAL and s.name == "send"]
    [sendgrid] = [s for s in found if s.attributes and s.attributes.get("peer.service") == "sendgrid"]
    assert sendgrid.kind is SpanKind.CLIENT
    assert parent_id(sendgrid) == span_id(send)
    assert sendgrid.attributes is not None
    assert sendgrid.attributes["http.response.status_code"] == 202


async def test_spans_carry_no_secret_and_no_phone_number(env, deps, spans):
    found, body, tenant = await _traced_conversation(env, deps, spans, "sms")

    recipient = recipient_of(body)
    sender = "447700900002"  # the company's SMS number, part of the conversation id
    forbidden = {recipient, recipient.lstrip("+"), sender, DEMO_TWILIO_AUTH_TOKEN, DEMO_OPENAI_KEY, tenant.api_key}
    texts = [s.name for s in found] + [s.status.description or "" for s in found]
    texts += [str(value) for s in found for value in (s.attributes or {}).values()]
    assert len(found) > 10
    assert [text for text in texts if any(secret in text for secret in forbidden)] == []


async def test_an_inbound_webhooks_trace_reaches_the_reply_consumer_through_the_trigger(settings, deps, tenant, spans):
    async with replies_world(settings, deps, consumers=True, window_s=0) as world:
        tel = unique_reply_tel()
        key = await world.seed_conversation(tel)
        assert (await world.inbound(tel, "Is the viewing still on?"))[0] == 200
        await world.wait_for_status(key, "reply_sent", timeout_s=15)

        def consumed() -> list[ReadableSpan]:
            return [s for s in spans.get_finished_spans() if s.name == "process replies"]

        [consumer] = await eventually(consumed, timeout_s=5, what="the reply consumer span ended")

    webhook = named(spans.get_finished_spans(), "POST /webhooks/twilio/{channel}")
    assert webhook.kind is SpanKind.SERVER
    assert trace_id(consumer) == trace_id(webhook)
    steps = {s.name for s in spans.get_finished_spans() if parent_id(s) == span_id(consumer)}
    assert {"claim", "gather", "ai", "send", "final_update"} <= steps


# -- off, and the OTLP export the environment configures -------------------------------------------------------

OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
)


@pytest.fixture
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


async def test_without_otel_variables_nothing_is_installed(no_otel_environment):
    traces = tracing.start_from_environment(role="all")

    assert not traces.active
    assert tracing.active_tracer() is None
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def test_without_otel_variables_the_sdk_is_never_imported():
    script = (
        "import sys; from service import tracing; traces = tracing.start_from_environment(role='all');"
        "assert not traces.active; assert not [m for m in sys.modules if m.startswith('opentelemetry.sdk')]"
    )
    environment = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


async def test_untraced_messages_carry_no_trace_context(api, deps, tenant):
    assert tracing.active_tracer() is None
    body = initiate_body("sms")
    response = await api.post("/initiate-conversation", json=body, headers={"x-api-key": tenant.api_key})
    conversation_id = (await response.json())["conversation_id"]
    [message] = await queued_messages(deps, deps.settings.queue_url("sms"), conversation_id)

    assert not set(message["attributes"]) & set(tracing.TRACE_ATTRIBUTES)


class OtlpReceiver:
    """A collector's OTLP/HTTP traces route on a loopback port: keeps each request body and content type; while
    `hung`, it answers nothing until released (a collector that does not answer)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes]] = []
        self.arrived = asyncio.Event()
        self.hung = False
        self.release = asyncio.Event()

    async def traces(self, request: web.Request) -> web.Response:
        self.requests.append((request.content_type, await request.read()))
        self.arrived.set()
        if self.hung:
            await self.release.wait()
        return web.Response(status=200, body=b"", content_type="application/x-protobuf")

    def span_names(self) -> set[str]:
        names: set[str] = set()
        for _, body in self.requests:
            export = ExportTraceServiceRequest.FromString(body)
            names |= {s.name for r in export.resource_spans for scope in r.scope_spans for s in scope.spans}
        return names

    def service_names(self) -> set[str]:
        found: set[str] = set()
        for _, body in self.requests:
            for resource_spans in ExportTraceServiceRequest.FromString(body).resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                found.add(attributes.get("service.name", ""))
        return found


@pytest.fixture
async def receiver(monkeypatch: pytest.MonkeyPatch, no_otel_environment) -> AsyncIterator[OtlpReceiver]:
    """The receiver, and the environment pointing the exporter at it (batches held back until a flush)."""
    collector = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.traces)
    server = await serve(app)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "comms-under-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # only a flush sends anything
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")  # an export left behind gives up soon after the test
    try:
        yield collector
    finally:
        collector.release.set()
        await server.close()


async def test_the_exporter_posts_otlp_protobuf_to_the_endpoint_the_environment_names(receiver):
    traces = tracing.start_from_environment(role="worker", set_global=False)
    tracer = tracing.active_tracer()
    assert traces.active and tracer is not None
    with tracer.start_as_current_span("exported"):
        pass

    assert await traces.shutdown()
    [(content_type, _)] = receiver.requests
    assert content_type == "application/x-protobuf"
    assert receiver.span_names() == {"exported"}
    assert receiver.service_names() == {"comms-under-test"}
    assert tracing.active_tracer() is None


async def test_the_sampler_is_the_one_the_environment_names(receiver, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    traces = tracing.start_from_environment(role="api", set_global=False)
    tracer = tracing.active_tracer()
    assert tracer is not None
    with tracer.start_as_current_span("sampled-out") as span:
        recording = span.is_recording()

    assert await traces.shutdown()
    assert recording is False
    assert receiver.requests == []


async def test_a_collector_that_does_not_answer_never_holds_the_stop_beyond_its_bound(receiver):
    receiver.hung = True
    traces = tracing.start_from_environment(role="worker", set_global=False)
    tracer = tracing.active_tracer()
    assert tracer is not None
    with tracer.start_as_current_span("stuck"):
        pass

    flushed = await traces.shutdown(timeout_s=0.5)

    assert flushed is False
    await asyncio.wait_for(receiver.arrived.wait(), 10)  # the export was under way, and was left behind
    assert tracing.active_tracer() is None


async def test_the_service_flushes_its_spans_when_it_stops(receiver, settings: Settings, monkeypatch):
    monkeypatch.setattr(runner, "start_tracing", functools.partial(runner.start_tracing, set_global=False))
    port = free_port()
    local = settings.model_copy(
        update={"host": "127.0.0.1", "port": port, "metrics_port": free_port(), "public_base_url": "http://x.test"}
    )
    stop, ready = asyncio.Event(), asyncio.Event()
    service = asyncio.create_task(run_service(local, "api", stop=stop, on_ready=lambda _: ready.set()))
    try:
        await asyncio.wait({service, asyncio.ensure_future(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        assert ready.is_set(), service.result()
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/openapi.json") as answer:
            assert answer.status == 200
        assert receiver.requests == []  # held in the batch until the stop
    finally:
        stop.set()
        await service

    assert "GET /openapi.json" in receiver.span_names()
    assert tracing.active_tracer() is None
