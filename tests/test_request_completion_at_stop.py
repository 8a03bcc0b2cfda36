"""An initiate request is answered once its message is queued; the request ledger's completion follows the answer,
and a service stopping right after the answer (or any wiring closing: a bench, a test) waits for it before closing
its AWS clients."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from local_stack.seed import DemoTenant
from service.bootstrap import Dependencies, build
from service.config import Settings
from service.domain.claims import RequestState, request_key
from service.domain.initiate import validate_initiate_body
from tests.bodies import initiate_body
from tests.served_api import served_api

COMPLETION_DELAY_S = 0.3  # longer than the HTTP server's cleanup with nothing in flight


def delay_completions(deps: Dependencies) -> None:
    """The wiring's ledger completes each request `COMPLETION_DELAY_S` late: still running when the stop begins."""
    ledger: Any = deps.adapters.ledger
    complete = ledger.complete

    async def late_complete(key: str, queue_timestamp: str) -> None:
        await asyncio.sleep(COMPLETION_DELAY_S)
        await complete(key, queue_timestamp)

    ledger.complete = late_complete


async def ledger_state(deps: Dependencies, body: dict[str, Any]) -> RequestState | None:
    """The request's ledger state, read through the tests' own wiring (the one under test has closed its clients)."""
    company = body["company_data"]
    record = await deps.adapters.ledger.read(
        request_key(company["company_id"], company["project_id"], body["request_data"]["request_id"])
    )
    return None if record is None else record.state


async def test_a_completion_after_the_answer_lands_before_the_service_closes_its_clients(
    settings: Settings, tenant: DemoTenant, deps: Dependencies
) -> None:
    body = initiate_body()
    async with served_api(settings, on_ready=delay_completions) as local, aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{local.port}/initiate-conversation"
        async with client.post(url, json=body, headers={"x-api-key": tenant.api_key}) as response:
            assert response.status == 200, await response.text()

    assert await ledger_state(deps, body) is RequestState.COMPLETED


async def test_wiring_built_outside_the_runner_waits_for_its_completions_before_closing(
    settings: Settings, tenant: DemoTenant, deps: Dependencies
) -> None:
    body = initiate_body()
    async with build(settings) as own:
        delay_completions(own)
        outcome = await own.initiator.initiate(validate_initiate_body(body), trace_id="t")
        assert outcome.enqueued

    assert await ledger_state(deps, body) is RequestState.COMPLETED
