"""`/metrics` has its own listener (`COMMS_METRICS_PORT`): the public port, behind the ingress, never serves it."""

from __future__ import annotations

import asyncio

import aiohttp

from local_stack.moto_server import free_port
from service.config import Settings
from service.runner import run_service


async def test_metrics_are_served_on_the_metrics_port_only(settings: Settings) -> None:
    port, metrics_port = free_port(), free_port()
    local = settings.model_copy(
        update={"host": "127.0.0.1", "port": port, "metrics_port": metrics_port, "public_base_url": "http://x.test"}
    )
    stop, ready = asyncio.Event(), asyncio.Event()
    service = asyncio.create_task(run_service(local, "api", stop=stop, on_ready=lambda _: ready.set()))
    try:
        await asyncio.wait({service, asyncio.ensure_future(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        assert ready.is_set(), service.result()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as health:
                assert health.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as public:
                assert public.status == 404
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as scrape:
                assert scrape.status == 200
                assert scrape.content_type == "text/plain"
                assert 'comms_http_requests_total{route="/healthz",status="200"}' in await scrape.text()
            async with http.get(f"http://127.0.0.1:{metrics_port}/healthz") as other:
                assert other.status == 404  # the metrics listener serves nothing else
    finally:
        stop.set()
        await service
