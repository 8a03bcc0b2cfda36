"""The aiohttp application: routes, middlewares and hooks over already-wired dependencies."""

from __future__ import annotations

from aiohttp import web

from service import __version__
from service.api.health import healthz, metrics, readyz
from service.api.initiate_handler import initiate_conversation
from service.api.middleware import add_cors_headers, errors_as_json, request_context
from service.api.openapi import openapi_document
from service.api.responses import json_response
from service.api.state import DEPS
from service.api.webhooks import twilio_inbound, twilio_status
from service.bootstrap import Dependencies


def create_app(deps: Dependencies) -> web.Application:
    # client_max_size is a backstop; the initiate handler enforces the 64 KiB contract itself.
    app = web.Application(
        middlewares=[request_context, errors_as_json],
        client_max_size=deps.settings.max_body_bytes * 4,
    )
    app[DEPS] = deps
    document = openapi_document(__version__)

    async def openapi(_: web.Request) -> web.Response:
        return json_response(document)

    app.router.add_post("/initiate-conversation", initiate_conversation)
    app.router.add_post("/webhooks/twilio/status", twilio_status)
    app.router.add_post("/webhooks/twilio/{channel:whatsapp|sms}", twilio_inbound)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.on_response_prepare.append(add_cors_headers)
    return app
