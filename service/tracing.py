"""OpenTelemetry tracing: configured only by the standard `OTEL_*` environment variables, and free when off.

Off (the default: no OTLP endpoint and no `OTEL_TRACES_EXPORTER`, or `OTEL_SDK_DISABLED=true`, or
`OTEL_TRACES_EXPORTER=none`), nothing is installed: the SDK is not even imported, the global tracer provider stays
the API's proxy, and every call site below checks one module attribute (`active_tracer()` is None) and takes its
untraced path. No middleware, botocore handler, transport wrapper or trace config is registered, and queued messages
carry no trace attributes.

On, one SDK `TracerProvider` (sampler from `OTEL_TRACES_SAMPLER[_ARG]`, resource from `OTEL_SERVICE_NAME` /
`OTEL_RESOURCE_ATTRIBUTES`) exports OTLP over HTTP/protobuf through a `BatchSpanProcessor` (`OTEL_BSP_*`); the
exporter reads its endpoint, headers, timeout and compression from `OTEL_EXPORTER_OTLP_[TRACES_]*` itself.
`Tracing.shutdown()` flushes it within a bound at service stop.

The spans: SERVER per HTTP request (`service.api.middleware.trace_requests`), PRODUCER per queued message with
its context in the `traceparent`/`tracestate` message attributes, CONSUMER per received message continuing that
context, an INTERNAL child per consumer step, and CLIENT spans for AWS (around each call of each client, a
cancelled call included), OpenAI (an httpx2 transport), Twilio (around the SDK call) and SendGrid (an aiohttp trace
config). Client spans are made only under a recording span, so background calls (long polls, heartbeats, batched
deletes) start no trace.

Attributes follow the logging rule (`service.logging`): values under secret-looking keys are dropped and phone
numbers and emails are masked; exceptions are recorded by type only (their text may quote a recipient).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import httpx2
import structlog
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service import __version__
from service.aws_failures import error_code
from service.config import TRACE_FLUSH_S, ConfigurationError
from service.logging import is_secret_key, mask_text

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider

__all__ = [
    "TRACE_ATTRIBUTES",
    "Tracing",
    "active_tracer",
    "install",
    "start_from_environment",
    "tracing_wanted",
    "uninstall",
]

log = structlog.get_logger(__name__)

SERVICE_NAME = "ai-multi-comms-engine"
SCOPE = "service"  # the instrumentation scope every span of ours is made under
MAX_MESSAGE_ATTRIBUTES = 10  # SQS: at most ten message attributes per message
TRACE_ATTRIBUTES = ("traceparent", "tracestate")
HTTP_PROTOBUF = "http/protobuf"
_TRACE_CONTEXT = TraceContextTextMapPropagator()  # SQS carries W3C trace context whatever OTEL_PROPAGATORS says
_ID_SEGMENT = re.compile(r"^[A-Za-z]+_[A-Za-z0-9]+$")  # resp_..., conv_...: an id in an OpenAI path


class _State:
    __slots__ = ("tracer",)

    def __init__(self) -> None:
        self.tracer: Tracer | None = None


_STATE = _State()


def active_tracer() -> Tracer | None:
    """The tracer every span of ours is made with; None when tracing is off (the call sites then do nothing)."""
    return _STATE.tracer


def install(provider: TracerProvider) -> None:
    """Make spans with `provider` from now on (the seam tests use, with an in-memory exporter). The OpenTelemetry
    global is not touched; `start_from_environment` sets it too. Clients built before are not instrumented."""
    _STATE.tracer = provider.get_tracer(SCOPE, __version__)


def uninstall() -> None:
    _STATE.tracer = None


# ---- configuration ----------------------------------------------------------------------------------------------


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def tracing_wanted(environ: Mapping[str, str]) -> bool:
    """Whether the `OTEL_*` variables ask for traces: `OTEL_TRACES_EXPORTER=otlp`, or an OTLP (traces) endpoint
    with no exporter named; never with `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. Raises
    `ConfigurationError` for what this service cannot export (another exporter, an OTLP protocol but
    http/protobuf), so a misconfigured process fails at start-up instead of dropping every span."""
    if _flag(environ.get("OTEL_SDK_DISABLED")):
        return False
    exporters = {name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()}
    unknown = exporters - {"otlp", "none"}
    if unknown:
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER={','.join(sorted(unknown))} is not supported: use otlp (OTLP over http/protobuf)"
            " or none"
        )
    if exporters:
        wanted = "otlp" in exporters
    else:
        wanted = bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if wanted:
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if protocol and protocol.strip().lower() != HTTP_PROTOBUF:
            raise ConfigurationError(
                f"OTLP protocol {protocol.strip()!r} is not supported: this service exports {HTTP_PROTOBUF} only"
                " (unset OTEL_EXPORTER_OTLP_PROTOCOL or point it at the collector's HTTP port, 4318)"
            )
    return wanted


class Tracing:
    """The process' tracing: a provider to flush and shut down at stop, or nothing (off)."""

    def __init__(self, provider: SdkTracerProvider | None = None) -> None:
        self._provider = provider

    @property
    def active(self) -> bool:
        return self._provider is not None

    async def shutdown(self, timeout_s: float = TRACE_FLUSH_S) -> bool:
        """Stop making spans, then export what is buffered, for at most `timeout_s`; False when that ran out
        (a collector that does not answer never holds the stop longer). Idempotent."""
        provider, self._provider = self._provider, None
        if provider is None:
            return True
        uninstall()
        finished = threading.Event()

        def shut_down() -> None:
            try:
                provider.shutdown()
            finally:
                finished.set()

        # A daemon thread, not the loop's executor: at exit asyncio joins executor threads, however long they take.
        threading.Thread(target=shut_down, name="otel-shutdown", daemon=True).start()
        flushed = await asyncio.to_thread(finished.wait, timeout_s)
        if not flushed:
            log.warning("tracing_flush_timed_out", timeout_s=timeout_s)
        return flushed


def start_from_environment(*, role: str | None = None, set_global: bool = True) -> Tracing:
    """Tracing as the `OTEL_*` environment variables say (`tracing_wanted`); off, nothing is imported or installed.
    On, the SDK provider becomes the OpenTelemetry global too (unless `set_global` is False: tests)."""
    if not tracing_wanted(os.environ):
        return Tracing()
    # The SDK and the exporter are imported only when tracing is on: an untraced process never loads them.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    resource = Resource({"service.version": __version__}).merge(Resource.create())
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    if role:
        resource = Resource({"comms.role": role}).merge(resource)
    provider = SdkTracerProvider(resource=resource, shutdown_on_exit=False)  # the sampler comes from OTEL_TRACES_*
    exporter = OTLPSpanExporter()  # endpoint, headers, timeout, compression: OTEL_EXPORTER_OTLP_[TRACES_]*
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if set_global:
        trace.set_tracer_provider(provider)
    install(provider)
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    collector = urlsplit(endpoint or "http://localhost:4318").hostname  # never the URL: it may hold credentials
    log.info("tracing_started", exporter="otlp", protocol=HTTP_PROTOBUF, collector=collector, role=role)
    return Tracing(provider)


# ---- attributes and outcomes ------------------------------------------------------------------------------------

AttributeValue = str | bool | int | float


# The rule's regexes cost more than a span: keys are a small fixed set (cached), and a value is masked only when
# it could hold a phone number (8 digits in a row) or an email (an @).
_secret_key = functools.lru_cache(maxsize=512)(is_secret_key)
_MAYBE_PERSONAL = re.compile(r"\d{8}|@")


def safe_attributes(attributes: Mapping[str, AttributeValue | None]) -> dict[str, AttributeValue]:
    """The logging rule on span attributes: secret-looking keys dropped, phone numbers and emails masked, Nones
    left out."""
    safe: dict[str, AttributeValue] = {}
    for key, value in attributes.items():
        if value is None or _secret_key(key):
            continue
        safe[key] = mask_text(value) if isinstance(value, str) and _MAYBE_PERSONAL.search(value) else value
    return safe


def set_attributes(span: Span | None, **attributes: AttributeValue | None) -> None:
    """Set attributes (dots spelled `__` in keywords: `http__status` -> `http.status`) under the logging rule."""
    if span is None or not span.is_recording():
        return
    span.set_attributes(safe_attributes({key.replace("__", "."): value for key, value in attributes.items()}))


def mark_failed(span: Span | None, kind: str) -> None:
    """ERROR status naming only the kind of failure (an exception's text may quote a recipient)."""
    if span is None or not span.is_recording():
        return
    kind = mask_text(kind)
    span.set_attribute("error.type", kind)
    span.set_status(StatusCode.ERROR, kind)


def error_type(exc: BaseException) -> str:
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else type(exc).__qualname__


@contextmanager
def _span(
    tracer: Tracer,
    name: str,
    kind: SpanKind,
    attributes: Mapping[str, AttributeValue | None],
    context: Context | None = None,
) -> Iterator[Span]:
    """A current span that records an escaping exception by type only, then re-raises it."""
    with tracer.start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=safe_attributes(attributes),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            mark_failed(span, error_type(exc))
            raise


def _under_recording_span() -> bool:
    return trace.get_current_span().is_recording()


def bind_log_correlation(span: Span) -> None:
    """Put the span's trace id on this task's log lines, so a log line leads to its trace."""
    span_context = span.get_span_context()
    if span_context.is_valid:
        structlog.contextvars.bind_contextvars(otel_trace_id=trace.format_trace_id(span_context.trace_id))


# ---- HTTP server ------------------------------------------------------------------------------------------------


def server_span(
    tracer: Tracer, method: str, route: str | None, headers: Mapping[str, str]
) -> AbstractContextManager[Span]:
    """The SERVER span of one request, continuing the caller's trace context (`traceparent`) when it sends one."""
    attributes: dict[str, AttributeValue | None] = {"http.request.method": method, "http.route": route}
    name = f"{method} {route}" if route else method
    return _span(tracer, name, SpanKind.SERVER, attributes, propagate.extract(headers))


def record_http_status(span: Span, status: int, *, client: bool = False) -> None:
    """The status on the span; an error from 500 up, and for a client from 400 up (semantic conventions)."""
    span.set_attribute("http.response.status_code", status)
    if status >= (400 if client else 500):
        mark_failed(span, str(status))


# ---- SQS: producer and consumer ---------------------------------------------------------------------------------


def queue_name(queue_url: str) -> str:
    return queue_url.rstrip("/").rsplit("/", 1)[-1]


def producer_span(tracer: Tracer, queue_url: str) -> AbstractContextManager[Span]:
    name = queue_name(queue_url)
    attributes: dict[str, AttributeValue | None] = {
        "messaging.system": "aws_sqs",
        "messaging.operation.type": "send",
        "messaging.destination.name": name,
    }
    return _span(tracer, f"send {name}", SpanKind.PRODUCER, attributes)


def with_trace_context(attributes: Mapping[str, str]) -> dict[str, str]:
    """`attributes` plus the current span's W3C trace context (`traceparent`, and `tracestate` when there is one),
    as far as SQS's ten message attributes leave room: a full message goes untraced rather than refused."""
    carrier: dict[str, str] = {}
    _TRACE_CONTEXT.inject(carrier)
    combined = dict(attributes)
    for name in TRACE_ATTRIBUTES:
        if name in carrier and (name in combined or len(combined) < MAX_MESSAGE_ATTRIBUTES):
            combined[name] = carrier[name]
    return combined


@contextmanager
def consumer_span(
    tracer: Tracer, queue: str, message_id: str, receive_count: int, attributes: Mapping[str, str]
) -> Iterator[Span]:
    """The CONSUMER span of one message, in the trace its `traceparent` attribute names (a new one without)."""
    span_attributes: dict[str, AttributeValue | None] = {
        "messaging.system": "aws_sqs",
        "messaging.operation.type": "process",
        "messaging.destination.name": queue,
        "messaging.message.id": message_id,
        "comms.receive_count": receive_count,
    }
    parent = _TRACE_CONTEXT.extract(attributes) if "traceparent" in attributes else None
    with _span(tracer, f"process {queue}", SpanKind.CONSUMER, span_attributes, parent) as span:
        bind_log_correlation(span)
        yield span


def record_outcome(span: Span, disposition: str, reason: str) -> None:
    """The message's outcome on its span; a dead letter is an error (a retry may still succeed)."""
    set_attributes(span, comms__outcome=str(disposition), comms__reason=reason)  # a plain str, not the StrEnum
    if disposition == "dead_letter":
        mark_failed(span, reason)


def step_span(tracer: Tracer, step: str) -> AbstractContextManager[Span]:
    """A consumer step: its name says everything (its parent names the queue and message); no attributes to
    make or encode."""
    return _span(tracer, step, SpanKind.INTERNAL, {})


# ---- clients: AWS (botocore events), OpenAI (httpx2), SendGrid (aiohttp), Twilio (around the SDK call) -------

# The span of the AWS call in progress in this task: the wrapper around the call sets it, botocore's `after-call`
# event (same task) adds what only the answer tells.
_AWS_CALL_SPAN: ContextVar[Span | None] = ContextVar("comms_aws_call_span", default=None)


class _AwsCallTracer:
    """A CLIENT span around each call of one aiobotocore client: started before the call is validated and
    serialised, ended when the call returns, fails or is cancelled (a cancelled call is an error span typed
    `cancelled`, never a span left open)."""

    def __init__(self, tracer: Tracer, region: str | None, service: str) -> None:
        self._tracer = tracer
        self._region = region
        self._service = service

    def start(self, operation: str, params: Mapping[str, Any]) -> Span | None:
        if _STATE.tracer is not self._tracer or not _under_recording_span():
            return None
        attributes: dict[str, AttributeValue | None] = {
            "rpc.system": "aws-api",
            "rpc.service": self._service,
            "rpc.method": operation,
            "cloud.region": self._region,
        }
        if isinstance(params.get("TableName"), str):
            attributes["aws.dynamodb.table_names"] = params["TableName"]
        if isinstance(params.get("QueueUrl"), str):
            attributes["messaging.destination.name"] = queue_name(params["QueueUrl"])
        return self._tracer.start_span(
            f"{self._service}.{operation}", kind=SpanKind.CLIENT, attributes=safe_attributes(attributes)
        )

    @staticmethod
    def after_call(http_response: Any, parsed: Mapping[str, Any], **_: Any) -> None:
        span = _AWS_CALL_SPAN.get()
        if span is None:
            return
        metadata = parsed.get("ResponseMetadata", {})
        status = int(getattr(http_response, "status_code", 0) or 0)
        set_attributes(
            span,
            http__response__status_code=status,
            aws__request_id=metadata.get("RequestId"),
            comms__retry_attempts=metadata.get("RetryAttempts") or None,  # only when botocore retried
        )
        if status >= 300:
            mark_failed(span, str(parsed.get("Error", {}).get("Code") or status))


def trace_aws_client(client: Any) -> None:
    """CLIENT spans for every call of an aiobotocore client: its `_make_api_call` (the coroutine every operation
    method awaits) is wrapped on this client object only, so no other client is touched."""
    tracer = _STATE.tracer
    if tracer is None:
        return
    calls = _AwsCallTracer(tracer, client.meta.region_name, str(client.meta.service_model.service_id))
    make_api_call = client._make_api_call

    async def traced_api_call(operation_name: str, api_params: Mapping[str, Any]) -> Any:
        span = calls.start(operation_name, api_params)
        if span is None:
            return await make_api_call(operation_name, api_params)
        token = _AWS_CALL_SPAN.set(span)
        try:
            return await make_api_call(operation_name, api_params)
        except BaseException as exc:  # cancellation included: the span ends either way
            if span.is_recording() and not _has_error(span):
                mark_failed(span, _aws_error_type(exc))
            raise
        finally:
            _AWS_CALL_SPAN.reset(token)
            span.end()

    client._make_api_call = traced_api_call
    client.meta.events.register("after-call", calls.after_call, unique_id="comms-trace-answer")


def _has_error(span: Span) -> bool:
    status = getattr(span, "status", None)
    return status is not None and status.status_code is StatusCode.ERROR


def _aws_error_type(exc: BaseException) -> str:
    """The AWS error code of a refused call (what `after-call` named), else the exception's type."""
    return error_code(exc) or error_type(exc)


def _path_template(path: str) -> str:
    return "/".join("{id}" if _ID_SEGMENT.match(segment) else segment for segment in path.split("/"))


class TracingTransport(httpx2.AsyncBaseTransport):
    """A CLIENT span around each HTTP attempt of `inner` (an OpenAI SDK retry is an attempt of its own). Nothing
    is added to the request: the provider is not sent our trace context."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, peer: str) -> None:
        self._inner = inner
        self._peer = peer

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        tracer = _STATE.tracer
        if tracer is None or not _under_recording_span():
            return await self._inner.handle_async_request(request)
        path = _path_template(request.url.path)
        attributes: dict[str, AttributeValue | None] = {
            "peer.service": self._peer,
            "http.request.method": request.method,
            "server.address": request.url.host,
            "url.template": path,
        }
        with _span(tracer, f"{request.method} {path}", SpanKind.CLIENT, attributes) as span:
            response = await self._inner.handle_async_request(request)
            record_http_status(span, response.status_code, client=True)
            return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def traced_transport(inner: httpx2.AsyncBaseTransport, peer: str) -> httpx2.AsyncBaseTransport:
    """`inner` wrapped in a `TracingTransport` when tracing is on, else `inner` itself."""
    return inner if _STATE.tracer is None else TracingTransport(inner, peer)


def aiohttp_trace_configs(peer: str) -> list[aiohttp.TraceConfig]:
    """An aiohttp trace config making a CLIENT span per request of a session (none when tracing is off)."""
    tracer = _STATE.tracer
    if tracer is None:
        return []

    async def on_start(_: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams) -> None:
        if not _under_recording_span():
            return
        attributes: dict[str, AttributeValue | None] = {
            "peer.service": peer,
            "http.request.method": params.method,
            "server.address": params.url.host,
            "url.template": params.url.path,
        }
        ctx.span = tracer.start_span(
            f"{params.method} {params.url.path}", kind=SpanKind.CLIENT, attributes=safe_attributes(attributes)
        )

    async def on_end(_: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams) -> None:
        span: Span | None = getattr(ctx, "span", None)
        if span is not None:
            record_http_status(span, params.response.status, client=True)
            span.end()

    async def on_error(
        _: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestExceptionParams
    ) -> None:
        span: Span | None = getattr(ctx, "span", None)
        if span is not None:
            mark_failed(span, error_type(params.exception))
            span.end()

    config = aiohttp.TraceConfig()
    config.on_request_start.append(on_start)
    config.on_request_end.append(on_end)
    config.on_request_exception.append(on_error)
    return [config]


@contextmanager
def client_span(peer: str, operation: str, **attributes: AttributeValue | None) -> Iterator[Span | None]:
    """A CLIENT span around one SDK call (None when tracing is off or nothing traced is running)."""
    tracer = _STATE.tracer
    if tracer is None or not _under_recording_span():
        yield None
        return
    fields: dict[str, AttributeValue | None] = {"peer.service": peer, "rpc.method": operation}
    fields.update({key.replace("__", "."): value for key, value in attributes.items()})
    with _span(tracer, f"{peer}.{operation}", SpanKind.CLIENT, fields) as span:
        yield span
