"""While the service serves, what start-up built is out of the cyclic collector's full passes (gc.freeze), so a full
collection walks only what requests left behind; when the service stops it is handed back to the collector."""

from __future__ import annotations

import gc

from service.config import Settings
from tests.served_api import served_api


async def test_the_start_up_heap_is_frozen_while_serving_and_thawed_after(settings: Settings) -> None:
    frozen_while_serving: list[int] = []
    assert gc.get_freeze_count() == 0

    async with served_api(settings, on_ready=lambda _: frozen_while_serving.append(gc.get_freeze_count())):
        pass

    assert frozen_while_serving[0] > 10_000  # modules, service models, clients: far more than a handful of objects
    assert gc.get_freeze_count() == 0
