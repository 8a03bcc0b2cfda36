"""`AiohttpTransport`: httpx2 requests over an aiohttp pool behave as over httpx2's own transport (the OpenAI SDK
sees the same responses and the same exception types)."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import httpx2
import orjson
import pytest
from aiohttp import web

from local_stack.moto_server import free_port
from local_stack.sandbox_http import RunningServer, serve
from service.adapters.providers.openai_writer import pooled_http_client


async def echo(request: web.Request) -> web.Response:
    """The request as received: method, path, query, headers, body."""
    body = {
        "method": request.method,
        "path": request.path,
        "query": dict(request.query),
        "headers": dict(request.headers),
        "body": (await request.read()).decode(),
        "client_port": request.transport.get_extra_info("peername")[1] if request.transport else None,
    }
    return web.json_response(body, status=int(request.query.get("status", "200")), headers={"x-echo": "yes"})


async def gzipped(request: web.Request) -> web.Response:
    return web.Response(body=gzip.compress(b'{"id": "resp_1"}'), headers={"Content-Encoding": "gzip"})


async def hang(request: web.Request) -> web.Response:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[RunningServer]:
    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/hang", hang)
    running = await serve(app)
    assert running.runner.server is not None
    running.runner.server.handler_cancellation = True
    yield running
    await running.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    async with pooled_http_client(4, 5.0) as http:
        yield http


async def test_a_request_arrives_with_its_method_query_headers_and_body(
    server: RunningServer, client: httpx2.AsyncClient
) -> None:
    answer = await client.post(
        f"{server.url}/echo", params={"a": "1"}, json={"k": "v"}, headers={"Authorization": "Bearer sk-x"}
    )
    assert (answer.status_code, answer.headers["x-echo"]) == (200, "yes")
    seen = answer.json()
    assert (seen["method"], seen["path"], seen["query"]) == ("POST", "/echo", {"a": "1"})
    assert seen["headers"]["Authorization"] == "Bearer sk-x"
    assert seen["headers"]["Content-Type"] == "application/json"
    assert orjson.loads(seen["body"]) == {"k": "v"}


async def test_an_error_status_is_a_response_not_an_exception(
    server: RunningServer, client: httpx2.AsyncClient
) -> None:
    answer = await client.get(f"{server.url}/echo", params={"status": "429"})
    assert answer.status_code == 429 and answer.json()["method"] == "GET"


async def test_a_compressed_body_is_decoded_as_httpx2_would(server: RunningServer, client: httpx2.AsyncClient) -> None:
    answer = await client.get(f"{server.url}/gzip")
    assert answer.json() == {"id": "resp_1"}


async def test_a_read_timeout_is_httpx2s_read_timeout(server: RunningServer, client: httpx2.AsyncClient) -> None:
    with pytest.raises(httpx2.ReadTimeout):
        await client.get(f"{server.url}/hang", timeout=httpx2.Timeout(5.0, read=0.2))


async def test_a_refused_connection_is_httpx2s_connect_error(client: httpx2.AsyncClient) -> None:
    with pytest.raises(httpx2.ConnectError):
        await client.get(f"http://127.0.0.1:{free_port()}/")


async def test_twenty_requests_share_the_pools_four_connections(
    server: RunningServer, client: httpx2.AsyncClient
) -> None:
    answers = await asyncio.gather(*(client.get(f"{server.url}/echo") for _ in range(20)))
    assert all(answer.status_code == 200 for answer in answers)
    assert 1 <= len({answer.json()["client_port"] for answer in answers}) <= 4
