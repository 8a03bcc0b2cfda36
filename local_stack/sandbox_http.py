"""What every provider sandbox shares: injected latency, injected faults, a request log, serving.

A sandbox is an aiohttp app that speaks a provider's real HTTP API so the real SDK
can be pointed at it. Tests and benchmarks steer it over HTTP:

    POST /_sandbox/latency  {"seconds": 1.0}
    POST /_sandbox/faults   {"status": 429, "count": 2, "retry_after": 1, "path_prefix": "/v1/responses",
                             "mode": "http" | "hang" | "reset", "body": {...}}
    GET  /_sandbox/requests -> [{"method","path","at"}...]
    POST /_sandbox/reset     (clears faults, latency, request log)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FaultMode = Literal["http", "hang", "reset"]


@dataclass(slots=True)
class Fault:
    """Answer the next `count` matching requests with `status` (or hang, or drop the connection)."""

    status: int = 500
    count: int = 1
    retry_after: float | None = None
    path_prefix: str = "/"
    method: str | None = None
    mode: FaultMode = "http"
    body: dict[str, Any] | None = None

    def matches(self, request: web.Request) -> bool:
        if self.count <= 0 or not request.path.startswith(self.path_prefix):
            return False
        return self.method is None or self.method.upper() == request.method


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str
    at: float


@dataclass(slots=True)
class SandboxControl:
    """The steerable behaviour of one sandbox server."""

    latency_s: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    max_recorded: int = 100_000

    def next_fault(self, request: web.Request) -> Fault | None:
        for fault in self.faults:
            if fault.matches(request):
                fault.count -= 1
                return fault
        return None

    def reset(self) -> None:
        self.latency_s = 0.0
        self.faults.clear()
        self.requests.clear()


CONTROL_KEY = web.AppKey("sandbox_control", SandboxControl)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=lambda d: orjson.dumps(d).decode())


def _fault_response(fault: Fault) -> web.Response:
    headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
    body = fault.body or {"error": {"message": f"sandbox injected fault {fault.status}", "code": fault.status}}
    return json_response(body, status=fault.status, headers=headers)


def sandbox_middleware(control: SandboxControl) -> Middleware:
    @web.middleware
    async def apply_behaviour(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_sandbox/"):
            return await handler(request)
        if len(control.requests) < control.max_recorded:
            control.requests.append(RecordedRequest(request.method, request.path, time.time()))
        if control.latency_s > 0:
            await asyncio.sleep(control.latency_s)
        fault = control.next_fault(request)
        if fault is not None:
            if fault.mode == "hang":
                await asyncio.sleep(3600)
            if fault.mode == "reset" and request.transport is not None:
                request.transport.close()
                raise ConnectionResetError("sandbox dropped the connection")
            return _fault_response(fault)
        return await handler(request)

    return apply_behaviour


async def _set_latency(request: web.Request) -> web.Response:
    data = await request.json()
    request.app[CONTROL_KEY].latency_s = float(data["seconds"])
    return json_response({"latency_s": request.app[CONTROL_KEY].latency_s})


async def _add_fault(request: web.Request) -> web.Response:
    data = await request.json()
    fault = Fault(**data)
    request.app[CONTROL_KEY].faults.append(fault)
    return json_response({"queued": len(request.app[CONTROL_KEY].faults)})


async def _list_requests(request: web.Request) -> web.Response:
    recorded = request.app[CONTROL_KEY].requests
    return json_response([{"method": r.method, "path": r.path, "at": r.at} for r in recorded])


async def _reset(request: web.Request) -> web.Response:
    request.app[CONTROL_KEY].reset()
    return json_response({"reset": True})


def new_sandbox_app(control: SandboxControl | None = None) -> web.Application:
    """An app with the shared middleware and control routes; callers add the provider routes."""
    control = control or SandboxControl()
    app = web.Application(middlewares=[sandbox_middleware(control)], client_max_size=8 * 1024 * 1024)
    app[CONTROL_KEY] = control
    app.router.add_post("/_sandbox/latency", _set_latency)
    app.router.add_post("/_sandbox/faults", _add_fault)
    app.router.add_get("/_sandbox/requests", _list_requests)
    app.router.add_post("/_sandbox/reset", _reset)
    return app


@dataclass(slots=True)
class RunningServer:
    url: str
    runner: web.AppRunner

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Start `app` on host:port (0 = a free port) and return its base URL."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound_port = runner.addresses[0][1]
    return RunningServer(url=f"http://{host}:{bound_port}", runner=runner)
