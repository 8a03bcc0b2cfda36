"""`/metrics` has its own listener (`COMMS_METRICS_PORT`): the public port, behind the ingress, never serves it."""

from __future__ import annotations

import aiohttp

from service.config import Settings
from tests.served_api import served_api


async def test_metrics_are_served_on_the_metrics_port_only(settings: Settings) -> None:
    async with served_api(settings) as local, aiohttp.ClientSession() as http:
        port, metrics_port = local.port, local.metrics_port
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
