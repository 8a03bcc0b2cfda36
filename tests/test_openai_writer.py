"""OpenAiWriter against the OpenAI sandbox over real HTTP: structured output, chained responses, retries, background
polling."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx2
import orjson
import pytest

from local_stack.openai_sandbox import create_openai_sandbox
from local_stack.sandbox_http import RunningServer, serve
from service.adapters.providers.openai_writer import OpenAiWriter, pooled_http_client
from service.domain.conversation import Message
from service.domain.provider_ports import (
    AiRequest,
    AiResult,
    PermanentProviderError,
    ProviderRateLimited,
    TransientProviderError,
)

API_KEY = "sk-sandbox-tenant-a"
CONTEXT = orjson.dumps({"recipient_data": {"recipient_first_name": "Lee", "recipient_last_name": "Hayton"}}).decode()
TEMPLATE_KEYS = ("1", "2", "3")


@dataclass(eq=False)
class VirtualTimer:
    """When a background generation ends, in virtual time; the sandbox cancels it with its response."""

    due_s: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class Sleeper:
    wake_s: float
    woken: asyncio.Event = field(default_factory=asyncio.Event)


class VirtualTime:
    """The one clock of the writer's sleeps and the sandbox's background generations.

    It moves only when every writer taking part (`writers`) is asleep, straight to the earliest wake-up, and
    ends the generations due by then: polls and generations line up the same way on every run, and nothing
    waits for real. `slept` lists each delay the writer asked for. `hold()` stops the clock for good; real
    time, and with it each write's own timeout, still runs.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []
        self.writers = 1
        self.held = False
        self._sleepers: list[Sleeper] = []
        self._timers: list[VirtualTimer] = []

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> VirtualTimer:
        """The sandbox's background timer."""
        timer = VirtualTimer(self.now + delay_s, callback)
        self._timers.append(timer)
        return timer

    async def sleep(self, delay_s: float) -> None:
        """The writer's sleep."""
        self.slept.append(delay_s)
        sleeper = Sleeper(self.now + delay_s)
        self._sleepers.append(sleeper)
        try:
            self._advance()
            await sleeper.woken.wait()
        finally:
            if sleeper in self._sleepers:  # cancelled while asleep
                self._sleepers.remove(sleeper)

    def hold(self) -> None:
        self.held = True

    def finished(self) -> None:
        """One writer is done: the clock no longer waits for it."""
        self.writers -= 1
        self._advance()

    def _advance(self) -> None:
        if self.held or not self._sleepers or len(self._sleepers) < self.writers:
            return
        self.now = max(self.now, min(sleeper.wake_s for sleeper in self._sleepers))
        for timer in [timer for timer in self._timers if timer.due_s <= self.now]:
            self._timers.remove(timer)
            if not timer.cancelled:
                timer.callback()
        for sleeper in [sleeper for sleeper in self._sleepers if sleeper.wake_s <= self.now]:
            self._sleepers.remove(sleeper)
            sleeper.woken.set()


@pytest.fixture(scope="module")
def clock() -> VirtualTime:
    return VirtualTime()


@pytest.fixture(scope="module")
async def sandbox(clock: VirtualTime) -> AsyncIterator[RunningServer]:
    server = await serve(create_openai_sandbox(call_later=clock.call_later))
    assert server.runner.server is not None
    server.runner.server.handler_cancellation = True  # a client giving up on a hung request ends its handler
    yield server
    await server.close()


@pytest.fixture(scope="module", params=["httpcore", "aiohttp"])
async def http_client(request: pytest.FixtureRequest) -> AsyncIterator[httpx2.AsyncClient]:
    """Every test runs over httpx2's own pool and over the aiohttp transport the worker uses."""
    if request.param == "aiohttp":
        client = pooled_http_client(100, 10.0)
    else:
        client = httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=100, max_keepalive_connections=100), timeout=httpx2.Timeout(10.0)
        )
    async with client:
        yield client


