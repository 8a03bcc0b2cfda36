"""The OpenAI sandbox, driven only through the real `openai.AsyncOpenAI` SDK (and HTTP for `/_sandbox` control)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.conversations import ConversationItem, Message
from openai.types.responses import Response, ResponseFormatTextJSONSchemaConfigParam, ResponseInputMessageItem
from pydantic import BaseModel

from local_stack.openai_sandbox import create_openai_sandbox
from local_stack.sandbox_http import serve

MODEL = "gpt-sandbox"
TERMINAL = ("completed", "failed", "cancelled", "incomplete")
LEE_CONTEXT = json.dumps({"recipient_data": {"recipient_first_name": "Lee", "recipient_last_name": "Hayton"}})
TEMPLATE_FORMAT: ResponseFormatTextJSONSchemaConfigParam = {
    "type": "json_schema",
    "name": "template_variables",
    "strict": True,
    "schema": {
        "type": "object",
        "properties": {"1": {"type": "string"}, "2": {"type": "string"}},
        "required": ["1", "2"],
        "additionalProperties": False,
    },
}


@dataclass(eq=False)
class HeldTimer:
    """One background generation's end, as the sandbox scheduled it."""

    delay_s: float
    callback: Callable[[], None]
    cancelled: bool = False
    fired: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class HeldTimers:
    """The sandbox's background timers, held until the test lets the generation time pass (`fire_all`)."""

    scheduled: list[HeldTimer] = field(default_factory=list)

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> HeldTimer:
        timer = HeldTimer(delay_s, callback)
        self.scheduled.append(timer)
        return timer

    def delays(self) -> list[float]:
        return [timer.delay_s for timer in self.scheduled]

    def fire_all(self) -> None:
        """Every generation time is over: run each timer that was not called off, once."""
        for timer in self.scheduled:
            if not timer.cancelled and not timer.fired:
                timer.fired = True
                timer.callback()


@pytest.fixture
async def sandbox_url() -> AsyncIterator[str]:
    server = await serve(create_openai_sandbox(), "127.0.0.1", 0)
    yield server.url
    await server.close()


@pytest.fixture
def timers() -> HeldTimers:
    return HeldTimers()


@pytest.fixture
async def held_url(timers: HeldTimers) -> AsyncIterator[str]:
    """A sandbox whose background generations end only when the test fires `timers`."""
    server = await serve(create_openai_sandbox(call_later=timers.call_later), "127.0.0.1", 0)
    yield server.url
    await server.close()


def sdk_client(sandbox_url: str, max_retries: int = 0) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{sandbox_url}/v1", api_key="sk-local", max_retries=max_retries)


@pytest.fixture
async def client(sandbox_url: str) -> AsyncIterator[AsyncOpenAI]:
    async with sdk_client(sandbox_url) as sdk:
        yield sdk


@pytest.fixture
async def held_client(held_url: str) -> AsyncIterator[AsyncOpenAI]:
    async with sdk_client(held_url) as sdk:
        yield sdk


async def steer(sandbox_url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """POST (or GET, without a body) a `/_sandbox` control route."""
    async with aiohttp.ClientSession() as session:
        method = "POST" if body is not None else "GET"
        async with session.request(method, f"{sandbox_url}/_sandbox/{path}", json=body) as answer:
            assert answer.status == 200
            return await answer.json()


async def poll_until_terminal(client: AsyncOpenAI, response_id: str, timeout_s: float = 5.0) -> Response:
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.responses.retrieve(response_id)
        if response.status in TERMINAL or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.02)


def message(item: ConversationItem) -> Message:
    assert isinstance(item, Message)
    return item


def message_text(item: ConversationItem) -> str:
    return "".join(getattr(part, "text", "") for part in message(item).content)


async def template_response(client: AsyncOpenAI, conversation_id: str | None = None) -> Response:
    return await client.responses.create(
        model=MODEL,
        instructions="Write the WhatsApp template variables.",
        input=LEE_CONTEXT,
        text={"format": TEMPLATE_FORMAT},
        conversation=conversation_id or openai.omit,
    )


async def test_structured_response_has_exactly_the_schema_keys(client: AsyncOpenAI) -> None:
    conversation = await client.conversations.create()
    response = await template_response(client, conversation.id)
    assert response.status == "completed"
    assert response.conversation is not None and response.conversation.id == conversation.id
    assert set(json.loads(response.output_text)) == {"1", "2"}


