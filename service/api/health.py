"""Liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import generate_latest

from service.api.responses import json_response
from service.api.state import DEPS


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers. Never depends on AWS, so a slow dependency cannot restart pods."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    problems = await deps.readiness.problems(deps.probe_aws)
    if problems:
        return json_response({"status": "not_ready", "problems": problems}, status=503)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; mounted on the metrics listener only (`create_metrics_app`)."""
    return web.Response(body=generate_latest(request.app[DEPS].registry), content_type="text/plain", charset="utf-8")


def create_starting_app() -> web.Application:
    """What the public port answers while a worker waits for SQS at start-up (before its app exists): alive, not
    ready. Without it a startup probe finds the port closed and restarts a pod that is only waiting."""
    app = web.Application()

    async def starting(_: web.Request) -> web.Response:
        return json_response({"status": "not_ready", "problems": ["starting: waiting for SQS"]}, status=503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", starting)
    return app