@pytest.fixture
async def control(sandbox: RunningServer, clock: VirtualTime) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=sandbox.url) as session:
        await steer(session, "/_sandbox/reset", {})
        await steer(session, "/_sandbox/openai/reset", {})
        clock.reset()
        yield session


@pytest.fixture
async def writer(
    sandbox: RunningServer, http_client: httpx2.AsyncClient, clock: VirtualTime
) -> AsyncIterator[OpenAiWriter]:
    writer = OpenAiWriter(
        http_client,
        f"{sandbox.url}/v1",
        max_attempts=4,
        backoff_base_s=0.05,
        poll_first_s=0.1,
        poll_cap_s=0.4,
        sleep=clock.sleep,
    )
    yield writer
    await writer.close()


async def steer(control: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> Any:
    async with control.post(path, json=body) as answer:
        assert answer.status == 200, await answer.text()
        return await answer.json()


async def fetch(control: aiohttp.ClientSession, path: str, method: str = "GET", body: Any = None) -> Any:
    """An OpenAI API call as a client makes it (GET, or `method` with a JSON `body`)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with control.request(method, path, headers=headers, json=body) as answer:
        assert answer.status == 200, await answer.text()
        return await answer.json()


async def inject(control: aiohttp.ClientSession, **fault: Any) -> None:
    await steer(control, "/_sandbox/faults", {"path_prefix": "/v1/responses", "method": "POST", **fault})


async def requests_to(control: aiohttp.ClientSession, method: str, prefix: str) -> list[dict[str, Any]]:
    recorded: list[dict[str, Any]] = await fetch(control, "/_sandbox/requests")
    return [r for r in recorded if r["method"] == method and r["path"].startswith(prefix)]


def ask(thread_id: str | None = None, **changes: Any) -> AiRequest:
    fields: dict[str, Any] = {
        "api_key": API_KEY,
        "model": "gpt-sandbox",
        "instructions": "Write the WhatsApp template variables for this viewing.",
        "input_text": CONTEXT,
        "output_keys": TEMPLATE_KEYS,
        "thread_id": thread_id,
        "timeout_s": 10.0,
        "metadata": {"conversation_id": "conv-1"},
    }
    fields.update(changes)
    return AiRequest(**fields)


def response_body(output_text: str, **changes: Any) -> dict[str, Any]:
    """A Responses API object as OpenAI would answer, for faults that stand in for a real answer."""
    body: dict[str, Any] = {
        "id": "resp_injected",
        "object": "response",
        "created_at": 0,
        "status": "completed",
        "model": "gpt-sandbox",
        "output": [
            {
                "type": "message",
                "id": "msg_injected",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": output_text, "annotations": []}],
            }
        ],
        "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
        "error": None,
        "incomplete_details": None,
    }
    body.update(changes)
    return body


# ---- structured output and threads ------------------------------------------------------------


async def test_output_has_exactly_the_requested_keys(writer: OpenAiWriter, control: aiohttp.ClientSession) -> None:
    result = await writer.write(ask())
    assert set(result.output) == set(TEMPLATE_KEYS)
    assert all(isinstance(value, str) and value for value in result.output.values())
    assert result.output["1"] == "Hi Lee"


async def test_token_usage_is_recorded(writer: OpenAiWriter, control: aiohttp.ClientSession) -> None:
    result = await writer.write(ask())
    assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert result.total_tokens == result.prompt_tokens + result.completion_tokens


async def test_a_first_exchange_is_one_stored_response_whose_id_is_the_continuation(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    result = await writer.write(ask())
    assert result.thread_id == result.response_id and result.thread_id.startswith("resp_")
    assert [r["path"] for r in await requests_to(control, "POST", "/v1/")] == ["/v1/responses"]  # one call
    stored = await fetch(control, f"/v1/responses/{result.response_id}")
    assert (stored["store"], stored["previous_response_id"], stored["conversation"]) == (True, None, None)
    assert stored["metadata"] == {"conversation_id": "conv-1"}


async def test_a_reply_is_chained_to_the_previous_response_and_becomes_the_continuation(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    first = await writer.write(ask())
    reply = await writer.write(
        ask(
            first.thread_id, instructions="Answer the customer.", input_text="Is Saturday OK?", output_keys=("content",)
        )
    )
    assert reply.thread_id == reply.response_id != first.response_id
    stored = await fetch(control, f"/v1/responses/{reply.response_id}")
    assert (stored["previous_response_id"], stored["instructions"]) == (first.response_id, "Answer the customer.")
    [given] = (await fetch(control, f"/v1/responses/{reply.response_id}/input_items"))["data"]
    assert given["content"][0]["text"] == "Is Saturday OK?"  # only the new input: OpenAI holds the rest
    assert reply.output["content"].startswith("Hi Lee")  # the model saw the first exchange


async def test_a_conversations_api_thread_is_still_written_in_and_stays_the_continuation(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    thread_id = (await fetch(control, "/v1/conversations", "POST", {}))["id"]  # a conversation started before chaining
    result = await writer.write(ask(thread_id))
    assert result.thread_id == thread_id
    items = (await fetch(control, f"/v1/conversations/{thread_id}/items?order=asc"))["data"]
    assert [item["role"] for item in items] == ["user", "assistant"]
    assert items[0]["content"][0]["text"] == CONTEXT
    assert orjson.loads(items[1]["content"][0]["text"]) == result.output
    assert (await fetch(control, f"/v1/responses/{result.response_id}"))["previous_response_id"] is None


async def test_a_previous_response_openai_no_longer_holds_is_asked_again_with_the_recorded_history(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    first = await writer.write(ask())
    await fetch(control, f"/v1/responses/{first.response_id}", "DELETE")  # as when a stored response expires
    history = (
        Message("SM1", "assistant", "Hi Lee, your viewing is on Saturday.", "t1"),
        Message("SM2", "user", "Can I bring my dog?", "t2"),
        Message("SM3", "assistant", "Yes, dogs are welcome.", "t3"),
    )
    reply = await writer.write(
        ask(first.thread_id, input_text="Great, see you then", output_keys=("content",), history=history)
    )
    assert len(await requests_to(control, "POST", "/v1/responses")) == 3  # the first, the refused one, once more
    assert reply.thread_id == reply.response_id  # a new chain starts from the answer
    assert (await fetch(control, f"/v1/responses/{reply.response_id}"))["previous_response_id"] is None
    given = (await fetch(control, f"/v1/responses/{reply.response_id}/input_items?order=asc"))["data"]
    assert [(item["role"], item["content"][0]["text"]) for item in given] == [
        ("assistant", "Hi Lee, your viewing is on Saturday."),
        ("user", "Can I bring my dog?"),
        ("assistant", "Yes, dogs are welcome."),
        ("user", "Great, see you then"),
    ]


async def test_a_reply_without_a_continuation_is_given_the_recorded_history(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    history = (Message("SM1", "assistant", "Hi Lee, your viewing is on Saturday.", "t1"),)
    reply = await writer.write(ask(None, input_text="Is it still on?", output_keys=("content",), history=history))
    given = (await fetch(control, f"/v1/responses/{reply.response_id}/input_items?order=asc"))["data"]
    assert [item["role"] for item in given] == ["assistant", "user"]
    assert reply.thread_id == reply.response_id


async def test_a_refusal_of_the_chained_request_other_than_not_found_is_not_asked_again(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    first = await writer.write(ask())
    await inject(control, status=400, body={"error": {"message": "bad", "type": "invalid_request_error", "code": "x"}})
    with pytest.raises(PermanentProviderError) as caught:
        await writer.write(ask(first.thread_id, output_keys=("content",)))
    assert caught.value.code == "x"
    assert len(await requests_to(control, "POST", "/v1/responses")) == 2


async def test_output_missing_a_key_is_permanent(writer: OpenAiWriter, control: aiohttp.ClientSession) -> None:
    await inject(control, status=200, body=response_body('{"1": "Hi Lee", "2": "Saturday"}'))
    with pytest.raises(PermanentProviderError) as caught:
        await writer.write(ask())
    assert caught.value.reason == "ai_output_invalid" and caught.value.code == "missing_keys"


async def test_output_that_is_not_a_json_object_is_permanent(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    await inject(control, status=200, body=response_body('["Hi Lee"]'))
    with pytest.raises(PermanentProviderError) as caught:
        await writer.write(ask())
    assert caught.value.reason == "ai_output_invalid"


async def test_output_text_joins_every_output_text_part_of_the_message_items(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    body = response_body("")
    body["output"] = [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": '{"1": "Hi Lee", ', "annotations": []},
                {"type": "refusal", "refusal": "ignored"},
                {"type": "output_text", "text": '"2": "Saturday", "3": "10am"}', "annotations": []},
            ],
        },
    ]
    await inject(control, status=200, body=body)
    result = await writer.write(ask())
    assert result.output == {"1": "Hi Lee", "2": "Saturday", "3": "10am"}
    assert (result.response_id, result.prompt_tokens, result.completion_tokens, result.total_tokens) == (
        "resp_injected",
        10,
        5,
        15,
    )


async def test_an_incomplete_response_is_permanent_with_its_reason(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    incomplete = response_body("", status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    await inject(control, status=200, body=incomplete)
    with pytest.raises(PermanentProviderError) as caught:
        await writer.write(ask())
    assert (caught.value.reason, caught.value.code) == ("ai_response_incomplete", "max_output_tokens")


async def test_a_response_failed_on_openais_side_is_transient(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    failed = response_body("", status="failed", output=[], error={"code": "server_error", "message": "oops"})
    await inject(control, status=200, body=failed)
    with pytest.raises(TransientProviderError) as caught:
        await writer.write(ask())
    assert (caught.value.reason, caught.value.code) == ("ai_response_failed", "server_error")


async def test_an_answer_that_is_not_a_response_object_is_permanent(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    await inject(control, status=200, body={"object": "list", "data": []})
    with pytest.raises(PermanentProviderError) as caught:
        await writer.write(ask())
    assert (caught.value.reason, caught.value.code) == ("ai_client_error", "invalid_response_body")


# ---- retries --------------------------------------------------------------------------------------


async def test_unavailable_is_retried_after_retry_after(
    writer: OpenAiWriter, control: aiohttp.ClientSession, clock: VirtualTime
) -> None:
    await inject(control, status=503, retry_after=1)
    result = await writer.write(ask())
    assert clock.slept == [1.0]  # the 1 s Retry-After, not the 0.05 s backoff
    assert set(result.output) == set(TEMPLATE_KEYS)
    assert len(await requests_to(control, "POST", "/v1/responses")) == 2


async def test_a_rate_limited_create_is_raised_at_once_with_its_retry_after(
    writer: OpenAiWriter, control: aiohttp.ClientSession, clock: VirtualTime
) -> None:
    # Not waited out in this worker slot: the pacing decorator holds the key off for the whole fleet.
    await inject(control, status=429, retry_after=1)
    with pytest.raises(ProviderRateLimited) as caught:
        await writer.write(ask())
    assert (caught.value.code, caught.value.retry_after_s) == ("rate_limit_exceeded", 1.0)
    assert clock.slept == []
    assert len(await requests_to(control, "POST", "/v1/responses")) == 1


async def test_a_rate_limited_background_poll_is_retried(
    writer: OpenAiWriter, control: aiohttp.ClientSession, clock: VirtualTime
) -> None:
    await steer(control, "/_sandbox/openai/background_latency", {"seconds": 0.5})
    await steer(
        control,
        "/_sandbox/faults",
        {"path_prefix": "/v1/responses/", "method": "GET", "status": 429, "count": 1, "retry_after": 0.3},
    )
    result = await writer.write(ask(background=True))  # the response is running: giving up would cancel it
    assert set(result.output) == set(TEMPLATE_KEYS)
    assert 0.3 in clock.slept


async def test_server_errors_are_retried_until_success(writer: OpenAiWriter, control: aiohttp.ClientSession) -> None:
    await inject(control, status=500, count=2)
    result = await writer.write(ask())
    assert set(result.output) == set(TEMPLATE_KEYS)
    assert len(await requests_to(control, "POST", "/v1/responses")) == 3


async def test_persistent_server_error_is_transient_after_max_attempts(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    await inject(control, status=500, count=100)
    with pytest.raises(TransientProviderError) as caught:
        await writer.write(ask())
    assert caught.value.retry_after_s is not None
    assert len(await requests_to(control, "POST", "/v1/responses")) == 4


async def test_retry_after_beyond_the_budget_fails_at_once_with_it(
    writer: OpenAiWriter, control: aiohttp.ClientSession, clock: VirtualTime
) -> None:
    await inject(control, status=503, retry_after=30)
    with pytest.raises(TransientProviderError) as caught:
        await writer.write(ask(timeout_s=5.0))
    assert clock.slept == []
    assert caught.value.retry_after_s == 30
    assert len(await requests_to(control, "POST", "/v1/responses")) == 1


async def test_unauthorized_is_permanent_and_not_retried(writer: OpenAiWriter, control: aiohttp.ClientSession) -> None:
    await inject(control, status=401)
    with pytest.raises(PermanentProviderError) as caught:
        await writer.write(ask())
    assert caught.value.code == "invalid_api_key"
    assert len(await requests_to(control, "POST", "/v1/responses")) == 1


async def test_unknown_thread_is_permanent(writer: OpenAiWriter, control: aiohttp.ClientSession) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        await writer.write(ask("conv_does_not_exist"))
    assert caught.value.code == "404"


async def test_insufficient_quota_is_permanent(writer: OpenAiWriter, control: aiohttp.ClientSession) -> None:
    quota = {"error": {"message": "quota", "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}
    await inject(control, status=429, body=quota)
    with pytest.raises(PermanentProviderError) as caught:
        await writer.write(ask())
    assert caught.value.code == "insufficient_quota"


async def test_hang_is_transient_within_the_timeout(
    writer: OpenAiWriter, control: aiohttp.ClientSession, clock: VirtualTime
) -> None:
    await inject(control, mode="hang")
    # The HTTP client would wait 10 s and the sandbox an hour: only the request's own timeout can end it first.
    async with asyncio.timeout(5):  # hang guard
        with pytest.raises(TransientProviderError) as caught:
            await writer.write(ask(timeout_s=0.5))
    assert (caught.value.reason, caught.value.code) == ("ai_timeout", "timeout")
    assert clock.slept == []  # given up, not retried
    assert len(await requests_to(control, "POST", "/v1/responses")) == 1


async def test_dropped_connection_is_retried(writer: OpenAiWriter, control: aiohttp.ClientSession) -> None:
    await inject(control, mode="reset")
    result = await writer.write(ask())
    assert set(result.output) == set(TEMPLATE_KEYS)


# ---- background mode ------------------------------------------------------------------------------


async def test_background_response_completes_by_polling(
    writer: OpenAiWriter, control: aiohttp.ClientSession, clock: VirtualTime
) -> None:
    await steer(control, "/_sandbox/openai/background_latency", {"seconds": 0.5})
    result = await writer.write(ask(background=True))
    # Polls after 0.1, 0.3 (pending) and 0.7 s: the first one after the 0.5 s generation finds it completed.
    assert clock.slept == [0.1, 0.2, 0.4]
    assert set(result.output) == set(TEMPLATE_KEYS) and result.total_tokens > 0
    assert len(await requests_to(control, "GET", f"/v1/responses/{result.response_id}")) == 3


async def test_background_timeout_cancels_the_response(
    writer: OpenAiWriter, control: aiohttp.ClientSession, clock: VirtualTime
) -> None:
    await steer(control, "/_sandbox/openai/background_latency", {"seconds": 30})
    clock.hold()  # the generation never ends: only the request's own timeout can end the write
    async with asyncio.timeout(5):  # hang guard
        with pytest.raises(TransientProviderError) as caught:
            await writer.write(ask(background=True, timeout_s=0.6))
    assert caught.value.reason == "ai_timeout"
    assert clock.slept == [0.1]  # cut short while waiting to poll
    [cancel] = await requests_to(control, "POST", "/v1/responses/")
    response_id = cancel["path"].split("/")[3]
    assert (await fetch(control, f"/v1/responses/{response_id}"))["status"] == "cancelled"


async def test_background_poll_that_keeps_failing_cancels_the_response(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    await steer(control, "/_sandbox/openai/background_latency", {"seconds": 30})
    await steer(
        control, "/_sandbox/faults", {"path_prefix": "/v1/responses/", "method": "GET", "status": 500, "count": 100}
    )
    with pytest.raises(TransientProviderError):
        await writer.write(ask(background=True))
    [cancel] = await requests_to(control, "POST", "/v1/responses/")
    response_id = cancel["path"].split("/")[3]
    await steer(control, "/_sandbox/reset", {})  # lift the GET faults to look
    assert (await fetch(control, f"/v1/responses/{response_id}"))["status"] == "cancelled"


async def test_failed_background_response_is_permanent_with_its_code(
    writer: OpenAiWriter, control: aiohttp.ClientSession
) -> None:
    await steer(control, "/_sandbox/openai/background_latency", {"seconds": 5})
    failed = response_body("", status="failed", output=[], error={"code": "invalid_prompt", "message": "no"})
    await steer(
        control, "/_sandbox/faults", {"path_prefix": "/v1/responses/", "method": "GET", "status": 200, "body": failed}
    )
    with pytest.raises(PermanentProviderError) as caught:
        await writer.write(ask(background=True))
    assert (caught.value.reason, caught.value.code) == ("ai_response_failed", "invalid_prompt")


async def test_concurrent_background_writes_interleave(
    writer: OpenAiWriter, control: aiohttp.ClientSession, clock: VirtualTime
) -> None:
    await steer(control, "/_sandbox/openai/background_latency", {"seconds": 0.5})
    clock.writers = 50  # the clock moves only while all 50 are asleep, waiting for their responses together

    async def write_one() -> AiResult:
        try:
            return await writer.write(ask(background=True))
        finally:
            clock.finished()

    async with asyncio.timeout(30):  # hang guard: a write that waited for another would stop the clock for good
        results = await asyncio.gather(*(write_one() for _ in range(50)))
    assert len({result.response_id for result in results}) == 50
    # One generation time plus polling (0.1 + 0.2 + 0.4 s), not 50 of them.
    assert clock.now == pytest.approx(0.7)
    assert Counter(clock.slept) == {0.1: 50, 0.2: 50, 0.4: 50}
    assert len(await requests_to(control, "GET", "/v1/responses/")) == 150


# ---- clients --------------------------------------------------------------------------------------


async def test_clients_per_api_key_share_one_connection_pool(
    writer: OpenAiWriter, http_client: httpx2.AsyncClient, control: aiohttp.ClientSession
) -> None:
    for api_key in ("sk-tenant-a", "sk-tenant-b"):
        assert set((await writer.write(ask(api_key=api_key))).output) == set(TEMPLATE_KEYS)
    clients = [writer._client_for(key) for key in ("sk-tenant-a", "sk-tenant-b", "sk-tenant-a")]
    assert clients[0] is clients[2] and clients[0] is not clients[1]
    assert all(client._client is http_client for client in clients)
