"""While the service serves, what start-up built is out of the cyclic collector's full passes (gc.freeze), so a full
collection walks only what requests left behind; when the service stops it is handed back to the collector."""

from __future__ import annotations

import asyncio
import gc

from local_stack.moto_server import free_port
from service.config import Settings
from service.runner import run_service


async def test_the_start_up_heap_is_frozen_while_serving_and_thawed_after(settings: Settings) -> None:
    local = settings.model_copy(
        update={
            "host": "127.0.0.1",
            "port": free_port(),
            "metrics_port": free_port(),
            "public_base_url": "http://x.test",
        }
    )
    stop, ready = asyncio.Event(), asyncio.Event()
    frozen_while_serving: list[int] = []

    def on_ready(_: object) -> None:
        frozen_while_serving.append(gc.get_freeze_count())
        ready.set()

    assert gc.get_freeze_count() == 0
    service = asyncio.create_task(run_service(local, "api", stop=stop, on_ready=on_ready))
    try:
        await asyncio.wait({service, asyncio.ensure_future(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        assert ready.is_set(), service.result()
    finally:
        stop.set()
        await service
    assert frozen_while_serving[0] > 10_000  # modules, service models, clients: far more than a handful of objects
    assert gc.get_freeze_count() == 0