async def test_structured_response_greets_the_first_name_in_the_input(client: AsyncOpenAI) -> None:
    response = await template_response(client)
    assert json.loads(response.output_text)["1"] == "Hi Lee"


async def test_response_usage_is_filled(client: AsyncOpenAI) -> None:
    response = await template_response(client)
    assert response.usage is not None
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.usage.input_tokens_details.cached_tokens == 0


async def test_conversation_items_hold_the_input_and_the_output(client: AsyncOpenAI) -> None:
    conversation = await client.conversations.create()
    response = await template_response(client, conversation.id)
    items = await client.conversations.items.list(conversation.id, order="asc")
    user, assistant = (message(item) for item in items.data)
    assert user.role == "user" and message_text(user) == LEE_CONTEXT
    assert assistant.role == "assistant" and message_text(assistant) == response.output_text
    assert assistant.id == response.output[0].id


async def test_conversation_items_list_newest_first_by_default(client: AsyncOpenAI) -> None:
    conversation = await client.conversations.create(items=[{"role": "user", "content": "first"}])
    await client.responses.create(model=MODEL, input="second", conversation=conversation.id)
    items = await client.conversations.items.list(conversation.id)
    assert [message(item).role for item in items.data] == ["assistant", "user", "user"]


async def test_conversation_items_page_through_every_item(client: AsyncOpenAI) -> None:
    conversation = await client.conversations.create()
    for turn in range(3):
        await client.responses.create(model=MODEL, input=f"turn {turn}", conversation=conversation.id)
    pages = client.conversations.items.list(conversation.id, order="asc", limit=4)
    texts = [message_text(item) async for item in pages]
    assert len(texts) == 6 and texts[0::2] == ["turn 0", "turn 1", "turn 2"]


async def test_reply_in_a_conversation_still_greets_the_first_name(client: AsyncOpenAI) -> None:
    conversation = await client.conversations.create()
    await template_response(client, conversation.id)
    reply = await client.responses.create(
        model=MODEL,
        instructions="Answer the customer.",
        input="Is Saturday still fine?",
        conversation={"id": conversation.id},
        text={"format": {"type": "json_object"}},
    )
    content = json.loads(reply.output_text)["content"]
    assert content.startswith("Hi Lee") and "Is Saturday still fine?" in content


# ---- previous_response_id ---------------------------------------------------------------------------------------


async def reply_after(client: AsyncOpenAI, previous_id: str, text: str = "Is Saturday still fine?") -> Response:
    return await client.responses.create(
        model=MODEL,
        instructions="Answer the customer.",
        input=text,
        previous_response_id=previous_id,
        text={"format": {"type": "json_object"}},
    )


async def test_a_chained_response_sees_the_previous_responses(client: AsyncOpenAI) -> None:
    first = await template_response(client)
    reply = await reply_after(client, first.id)
    assert reply.previous_response_id == first.id and reply.conversation is None
    content = json.loads(reply.output_text)["content"]
    assert content.startswith("Hi Lee") and "Is Saturday still fine?" in content  # the name came from `first`
    assert first.usage is not None and reply.usage is not None
    assert reply.usage.input_tokens > first.usage.total_tokens  # the chain's input and output count as input


async def test_a_chain_reaches_back_through_every_stored_response(client: AsyncOpenAI) -> None:
    first = await template_response(client)
    second = await reply_after(client, first.id, "When is it?")
    third = await reply_after(client, second.id, "Thanks")
    assert json.loads(third.output_text)["content"].startswith("Hi Lee")


async def test_a_response_lists_only_its_own_input_items(client: AsyncOpenAI) -> None:
    first = await template_response(client)
    reply = await reply_after(client, first.id)
    items = await client.responses.input_items.list(reply.id, order="asc")
    [item] = items.data
    assert isinstance(item, ResponseInputMessageItem) and item.role == "user"
    assert [part.text for part in item.content if part.type == "input_text"] == ["Is Saturday still fine?"]


