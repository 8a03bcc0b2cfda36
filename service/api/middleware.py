"""Cross-cutting HTTP behaviour: request context, tracing, CORS on every response, errors as JSON, metrics.

Handlers raise `ApiError` (or let a dependency failure escape); `errors_as_json`
is the one place that turns any exception into the SPEC §2 error body.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from service import tracing
from service.api.responses import cors_headers, error_response, http_error_response
from service.api.state import DEPS, PAYLOAD_REQUEST_ID, REQUEST_ID, TRACE_ID
from service.domain.errors import ApiError, DependencyUnavailable, ErrorCode, InvalidStoredRecord

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = structlog.get_logger("service.api")
# What a caller is told to wait after a deadline or a dependency failure.
RETRY_AFTER_S = 5


def _trace_id(request: web.Request) -> str:
    """The caller's trace id when it is a plain one (printable ASCII, at most 200 characters), else a fresh one: it
    goes into every log line and the queued message, and a header's bytes need not even be UTF-8."""
    for header in ("X-Amzn-Trace-Id", "traceparent", "X-Request-Id"):
        value = request.headers.get(header)
        if value and len(value) <= 200 and value.isascii() and value.isprintable():
            return value
    return uuid.uuid4().hex


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bind request and trace ids to every log line of this request; log one line when it ends."""
    request_id = str(uuid.uuid4())
    trace_id = _trace_id(request)
    request[REQUEST_ID] = request_id
    request[TRACE_ID] = trace_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id, trace_id=trace_id)
    started = time.perf_counter()
    metrics = request.app[DEPS].api_metrics
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers["X-Request-Id"] = request_id
        return response
    finally:
        elapsed = time.perf_counter() - started
        metrics.requests.labels(route=route, status=str(status)).inc()
        metrics.latency.labels(route=route).observe(elapsed)
        if route not in ("/healthz", "/readyz", "/metrics"):
            log.info("http_request", method=request.method, route=route, status=status, ms=round(elapsed * 1000, 1))
        structlog.contextvars.clear_contextvars()


# Probes and scrapes make no spans (as they make no log lines).
UNTRACED_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


@web.middleware
async def trace_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A SERVER span per request (registered only while tracing is on), continuing an incoming `traceparent`.
    Inside `request_context` (which clears the log context) and outside `errors_as_json`, so the status is the
    one the caller gets."""
    tracer = tracing.active_tracer()
    resource = request.match_info.route.resource
    route = resource.canonical if resource else None
    if tracer is None or route in UNTRACED_ROUTES:
        return await handler(request)
    with tracing.server_span(tracer, request.method, route, request.headers) as span:
        tracing.set_attributes(span, comms__request_id=request.get(REQUEST_ID))
        tracing.bind_log_correlation(span)
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # a redirect errors_as_json lets through
            tracing.record_http_status(span, exc.status)
            raise
        tracing.record_http_status(span, response.status)
        return response


def _error_request_id(request: web.Request) -> str:
    return request.get(PAYLOAD_REQUEST_ID) or request.get(REQUEST_ID) or str(uuid.uuid4())


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "OPTIONS":
        return web.Response(status=200)
    try:
        return await handler(request)
    except ApiError as exc:
        code, message, retry = exc.code, exc.message, exc.retry_after_s
    except DependencyUnavailable as exc:
        code = ErrorCode.QUEUE_ERROR if exc.service == "sqs" else ErrorCode.DATABASE_ERROR
        message, retry = f"{exc.service} is unavailable; retry later", RETRY_AFTER_S
        log.warning("dependency_unavailable", service=exc.service, operation=exc.operation, detail=exc.detail)
    except InvalidStoredRecord as exc:
        code, message, retry = ErrorCode.CONFIGURATION_ERROR, "the project's stored configuration is invalid", None
        log.error("invalid_stored_record", detail=str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # 405 keeps its Allow header; nothing else of aiohttp's answer (its text may echo the request).
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return http_error_response(exc.status, _error_request_id(request), allow)
    except Exception:
        log.exception("unhandled_error")
        code, message, retry = ErrorCode.INTERNAL_ERROR, "internal error", None
    request.app[DEPS].api_metrics.errors.labels(error_code=code.value).inc()
    return error_response(code, message, _error_request_id(request), retry_after_s=retry)


def _has_deadline(request: web.Request) -> bool:
    """The caller-facing paths that touch AWS. Not /healthz, /metrics; /readyz bounds its own probe."""
    resource = request.match_info.route.resource
    path = resource.canonical if resource else ""
    return path == "/initiate-conversation" or path.startswith("/webhooks/twilio/")


@web.middleware
async def request_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer 503 SERVICE_UNAVAILABLE (with Retry-After) when the request outlives its deadline.

    The AWS clients' own timeouts suit the consumers' long polls, not a caller waiting (Twilio gives up
    after 15 s): the handler is cancelled at the deadline. The use cases shield what must not stop half
    way (the SQS send of an initiate, inbound work after verification) and release a cut request claim.
    """
    if not _has_deadline(request):
        return await handler(request)
    deadline_s = request.app[DEPS].settings.request_deadline_s
    timer = asyncio.timeout(deadline_s)
    try:
        async with timer:
            return await handler(request)
    except TimeoutError as exc:
        if not timer.expired():
            raise  # a timeout of the handler's own, not the deadline
        log.warning("request_deadline_exceeded", deadline_s=deadline_s)
        raise ApiError(
            ErrorCode.SERVICE_UNAVAILABLE,
            "the request could not be completed in time; retry later",
            retry_after_s=RETRY_AFTER_S,
        ) from exc


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: the same CORS headers on every response, errors included."""
    response.headers.update(cors_headers(request.app[DEPS].settings.cors_allow_origin))
