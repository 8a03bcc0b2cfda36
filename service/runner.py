"""Running the service process: HTTP server (and, by role, the consumers) until SIGTERM/SIGINT.

Shutdown order: readiness goes false, new work stops, in-flight work drains within
the grace period, then the HTTP server and every client close (reverse of opening).
A second SIGTERM/SIGINT during shutdown stops at once: open polls and in-flight work are cancelled
(`QueueConsumer.abandon`), and messages in flight reappear after their visibility timeout.

Two listeners on `host`: the service on `port` and Prometheus' `/metrics` alone on `metrics_port`, which the
ingress never routes to. At start-up a worker waits for an SQS that does not answer (retrying with a capped,
doubling delay) instead of exiting; a SIGTERM meanwhile ends the wait and the process, cleanly.

Tracing (`service.tracing`, the OTEL_* variables) starts before anything is built and is flushed last, within
`config.TRACE_FLUSH_S`.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Literal, TypeVar

import structlog
import uvloop
from aiohttp import web

from consumers.runtime import QueueConsumer
from consumers.sqs_messages import StartupRetry, StartupStopped
from service.api.app import create_app, create_metrics_app, make_runner
from service.api.health import create_starting_app
from service.bootstrap import Dependencies, build
from service.config import HTTP_SHUTDOWN_S, ConfigurationError, EventLoop, Settings
from service.tracing import start_from_environment

Role = Literal["api", "worker", "all"]
log = structlog.get_logger("service.runner")
start_tracing = start_from_environment  # OTEL_* decide; tests replace it to keep the OpenTelemetry global untouched
T = TypeVar("T")

LOOP_FACTORIES: dict[EventLoop, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,  # libuv's loop: a few percent less CPU per request than asyncio's
    "asyncio": asyncio.new_event_loop,  # the fallback (COMMS_EVENT_LOOP=asyncio)
}


def run_on(event_loop: EventLoop, main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a new event loop of the kind named, closed afterwards (as `asyncio.run`)."""
    with asyncio.Runner(loop_factory=LOOP_FACTORIES[event_loop]) as runner:
        return runner.run(main)


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


def freeze_startup_heap() -> None:
    """What start-up built (modules, botocore's service models, the clients, the caches) lives as long as the
    process, yet every full pass of the cyclic collector walks all of it: about 0.1 to 0.2 s of CPU, once every few
    hundred requests. Collected once, then moved out of the collector's view (`gc.freeze`); reference counting still
    frees any of it that is dropped. `thaw_heap` puts it back when the service stops."""
    gc.collect()
    gc.freeze()


def thaw_heap() -> None:
    gc.unfreeze()


async def start_http(deps: Dependencies) -> web.AppRunner:
    runner = make_runner(create_app(deps))
    await runner.setup()
    await _listen(runner, web.TCPSite(runner, deps.settings.host, deps.settings.port, backlog=2048, reuse_address=True))
    return runner


async def start_starting_http(settings: Settings) -> web.AppRunner:
    """`create_starting_app` on the public port until the service's own app takes it over."""
    runner = web.AppRunner(create_starting_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await _listen(runner, web.TCPSite(runner, settings.host, settings.port, reuse_address=True))
    return runner


async def start_metrics_http(deps: Dependencies) -> web.AppRunner:
    """`/metrics` alone on `metrics_port` (same host), so the public listener never serves it."""
    runner = web.AppRunner(create_metrics_app(deps), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await _listen(runner, web.TCPSite(runner, deps.settings.host, deps.settings.metrics_port, reuse_address=True))
    return runner


async def _listen(runner: web.AppRunner, site: web.TCPSite) -> None:
    """Start listening; a port in use or a host that does not resolve is the configuration's problem (exit 2 with
    the reason), not a traceback."""
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigurationError(f"cannot listen on {site.name}: {exc.strerror or exc}") from exc


async def run_service(
    settings: Settings,
    role: Role,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Dependencies], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Serve until `stop` (or SIGTERM/SIGINT). `sleep` is the rest between start-up attempts while SQS does
    not answer. Raises `ConfigurationError` when an api/all process has webhooks but no public base URL."""
    if role in ("api", "all"):
        settings.require_public_base_url()
    traces = start_tracing(role=role)  # before `build`, which instruments the clients it opens while tracing is on
    stop = stop or asyncio.Event()
    force = asyncio.Event()
    install_stop_signals(stop, force)
    runs_consumers = role in ("worker", "all")
    starting: web.AppRunner | None = None
    try:
        if runs_consumers:  # building the consumers may wait for SQS: meanwhile the port answers the probes
            starting = await start_starting_http(settings)
        async with build(settings, expects_consumers=runs_consumers, startup=StartupRetry(stop, sleep)) as deps:
            if starting is not None:
                await starting.cleanup()
                starting = None
            freeze_startup_heap()
            try:
                await _serve(deps, settings, role, stop, force, on_ready)
            finally:
                thaw_heap()
    except StartupStopped:
        log.info("service_stopped", role=role, during="startup")
        return
    finally:
        if starting is not None:
            await starting.cleanup()
        await traces.shutdown()  # the last spans leave (bounded: config.TRACE_FLUSH_S) after every client closed
    log.info("service_stopped", role=role)


async def _serve(
    deps: Dependencies,
    settings: Settings,
    role: Role,
    stop: asyncio.Event,
    force: asyncio.Event,
    on_ready: Callable[[Dependencies], None] | None,
) -> None:
    http = await start_http(deps)
    metrics_http: web.AppRunner | None = None
    try:
        metrics_http = await start_metrics_http(deps)
        for consumer in deps.consumers:
            await consumer.start()
        deps.readiness.consumers_running = lambda: all(c.running for c in deps.consumers)
        log.info(
            "service_started",
            role=role,
            port=settings.port,
            metrics_port=settings.metrics_port,
            queues=[c.queue_name for c in deps.consumers],
            event_loop=type(asyncio.get_running_loop()).__module__,  # uvloop or asyncio.unix_events
        )
        if on_ready:
            on_ready(deps)
        await stop.wait()
    finally:
        # Readiness goes false first, so load balancers and KEDA stop counting on this process.
        deps.readiness.draining = True
        log.info("service_stopping", role=role, grace_s=settings.drain_grace_s)
        await stop_consumers(deps.consumers, settings.drain_grace_s, force)
        # Metrics stay scrapeable through the drain; both listeners close together (within HTTP_SHUTDOWN_S), and
        # the request ledger completions of the last answered requests end within the same bound.
        loop = asyncio.get_running_loop()
        http_deadline = loop.time() + HTTP_SHUTDOWN_S
        await asyncio.gather(http.cleanup(), *([metrics_http.cleanup()] if metrics_http else []))
        await deps.initiator.settle(http_deadline - loop.time())


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
