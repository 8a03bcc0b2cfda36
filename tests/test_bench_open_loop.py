"""The endpoint and replies modes' load is open loop (bench/endpoint.py): requests leave on their schedule whatever
the earlier ones are doing, and each latency runs from its scheduled send time."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from bench.endpoint import open_loop, percentile
from local_stack.sandbox_http import serve


async def test_later_requests_are_sent_while_earlier_ones_are_still_unanswered() -> None:
    arrived: list[int] = []
    all_arrived = asyncio.Event()
    requests = 5

    async def handler(request: web.Request) -> web.Response:
        arrived.append(int(await request.text()))
        if len(arrived) == requests:
            all_arrived.set()
        await all_arrived.wait()  # nobody is answered until every request has arrived
        return web.json_response({"conversation_id": f"c{arrived[-1]}"})

    app = web.Application()
    app.router.add_post("/", handler)
    server = await serve(app)
    try:
        async with aiohttp.ClientSession() as session:
            load = [(str(i).encode(), {"Content-Type": "text/plain"}) for i in range(requests)]
            result = await asyncio.wait_for(open_loop(session, server.url + "/", load, rate_per_s=200.0), 30)
    finally:
        await server.close()
    assert sorted(arrived) == list(range(requests))
    assert [a.status for a in result.answers] == [200] * requests
    assert len(result.lag_s) == requests


async def test_a_request_without_an_answer_is_reported_with_status_zero() -> None:
    async with aiohttp.ClientSession() as session:
        result = await open_loop(session, "http://127.0.0.1:9/", [(b"{}", {})], rate_per_s=10.0)
    assert [a.status for a in result.answers] == [0]
    assert result.answers[0].error_code is not None


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (50.0, 99.0, 100.0)
    assert percentile([], 0.5) == 0.0


async def test_a_503_is_posted_again_when_retries_are_allowed() -> None:
    seen: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(await request.read())
        if len(seen) == 1:
            return web.Response(status=503, headers={"Retry-After": "0"})
        return web.Response(text="<Response/>", content_type="text/xml")

    app = web.Application()
    app.router.add_post("/", handler)
    server = await serve(app)
    try:
        async with aiohttp.ClientSession() as session:
            result = await open_loop(session, server.url + "/", [(b"form", {})], rate_per_s=10.0, retry_503=3)
    finally:
        await server.close()
    assert seen == [b"form", b"form"]
    assert [(a.status, a.attempts) for a in result.answers] == [(200, 2)]
