"""One API key's rate limit holds for a fleet of api processes together (issue 14 §2): three
`python -m service serve --role api` processes against one moto, one key's requests spread over them."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack

import aiohttp

from service.bootstrap import Dependencies
from service.config import Settings
from tests.bodies import initiate_body
from tests.e2e_support import worker_process
from tests.support import add_tenant

PER_SECOND, BURST = 10.0, 10
OFFERED_PER_SECOND, REQUESTS = 30.0, 150  # three times the limit, for 5 s
REPLICAS = 3


async def offer_load(urls: list[str], api_key: str, company_id: str) -> tuple[Counter[int], float]:
    """REQUESTS requests at OFFERED_PER_SECOND, open loop, round-robin over `urls`: statuses, and the seconds
    from the first request sent to the last."""
    statuses: Counter[int] = Counter()
    headers = {"x-api-key": api_key}
    body = initiate_body(company_data={"company_id": company_id, "project_id": "p1"})

    async def one(http: aiohttp.ClientSession, url: str) -> None:
        payload = {**body, "request_data": {**body["request_data"], "request_id": str(uuid.uuid4())}}
        async with http.post(f"{url}/initiate-conversation", json=payload, headers=headers) as answer:
            statuses[answer.status] += 1

    async with aiohttp.ClientSession() as http, asyncio.TaskGroup() as requests:
        start = time.monotonic()
        for i in range(REQUESTS):
            await asyncio.sleep(max(0.0, start + i / OFFERED_PER_SECOND - time.monotonic()))
            requests.create_task(one(http, urls[i % len(urls)]))
        sent_over_s = time.monotonic() - start
    return statuses, sent_over_s


async def test_three_api_processes_hold_one_key_to_its_limit_together(
    settings: Settings, deps: Dependencies, tenant: object, tmp_path: object
) -> None:
    company_id = f"fleet-{uuid.uuid4().hex[:8]}"
    api_key = await add_tenant(deps, company_id, "p1", rate_limits={"requests_per_second": PER_SECOND, "burst": BURST})
    api_settings = settings.model_copy(update={"public_base_url": "http://127.0.0.1:9"})
    async with AsyncExitStack() as stack:
        fleet = await asyncio.gather(
            *(
                stack.enter_async_context(worker_process(api_settings, tmp_path, f"api-{i}", role="api"))  # type: ignore[arg-type]
                for i in range(REPLICAS)
            )
        )
        statuses, sent_over_s = await offer_load([process.url for process in fleet], api_key, company_id)

    assert set(statuses) <= {200, 429}, statuses
    expected = BURST + PER_SECOND * sent_over_s  # what one bucket allows over the time the requests came in
    assert abs(statuses[200] - expected) <= 0.1 * expected, (statuses, expected)
