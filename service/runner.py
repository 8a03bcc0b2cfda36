"""Running the service process: HTTP server (and, by role, the consumers) until SIGTERM/SIGINT.

Shutdown order: readiness goes false, new work stops, in-flight work drains within
the grace period, then the HTTP server and every client close (reverse of opening).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Literal

import structlog
from aiohttp import web

from service.api.app import create_app, make_runner
from service.bootstrap import Dependencies, build
from service.config import Settings

Role = Literal["api", "worker", "all"]
log = structlog.get_logger("service.runner")


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def start_http(deps: Dependencies) -> web.AppRunner:
    runner = make_runner(create_app(deps))
    await runner.setup()
    site = web.TCPSite(runner, deps.settings.host, deps.settings.port, backlog=2048, reuse_address=True)
    await site.start()
    return runner


async def run_service(
    settings: Settings,
    role: Role,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Dependencies], None] | None = None,
) -> None:
    stop = stop or asyncio.Event()
    install_stop_signals(stop)
    runs_consumers = role in ("worker", "all")
    async with build(settings, expects_consumers=runs_consumers) as deps:
        http = await start_http(deps)
        try:
            for consumer in deps.consumers:
                await consumer.start()
            deps.readiness.consumers_running = lambda: all(c.running for c in deps.consumers)
            log.info("service_started", role=role, port=settings.port, queues=[c.queue_name for c in deps.consumers])
            if on_ready:
                on_ready(deps)
            await stop.wait()
        finally:
            # Readiness goes false first, so load balancers and KEDA stop counting on this process.
            deps.readiness.draining = True
            log.info("service_stopping", role=role, grace_s=settings.drain_grace_s)
            await asyncio.gather(*(consumer.stop(settings.drain_grace_s) for consumer in deps.consumers))
            await http.cleanup()
    log.info("service_stopped", role=role)
