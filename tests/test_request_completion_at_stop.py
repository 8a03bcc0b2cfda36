"""An initiate request is answered once its message is queued; the request ledger's completion follows the answer,
and a service stopping right after the answer (or any wiring closing: a bench, a test) waits for it before closing
its AWS clients."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from local_stack.moto_server import free_port
from local_stack.seed import DemoTenant
from service.bootstrap import Dependencies, build
from service.config import Settings
from service.domain.claims import RequestState, request_key
from service.domain.initiate import validate_initiate_body
from service.runner import run_service
from tests.bodies import initiate_body

COMPLETION_DELAY_S = 0.3  # longer than the HTTP server's cleanup with nothing in flight


async def test_a_completion_after_the_answer_lands_before_the_service_closes_its_clients(
    settings: Settings, tenant: DemoTenant, deps: Dependencies
) -> None:
    local = settings.model_copy(
        update={
            "host": "127.0.0.1",
            "port": free_port(),
            "metrics_port": free_port(),
            "public_base_url": "http://x.test",
        }
    )
    stop, ready = asyncio.Event(), asyncio.Event()

    def on_ready(service_deps: Dependencies) -> None:
        ledger: Any = service_deps.adapters.ledger
        complete = ledger.complete

        async def late_complete(key: str, queue_timestamp: str) -> None:
            await asyncio.sleep(COMPLETION_DELAY_S)  # still running when the stop begins
            await complete(key, queue_timestamp)

        ledger.complete = late_complete
        ready.set()

    body = initiate_body()
    service = asyncio.create_task(run_service(local, "api", stop=stop, on_ready=on_ready))
    try:
        await asyncio.wait({service, asyncio.ensure_future(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        assert ready.is_set(), service.result()
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{local.port}/initiate-conversation"
            async with client.post(url, json=body, headers={"x-api-key": tenant.api_key}) as response:
                assert response.status == 200, await response.text()
        stop.set()
        await service
    finally:
        stop.set()
        if not service.done():
            await service

    key = request_key(
        body["company_data"]["company_id"], body["company_data"]["project_id"], body["request_data"]["request_id"]
    )
    record = await deps.adapters.ledger.read(key)  # the tests' own wiring: the service's clients are closed
    assert record is not None and record.state is RequestState.COMPLETED


async def test_wiring_built_outside_the_runner_waits_for_its_completions_before_closing(
    settings: Settings, tenant: DemoTenant, deps: Dependencies
) -> None:
    body = initiate_body()
    async with build(settings) as own:
        ledger: Any = own.adapters.ledger
        complete = ledger.complete

        async def late_complete(key: str, queue_timestamp: str) -> None:
            await asyncio.sleep(COMPLETION_DELAY_S)  # still running when the wiring closes
            await complete(key, queue_timestamp)

        ledger.complete = late_complete
        outcome = await own.initiator.initiate(validate_initiate_body(body), trace_id="t")
        assert outcome.enqueued

    key = request_key(
        body["company_data"]["company_id"], body["company_data"]["project_id"], body["request_data"]["request_id"]
    )
    record = await deps.adapters.ledger.read(key)
    assert record is not None and record.state is RequestState.COMPLETED