async def test_an_unknown_previous_response_is_a_bad_request_named_previous_response_not_found(
    client: AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await reply_after(client, "resp_missing")
    assert (raised.value.code, raised.value.param) == ("previous_response_not_found", "previous_response_id")
    assert raised.value.message.endswith("Previous response with id 'resp_missing' not found.")


async def test_a_deleted_or_unstored_response_cannot_be_chained_from(client: AsyncOpenAI) -> None:
    deleted = await template_response(client)
    await client.responses.delete(deleted.id)
    unstored = await client.responses.create(model=MODEL, input="hi", store=False)
    for previous in (deleted, unstored):
        with pytest.raises(openai.BadRequestError) as raised:
            await reply_after(client, previous.id)
        assert raised.value.code == "previous_response_not_found"


async def test_previous_response_and_conversation_together_are_a_bad_request(client: AsyncOpenAI) -> None:
    conversation = await client.conversations.create()
    first = await template_response(client)
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(
            model=MODEL, input="hi", previous_response_id=first.id, conversation=conversation.id
        )
    assert raised.value.code == "mutually_exclusive_parameters"


async def test_json_object_format_answers_with_a_content_key(client: AsyncOpenAI) -> None:
    response = await client.responses.create(model=MODEL, input="hello", text={"format": {"type": "json_object"}})
    assert list(json.loads(response.output_text)) == ["content"]


async def test_json_object_format_uses_keys_the_instructions_name(client: AsyncOpenAI) -> None:
    response = await client.responses.create(
        model=MODEL,
        instructions='Reply as JSON like {"subject": "...", "body": "..."}.',
        input="hello",
        text={"format": {"type": "json_object"}},
    )
    assert list(json.loads(response.output_text)) == ["subject", "body"]


async def test_plain_text_response_quotes_the_input(client: AsyncOpenAI) -> None:
    response = await client.responses.create(model=MODEL, input="My name is Ann, when can I view it?")
    assert response.output_text == "Hi Ann, the sandbox assistant read: My name is Ann, when can I view it?"


async def test_responses_parse_fills_a_pydantic_model(client: AsyncOpenAI) -> None:
    class Greeting(BaseModel):
        first_name: str
        greeting: str
        follow_up_days: int

    parsed = await client.responses.parse(model=MODEL, input=LEE_CONTEXT, text_format=Greeting)
    assert parsed.output_parsed == Greeting(first_name="Lee", greeting="Hi Lee", follow_up_days=0)


async def test_request_without_api_key_is_an_authentication_error(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        await client.responses.create(model=MODEL, input="hi", extra_headers={"Authorization": openai.omit})
    assert raised.value.type == "invalid_request_error"


async def test_unknown_conversation_is_not_found(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model=MODEL, input="hi", conversation="conv_missing")


async def test_deleted_conversation_is_not_found(client: AsyncOpenAI) -> None:
    conversation = await client.conversations.create(metadata={"thread": "t-1"})
    deleted = await client.conversations.delete(conversation.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await client.conversations.retrieve(conversation.id)


async def test_deleted_response_is_not_found(client: AsyncOpenAI) -> None:
    response = await client.responses.create(model=MODEL, input="hi")
    await client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)


async def test_json_schema_format_without_a_schema_is_a_bad_request(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await client.responses.create(
            model=MODEL, input="hi", extra_body={"text": {"format": {"type": "json_schema", "name": "x"}}}
        )
    assert raised.value.param == "text.format.schema"


async def test_injected_429_with_retry_after_is_retried_until_success(sandbox_url: str) -> None:
    fault = {"status": 429, "count": 2, "retry_after": 0.2, "path_prefix": "/v1/responses"}
    await steer(sandbox_url, "faults", fault)
    async with sdk_client(sandbox_url, max_retries=2) as retrying:
        response = await retrying.responses.create(model=MODEL, input="hi")
    assert response.status == "completed"
    creates = [r for r in await steer(sandbox_url, "requests") if r["path"] == "/v1/responses"]
    assert len(creates) == 3


async def test_injected_500_without_retries_raises_internal_server_error(sandbox_url: str, client: AsyncOpenAI) -> None:
    await steer(sandbox_url, "faults", {"status": 500, "count": 1, "path_prefix": "/v1/responses"})
    with pytest.raises(openai.InternalServerError):
        await client.responses.create(model=MODEL, input="hi")


async def test_injected_fault_without_a_body_answers_in_openai_error_shape(
    sandbox_url: str, client: AsyncOpenAI
) -> None:
    await steer(sandbox_url, "faults", {"status": 429, "count": 1, "path_prefix": "/v1/conversations"})
    with pytest.raises(openai.RateLimitError) as raised:
        await client.conversations.create()
    assert raised.value.body == {
        "message": "sandbox injected fault 429",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }


async def test_background_response_goes_from_queued_to_completed(sandbox_url: str, client: AsyncOpenAI) -> None:
    await steer(sandbox_url, "latency", {"seconds": 0.2})
    created = await client.responses.create(model=MODEL, input="hi", background=True)
    assert created.status == "queued" and created.output == []
    finished = await poll_until_terminal(client, created.id)
    assert finished.status == "completed"
    assert finished.output_text.startswith("Hi there")


async def test_background_create_and_retrieve_skip_the_latency(
    held_url: str, held_client: AsyncOpenAI, timers: HeldTimers
) -> None:
    # A request that served the latency would hold this test for a minute; the guard only catches that hang.
    await steer(held_url, "latency", {"seconds": 60.0})
    async with asyncio.timeout(10):
        created = await held_client.responses.create(model=MODEL, input="hi", background=True)
        polled = await held_client.responses.retrieve(created.id)
    assert (created.status, polled.status) == ("queued", "in_progress")
    assert timers.delays() == [60.0]  # the generation takes the latency instead
    timers.fire_all()
    finished = await held_client.responses.retrieve(created.id)
    assert finished.status == "completed" and finished.output_text.startswith("Hi there")


async def test_background_generation_time_can_be_set_apart_from_the_latency(
    held_url: str, held_client: AsyncOpenAI, timers: HeldTimers
) -> None:
    await steer(held_url, "latency", {"seconds": 0.2})
    await steer(held_url, "openai/background_latency", {"seconds": 5.0})
    created = await held_client.responses.create(model=MODEL, input="hi", background=True)
    assert timers.delays() == [5.0]
    assert (await held_client.responses.retrieve(created.id)).status == "in_progress"


async def test_cancel_stops_a_background_response(held_client: AsyncOpenAI, timers: HeldTimers) -> None:
    created = await held_client.responses.create(model=MODEL, input="hi", background=True)
    cancelled = await held_client.responses.cancel(created.id)
    [generation] = timers.scheduled
    assert generation.cancelled
    timers.fire_all()  # the generation time passes
    later = await held_client.responses.retrieve(created.id)
    assert cancelled.status == "cancelled"
    assert later.status == "cancelled" and later.output == []


async def test_cancel_of_a_foreground_response_is_a_bad_request(client: AsyncOpenAI) -> None:
    response = await client.responses.create(model=MODEL, input="hi")
    with pytest.raises(openai.BadRequestError):
        await client.responses.cancel(response.id)


async def test_200_concurrent_requests_overlap_their_latency(sandbox_url: str, client: AsyncOpenAI) -> None:
    await steer(sandbox_url, "latency", {"seconds": 0.5})
    responses = await asyncio.gather(*(client.responses.create(model=MODEL, input=f"n{i}") for i in range(200)))
    assert all(response.status == "completed" for response in responses)
    stats = await steer(sandbox_url, "openai/stats")
    assert (stats["peak_in_flight"], stats["in_flight"]) == (200, 0)  # all 200 were in their latency at once


async def test_stats_count_created_objects_and_peak_in_flight(sandbox_url: str, client: AsyncOpenAI) -> None:
    await steer(sandbox_url, "latency", {"seconds": 0.2})
    conversation = await client.conversations.create()
    await asyncio.gather(*(client.responses.create(model=MODEL, input="hi") for _ in range(5)))
    await client.responses.create(model=MODEL, input="hi", conversation=conversation.id)
    stats = await steer(sandbox_url, "openai/stats")
    assert stats == {"responses_created": 6, "conversations_created": 1, "in_flight": 0, "peak_in_flight": 5}


async def test_openai_reset_forgets_objects_and_counters(sandbox_url: str, client: AsyncOpenAI) -> None:
    response = await client.responses.create(model=MODEL, input="hi")
    await steer(sandbox_url, "openai/reset", {})
    stats = await steer(sandbox_url, "openai/stats")
    assert stats["responses_created"] == 0
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
