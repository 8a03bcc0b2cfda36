"""The OpenAI pool honours the proxy variables of the environment (HTTP_PROXY, HTTPS_PROXY, NO_PROXY), as httpx2's
own transport did: a worker behind an egress proxy keeps reaching OpenAI over the aiohttp transport.

The proxy here is a loopback server that writes down each request line: an absolute-form GET for plain HTTP,
a CONNECT for HTTPS (which it refuses, so no TLS is needed). OpenAI's host is `.invalid`: only a proxy reaches it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx2
import pytest
from aiohttp import web

from local_stack.sandbox_http import RunningServer, serve
from service.adapters.providers.openai_writer import AiohttpTransport, pooled_http_client
from service.bootstrap import build
from service.config import Settings
from service.domain.provider_ports import AiRequest, ProviderError

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
ANSWER = b'{"via": "proxy"}'


class RecordingProxy:
    """Answers every plain request itself and refuses every tunnel, after writing down its request line."""

    def __init__(self) -> None:
        self.request_lines: list[str] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            writer.close()
            return
        line = head.split(b"\r\n", 1)[0].decode()
        self.request_lines.append(line)
        if line.startswith("CONNECT "):
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        else:
            writer.write(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
                + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode()
                + ANSWER
            )
        await writer.drain()
        writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[RecordingProxy]:
    running = RecordingProxy()
    await running.start()
    yield running
    await running.close()


@pytest.fixture
def clean_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variable from the machine running the tests (either spelling)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.fixture
async def direct_server() -> AsyncIterator[RunningServer]:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"via": "direct"})

    app = web.Application()
    app.router.add_get("/v1/models", hello)
    running = await serve(app)
    yield running
    await running.close()


async def test_a_plain_http_request_goes_through_the_http_proxy_the_environment_names(
    proxy: RecordingProxy, clean_proxy_environment: pytest.MonkeyPatch
) -> None:
    clean_proxy_environment.setenv("HTTP_PROXY", proxy.url)
    async with pooled_http_client(4, 5.0) as client:
        answer = await client.get("http://api.openai.invalid/v1/models")
    assert answer.json() == {"via": "proxy"}
    assert proxy.request_lines == ["GET http://api.openai.invalid/v1/models HTTP/1.1"]


async def test_an_https_request_is_tunnelled_through_the_https_proxy_the_environment_names(
    proxy: RecordingProxy, clean_proxy_environment: pytest.MonkeyPatch
) -> None:
    clean_proxy_environment.setenv("HTTPS_PROXY", proxy.url)
    async with pooled_http_client(4, 5.0) as client:
        with pytest.raises(httpx2.HTTPError):  # this proxy refuses the tunnel
            await client.get("https://api.openai.invalid/v1/responses/resp_1")
    assert proxy.request_lines == ["CONNECT api.openai.invalid:443 HTTP/1.1"]


async def test_a_host_no_proxy_names_is_reached_directly(
    proxy: RecordingProxy, direct_server: RunningServer, clean_proxy_environment: pytest.MonkeyPatch
) -> None:
    clean_proxy_environment.setenv("HTTP_PROXY", proxy.url)
    clean_proxy_environment.setenv("NO_PROXY", "127.0.0.1")
    async with pooled_http_client(4, 5.0) as client:
        answer = await client.get(f"{direct_server.url}/v1/models")
    assert answer.json() == {"via": "direct"}
    assert proxy.request_lines == []


async def test_a_transport_told_not_to_trust_the_environment_ignores_its_proxy(
    proxy: RecordingProxy, direct_server: RunningServer, clean_proxy_environment: pytest.MonkeyPatch
) -> None:
    clean_proxy_environment.setenv("HTTP_PROXY", proxy.url)
    async with httpx2.AsyncClient(transport=AiohttpTransport(4, trust_env=False)) as client:
        answer = await client.get(f"{direct_server.url}/v1/models")
    assert answer.json() == {"via": "direct"}
    assert proxy.request_lines == []


async def test_the_workers_openai_calls_go_through_the_proxy_the_environment_names(
    settings: Settings, proxy: RecordingProxy, clean_proxy_environment: pytest.MonkeyPatch
) -> None:
    clean_proxy_environment.setenv("HTTP_PROXY", proxy.url)
    clean_proxy_environment.setenv("NO_PROXY", "127.0.0.1")  # moto stays direct
    worker = settings.model_copy(update={"openai_base_url": "http://api.openai.invalid/v1", "ai_max_attempts": 1})
    async with build(worker, expects_consumers=True, senders={}) as deps:
        assert deps.adapters.ai is not None
        request = AiRequest(
            api_key="sk-test", model="gpt-test", instructions="Be brief.", input_text="hi", output_keys=("content",)
        )
        with pytest.raises(ProviderError):  # the proxy answers 400 itself
            await deps.adapters.ai.write(request)
    assert proxy.request_lines == ["POST http://api.openai.invalid/v1/responses HTTP/1.1"]
