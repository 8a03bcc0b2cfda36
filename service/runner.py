"""Running the service process: HTTP server (and, by role, the consumers) until SIGTERM/SIGINT.

Shutdown order: readiness goes false, new work stops, in-flight work drains within
the grace period, then the HTTP server and every client close (reverse of opening).
A second SIGTERM/SIGINT during shutdown stops at once: open polls and in-flight work are cancelled
(`QueueConsumer.abandon`), and messages in flight reappear after their visibility timeout.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Sequence
from typing import Any, Literal

import structlog
from aiohttp import web

from consumers.runtime import QueueConsumer
from service.api.app import create_app, make_runner
from service.bootstrap import Dependencies, build
from service.config import Settings

Role = Literal["api", "worker", "all"]
log = structlog.get_logger("service.runner")


def install_stop_signals(stop: asyncio.Event, force: asyncio.Event) -> None:
    """The first SIGTERM/SIGINT sets `stop` (graceful drain); one during shutdown sets `force` (stop at once)."""
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            stop.set()
        elif not force.is_set():
            log.warning("forced_stop", signal=sig.name, in_flight="reappears after its visibility timeout")
            force.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


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
    force = asyncio.Event()
    install_stop_signals(stop, force)
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
            await stop_consumers(deps.consumers, settings.drain_grace_s, force)
            await http.cleanup()
    log.info("service_stopped", role=role)


async def stop_consumers(consumers: Sequence[QueueConsumer], grace_s: float, force: asyncio.Event) -> None:
    """Stop every consumer gracefully in parallel; once `force` is set, abandon whatever is still stopping."""
    stopping: asyncio.Future[Any] = asyncio.gather(*(consumer.stop(grace_s) for consumer in consumers))
    forced: asyncio.Future[Any] = asyncio.create_task(force.wait())
    try:
        await asyncio.wait({stopping, forced}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            for consumer in consumers:
                consumer.abandon()
        await stopping
    finally:
        forced.cancel()
