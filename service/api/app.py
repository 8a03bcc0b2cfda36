"""The aiohttp application (routes, middlewares and hooks over already-wired dependencies) and the
runner that serves it, whose HTTP protocol answers even unparseable requests with the SPEC §2 body."""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_urldispatcher import _default_expect_handler

from service import __version__, tracing
from service.api.health import healthz, metrics, readyz
from service.api.initiate_handler import initiate_conversation
from service.api.middleware import (
    add_cors_headers,
    errors_as_json,
    request_context,
    request_deadline,
    trace_requests,
)
from service.api.openapi import openapi_document
from service.api.responses import cors_headers, http_error_response, json_response
from service.api.state import DEPS
from service.api.webhooks import twilio_inbound, twilio_status
from service.bootstrap import Dependencies
from service.config import HTTP_SHUTDOWN_S

log = structlog.get_logger("service.api")


async def continue_only(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` answered as aiohttp does; any other expectation is 417 with the SPEC §2 body (aiohttp's
    own 417 is plain text quoting the header, and it is sent before any middleware runs)."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        await _default_expect_handler(request)
        return None
    return http_error_response(417, str(uuid.uuid4()))


def create_app(deps: Dependencies) -> web.Application:
    """The public app: API, webhooks (unless disabled), health and OpenAPI. `/metrics` is not here: it has its
    own listener (`create_metrics_app`, on `metrics_port`), so the ingress never exposes it."""
    # client_max_size is a backstop; the initiate handler enforces the 64 KiB contract itself. Tracing's
    # middleware is there only while tracing is on (when the app is created), so an untraced request never pays it.
    traced = [trace_requests] if tracing.active_tracer() is not None else []
    app = web.Application(
        middlewares=[request_context, *traced, errors_as_json, request_deadline],
        client_max_size=deps.settings.max_body_bytes * 4,
    )
    app[DEPS] = deps
    document = openapi_document(__version__)

    async def openapi(_: web.Request) -> web.Response:
        return json_response(document)

    app.router.add_post("/initiate-conversation", initiate_conversation, expect_handler=continue_only)
    if deps.settings.webhooks_enabled:
        app.router.add_post("/webhooks/twilio/status", twilio_status, expect_handler=continue_only)
        app.router.add_post("/webhooks/twilio/{channel:whatsapp|sms}", twilio_inbound, expect_handler=continue_only)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi)
    app.on_response_prepare.append(add_cors_headers)
    return app


def create_metrics_app(deps: Dependencies) -> web.Application:
    """The Prometheus scrape endpoint alone, served on `metrics_port` (cluster-internal)."""
    app = web.Application()
    app[DEPS] = deps
    app.router.add_get("/metrics", metrics)
    return app


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol, except that what it refuses by itself, before any middleware runs
    (a malformed request, a request line or header over the limit), is answered with the SPEC §2 JSON
    error body and the CORS headers instead of aiohttp's plain text, which echoes the offending bytes."""

    __slots__ = ("_error_headers",)

    def __init__(self, manager: web.Server, *, error_headers: dict[str, str], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._error_headers = error_headers

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if isinstance(exc, LineTooLong):
            status = 431  # the parser reports every refusal as 400
        if status >= 500:
            log.error("unhandled_error", status=status, error=type(exc).__name__, exc_info=exc)
        else:
            # The error's text quotes the request (headers may carry secrets): log its kind only.
            log.info("malformed_http_request", status=status, error=type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("a response is already on its way; cannot send an error instead")
        response = http_error_response(status, str(uuid.uuid4()), self._error_headers)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:  # its kwargs carry the handler's `error_headers`
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class ServiceRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # app start-up, then aiohttp's own server for the app
        return JsonErrorServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            error_headers=cors_headers(self.app[DEPS].settings.cors_allow_origin),
            **plain._kwargs,
        )


def make_runner(app: web.Application, *, shutdown_timeout: float = HTTP_SHUTDOWN_S) -> web.AppRunner:
    """The server for `app`. aiohttp keeps a connection that has not sent a whole request open for an hour by
    default (its keep-alive timer runs from the connection's start): a client trickling half a header line per
    connection would hold a file descriptor each for that long. `http_idle_timeout_s` closes them sooner."""
    return ServiceRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout,
        keepalive_timeout=app[DEPS].settings.http_idle_timeout_s,
    )
