"""The api role run by `service.runner.run_service` in this process, on free loopback ports: for tests of what the
runner itself does (start-up, listeners, the stop sequence)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from local_stack.moto_server import free_port
from service.bootstrap import Dependencies
from service.config import Settings
from service.runner import run_service


def on_loopback(settings: Settings) -> Settings:
    """`settings` with the API and metrics listeners on free loopback ports."""
    return settings.model_copy(
        update={
            "host": "127.0.0.1",
            "port": free_port(),
            "metrics_port": free_port(),
            "public_base_url": "http://x.test",
        }
    )


@asynccontextmanager
async def served_api(
    settings: Settings, on_ready: Callable[[Dependencies], None] | None = None
) -> AsyncIterator[Settings]:
    """Serve the api role until the block ends (then stop it as SIGTERM would, and wait for the whole stop);
    yields the settings it listens with. `on_ready` runs once it serves, with its wiring."""
    local = on_loopback(settings)
    stop, ready = asyncio.Event(), asyncio.Event()

    def serving(deps: Dependencies) -> None:
        if on_ready is not None:
            on_ready(deps)
        ready.set()

    service = asyncio.create_task(run_service(local, "api", stop=stop, on_ready=serving))
    try:
        await asyncio.wait({service, asyncio.ensure_future(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        assert ready.is_set(), service.result()
        yield local
    finally:
        stop.set()
        await service
