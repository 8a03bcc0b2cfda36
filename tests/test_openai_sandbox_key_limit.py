"""The OpenAI sandbox's per-key rate limit (local_stack/openai_sandbox.py `/_sandbox/openai/key-limit`): past it a
create answers as OpenAI's do (429, `type: requests`, `code: rate_limit_exceeded`, the `x-ratelimit-*-requests`
headers), and the OpenAI writer reads the wait from those headers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import openai
import pytest
from openai import AsyncOpenAI

from local_stack.openai_sandbox import KeyLimit, create_openai_sandbox, go_duration
from local_stack.sandbox_http import serve
from service.adapters.providers.openai_writer import OpenAiWriter, duration_s
from service.domain.provider_ports import AiRequest, ProviderRateLimited

MODEL = "gpt-sandbox"


@pytest.fixture
async def sandbox_url() -> AsyncIterator[str]:
    server = await serve(create_openai_sandbox(), "127.0.0.1", 0)
    yield server.url
    await server.close()


async def steer(sandbox_url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """POST (or GET, without a body) a `/_sandbox` control route."""
    async with aiohttp.ClientSession() as session:
        method = "POST" if body is not None else "GET"
        async with session.request(method, f"{sandbox_url}/_sandbox/{path}", json=body) as answer:
            assert answer.status == 200
            return await answer.json()


def client(sandbox_url: str, api_key: str = "sk-tenant-a") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{sandbox_url}/v1", api_key=api_key, max_retries=0)


async def create(sdk: AsyncOpenAI) -> httpx2.Response:
    raw = await sdk.responses.with_raw_response.create(model=MODEL, input="hi")
    return raw.http_response


# ---- the window, on its own clock ----------------------------------------------------------------


def test_a_key_s_window_lets_a_create_in_once_the_oldest_leaves_it() -> None:
    limit = KeyLimit(max_requests=2, window_s=1.0)
    assert [limit.take("k", t) for t in (0.0, 0.1)] == [0.0, 0.0]
    assert limit.take("k", 0.5) == pytest.approx(0.5)  # full until the create at 0.0 is a second old
    assert limit.take("k", 1.0) == 0.0
    assert limit.refused == 1


def test_each_key_has_its_own_window() -> None:
    limit = KeyLimit(max_requests=1, window_s=1.0)
    assert limit.take("a", 0.0) == 0.0
    assert limit.take("b", 0.0) == 0.0
    assert limit.take("a", 0.0) > 0


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "250ms"), (1.5, "1.5s"), (360.0, "6m0s"), (61.25, "1m1.25s")])
def test_waits_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
    assert duration_s(text) == pytest.approx(seconds)


# ---- over HTTP -------------------------------------------------------------------------------------


async def test_past_its_limit_a_key_s_create_is_refused_in_openai_s_shape(sandbox_url: str) -> None:
    await steer(sandbox_url, "openai/key-limit", {"max_requests": 2, "window_s": 60})
    async with client(sandbox_url) as sdk:
        remaining = [(await create(sdk)).headers["x-ratelimit-remaining-requests"] for _ in range(2)]
        with pytest.raises(openai.RateLimitError) as raised:
            await create(sdk)
    assert remaining == ["1", "0"]
    assert (raised.value.type, raised.value.code, raised.value.param) == ("requests", "rate_limit_exceeded", None)
    assert isinstance(raised.value.body, dict)
    assert str(raised.value.body["message"]).startswith(f"Rate limit reached for {MODEL} in organization")
    headers = raised.value.response.headers
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("2", "0")
    assert 59 < (duration_s(headers["x-ratelimit-reset-requests"]) or 0) <= 60
    assert (await steer(sandbox_url, "openai/key-limit"))["rate_limited"] == 1


async def test_another_key_is_not_refused(sandbox_url: str) -> None:
    await steer(sandbox_url, "openai/key-limit", {"max_requests": 1, "window_s": 60})
    async with client(sandbox_url, "sk-tenant-a") as first, client(sandbox_url, "sk-tenant-b") as second:
        await create(first)
        assert (await create(second)).status_code == 200


async def test_a_per_second_limit_is_that_many_creates_a_second(sandbox_url: str) -> None:
    assert await steer(sandbox_url, "openai/key-limit", {"per_second": 3}) == {
        "max_requests": 3,
        "window_s": 1.0,
        "rate_limited": 0,
    }


@pytest.mark.parametrize(("path", "body"), [("openai/key-limit", {"per_second": None}), ("openai/reset", {})])
async def test_the_limit_is_lifted_by_null_or_a_reset(sandbox_url: str, path: str, body: dict[str, Any]) -> None:
    await steer(sandbox_url, "openai/key-limit", {"max_requests": 1, "window_s": 60})
    await steer(sandbox_url, path, body)
    async with client(sandbox_url) as sdk:
        for _ in range(3):
            assert "x-ratelimit-remaining-requests" not in (await create(sdk)).headers
    assert await steer(sandbox_url, "openai/key-limit") is None


async def test_the_writer_raises_the_refusal_at_once_with_the_reset_as_its_wait(sandbox_url: str) -> None:
    await steer(sandbox_url, "openai/key-limit", {"max_requests": 1, "window_s": 30})
    writer = OpenAiWriter(None, f"{sandbox_url}/v1")
    request = AiRequest(api_key="sk-tenant-a", model=MODEL, instructions="i", input_text="hi", output_keys=("content",))
    try:
        await writer.write(request)
        with pytest.raises(ProviderRateLimited) as caught:
            await writer.write(request)
    finally:
        await writer.close()
    assert 29 < (caught.value.retry_after_s or 0) <= 30
    assert (await steer(sandbox_url, "openai/key-limit"))["rate_limited"] == 1  # not retried in the slot
