"""The Twilio sandbox driven through the real twilio SDK (and plain aiohttp for `/_sandbox` controls)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import RequestValidator

from local_stack.sandbox_http import RunningServer, serve
from local_stack.twilio_sandbox import create_twilio_sandbox
from service.adapters.providers.twilio_client import build_async_http_client, build_twilio_client

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "sandbox-auth-token"
OTHER_ACCOUNT_SID = "AC" + "2" * 32
OTHER_AUTH_TOKEN = "other-auth-token"
WHATSAPP_FROM = "whatsapp:+447700900001"
SMS_FROM = "+447700900002"
TEMPLATE_SID = "HX" + "a" * 32


@dataclass
class Webhook:
    url: str
    params: dict[str, str]
    signature: str


@dataclass
class Receiver:
    """A small aiohttp server that records every webhook posted to it."""

    url: str
    received: asyncio.Queue[Webhook] = field(default_factory=asyncio.Queue)

    async def next(self, timeout_s: float = 5.0) -> Webhook:
        async with asyncio.timeout(timeout_s):
            return await self.received.get()


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningServer]:
    server = await serve(create_twilio_sandbox({ACCOUNT_SID: AUTH_TOKEN, OTHER_ACCOUNT_SID: OTHER_AUTH_TOKEN}))
    yield server
    await server.close()


@pytest.fixture
async def http_client() -> AsyncIterator[AsyncTwilioHttpClient]:
    client = build_async_http_client(timeout_s=5.0, pool_size=16)
    yield client
    await client.close()


@pytest.fixture
def twilio(sandbox: RunningServer, http_client: AsyncTwilioHttpClient) -> Any:
    return build_twilio_client(ACCOUNT_SID, AUTH_TOKEN, base_url=sandbox.url, http_client=http_client)


@pytest.fixture
async def control(sandbox: RunningServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=sandbox.url) as session:
        yield session


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    received: asyncio.Queue[Webhook] = asyncio.Queue()

    async def record(request: web.Request) -> web.Response:
        form = await request.post()
        params = {key: str(value) for key, value in form.items()}
        await received.put(Webhook(str(request.url), params, request.headers.get("X-Twilio-Signature", "")))
        return web.Response(text="<Response/>", content_type="text/xml")

    app = web.Application()
    app.router.add_post("/{tail:.*}", record)
    server = await serve(app)
    yield Receiver(server.url, received)
    await server.close()


async def post_json(control: aiohttp.ClientSession, path: str, payload: dict[str, Any]) -> Any:
    async with control.post(path, json=payload) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def get_json(control: aiohttp.ClientSession, path: str) -> Any:
    async with control.get(path) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def send_sms(twilio: Any, to: str, body: str = "hello", **extra: Any) -> Any:
    return await twilio.messages.create_async(to=to, from_=SMS_FROM, body=body, **extra)


async def wait_for_stat(control: aiohttp.ClientSession, name: str, at_least: int) -> dict[str, Any]:
    async with asyncio.timeout(5):
        while True:
            stats: dict[str, Any] = await get_json(control, "/_sandbox/twilio/stats")
            if stats[name] >= at_least:
                return stats
            await asyncio.sleep(0.02)


def is_valid_signature(webhook: Webhook, auth_token: str) -> bool:
    return bool(RequestValidator(auth_token).validate(webhook.url, webhook.params, webhook.signature))


async def test_whatsapp_template_send_arrives_with_both_whatsapp_prefixes(
    twilio: Any, control: aiohttp.ClientSession
) -> None:
    message = await twilio.messages.create_async(
        to="whatsapp:+447700900123",
        from_=WHATSAPP_FROM,
        content_sid=TEMPLATE_SID,
        content_variables=json.dumps({"1": "Alice", "2": "Tuesday"}),
    )

    assert message.sid.startswith("SM") and len(message.sid) == 34
    assert (message.to, message.from_, message.status) == ("whatsapp:+447700900123", WHATSAPP_FROM, "queued")
    assert message.body == f"template {TEMPLATE_SID}: {{1: Alice, 2: Tuesday}}"
    [recorded] = await get_json(control, "/_sandbox/twilio/messages")
    assert recorded["to"] == "whatsapp:+447700900123" and recorded["from"] == WHATSAPP_FROM
    assert recorded["content_sid"] == TEMPLATE_SID
    assert recorded["content_variables"] == {"1": "Alice", "2": "Tuesday"}


async def test_sms_body_send_returns_a_queued_message_resource(twilio: Any) -> None:
    message = await send_sms(twilio, "+447700900124", body="Your viewing is confirmed")

    assert message.body == "Your viewing is confirmed"
    assert (message.status, message.direction, message.num_segments) == ("queued", "outbound-api", "1")
    assert message.account_sid == ACCOUNT_SID and message.price is None and message.error_code is None
    assert message.date_created is not None and message.date_created.tzinfo is not None
    assert message.uri == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{message.sid}.json"


async def test_invalid_to_raises_21211_with_status_400(twilio: Any) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await send_sms(twilio, "+44 7700")

    assert (caught.value.code, caught.value.status) == (21211, 400)


async def test_mismatched_channel_raises_21910(twilio: Any) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await twilio.messages.create_async(to="+447700900125", from_=WHATSAPP_FROM, body="hi")

    assert (caught.value.code, caught.value.status) == (21910, 400)


async def test_message_without_body_or_content_raises_21619(twilio: Any) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await twilio.messages.create_async(to="+447700900126", from_=SMS_FROM)

    assert (caught.value.code, caught.value.status) == (21619, 400)


async def test_content_variables_that_are_not_a_json_object_raise_21656(twilio: Any) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await twilio.messages.create_async(
            to="whatsapp:+447700900127", from_=WHATSAPP_FROM, content_sid=TEMPLATE_SID, content_variables="[1, 2]"
        )

    assert (caught.value.code, caught.value.status) == (21656, 400)


async def test_programmed_recipient_failure_raises_its_code(twilio: Any, control: aiohttp.ClientSession) -> None:
    await post_json(
        control,
        "/_sandbox/twilio/recipients",
        {"number": "+447700900999", "status": 400, "code": 63016, "message": "outside the 24h window"},
    )

    with pytest.raises(TwilioRestException) as caught:
        await twilio.messages.create_async(to="whatsapp:+447700900999", from_=WHATSAPP_FROM, content_sid=TEMPLATE_SID)

    assert (caught.value.code, caught.value.status) == (63016, 400)
    assert "outside the 24h window" in caught.value.msg


async def test_a_sender_past_its_limit_is_refused_with_429_and_20429(
    twilio: Any, control: aiohttp.ClientSession
) -> None:
    await post_json(control, "/_sandbox/twilio/sender-limit", {"max_sends": 2, "window_s": 600})
    for tel in ("+447700900131", "+447700900132"):
        await twilio.messages.create_async(to=tel, from_=SMS_FROM, body="hi")

    with pytest.raises(TwilioRestException) as caught:
        await twilio.messages.create_async(to="+447700900133", from_=SMS_FROM, body="hi")

    assert (caught.value.code, caught.value.status) == (20429, 429)


async def test_a_sender_s_limit_leaves_other_senders_alone(twilio: Any, control: aiohttp.ClientSession) -> None:
    await post_json(control, "/_sandbox/twilio/sender-limit", {"max_sends": 1, "window_s": 600})
    await twilio.messages.create_async(to="+447700900131", from_=SMS_FROM, body="hi")

    message = await twilio.messages.create_async(to="+447700900132", from_="+447700900003", body="hi")

    assert message.status == "queued"


async def test_wrong_auth_token_is_rejected_with_401_and_20003(
    sandbox: RunningServer, http_client: AsyncTwilioHttpClient
) -> None:
    impostor = build_twilio_client(ACCOUNT_SID, "wrong-token", base_url=sandbox.url, http_client=http_client)

    with pytest.raises(TwilioRestException) as caught:
        await send_sms(impostor, "+447700900128")

    assert (caught.value.code, caught.value.status) == (20003, 401)


async def test_one_http_client_serves_clients_for_two_accounts(
    sandbox: RunningServer, http_client: AsyncTwilioHttpClient
) -> None:
    first = build_twilio_client(ACCOUNT_SID, AUTH_TOKEN, base_url=sandbox.url, http_client=http_client)
    second = build_twilio_client(OTHER_ACCOUNT_SID, OTHER_AUTH_TOKEN, base_url=sandbox.url, http_client=http_client)

    sent = await asyncio.gather(send_sms(first, "+447700900129"), send_sms(second, "+447700900129"))

    assert [m.account_sid for m in sent] == [ACCOUNT_SID, OTHER_ACCOUNT_SID]


async def test_fetch_returns_the_sent_message(twilio: Any) -> None:
    sent = await send_sms(twilio, "+447700900130", body="fetch me")

    fetched = await twilio.api.v2010.accounts(ACCOUNT_SID).messages(sent.sid).fetch_async()

    assert (fetched.sid, fetched.body, fetched.to) == (sent.sid, "fetch me", "+447700900130")


async def test_fetch_of_an_unknown_sid_raises_20404(twilio: Any) -> None:
    with pytest.raises(TwilioRestException) as caught:
        await twilio.api.v2010.accounts(ACCOUNT_SID).messages("SM" + "0" * 32).fetch_async()

    assert (caught.value.code, caught.value.status) == (20404, 404)


async def test_list_by_to_finds_only_that_recipients_messages(twilio: Any) -> None:
    wanted = await send_sms(twilio, "+447700900131", body="for 131")
    await send_sms(twilio, "+447700900132", body="for 132")

    found = await twilio.messages.list_async(to="+447700900131", limit=20)

    assert [m.sid for m in found] == [wanted.sid]


async def test_list_pages_through_next_page_uri_newest_first(twilio: Any) -> None:
    sent = [await send_sms(twilio, "+447700900133", body=f"message {i}") for i in range(5)]

    found = await twilio.messages.list_async(to="+447700900133", page_size=2)

    assert [m.sid for m in found] == [m.sid for m in reversed(sent)]


async def test_list_date_sent_after_a_future_moment_finds_nothing(twilio: Any) -> None:
    await send_sms(twilio, "+447700900134")

    recent = await twilio.messages.list_async(
        to="+447700900134", date_sent_after=datetime.now(UTC) - timedelta(minutes=5)
    )
    future = await twilio.messages.list_async(
        to="+447700900134", date_sent_after=datetime.now(UTC) + timedelta(minutes=5)
    )

    assert (len(recent), len(future)) == (1, 0)


async def test_injected_503_surfaces_as_twilio_rest_exception(twilio: Any, control: aiohttp.ClientSession) -> None:
    await post_json(control, "/_sandbox/faults", {"status": 503, "count": 1, "path_prefix": "/2010-04-01/"})

    with pytest.raises(TwilioRestException) as caught:
        await send_sms(twilio, "+447700900135")

    assert caught.value.status == 503


async def test_http_client_timeout_bounds_a_slow_request(
    sandbox: RunningServer, control: aiohttp.ClientSession
) -> None:
    await post_json(control, "/_sandbox/latency", {"seconds": 1.0})
    impatient = build_async_http_client(timeout_s=0.2, pool_size=1)
    try:
        twilio = build_twilio_client(ACCOUNT_SID, AUTH_TOKEN, base_url=sandbox.url, http_client=impatient)
        with pytest.raises(TimeoutError):
            await send_sms(twilio, "+447700900136")
    finally:
        await impatient.close()


async def test_status_callbacks_arrive_signed_sent_then_delivered(
    twilio: Any, control: aiohttp.ClientSession, receiver: Receiver
) -> None:
    await post_json(control, "/_sandbox/twilio/callbacks", {"enabled": True})
    callback_url = f"{receiver.url}/twilio/status?tenant=demo"

    message = await send_sms(twilio, "+447700900137", status_callback=callback_url)

    first, second = await receiver.next(), await receiver.next()
    assert [first.params["MessageStatus"], second.params["MessageStatus"]] == ["sent", "delivered"]
    assert first.url == callback_url
    assert first.params["MessageSid"] == message.sid and first.params["AccountSid"] == ACCOUNT_SID
    assert first.params["To"] == "+447700900137" and first.params["From"] == SMS_FROM
    assert is_valid_signature(first, AUTH_TOKEN) and is_valid_signature(second, AUTH_TOKEN)


async def test_undeliverable_callback_is_counted_and_the_sandbox_keeps_serving(
    twilio: Any, control: aiohttp.ClientSession
) -> None:
    await post_json(control, "/_sandbox/twilio/callbacks", {"enabled": True})
    await send_sms(twilio, "+447700900138", status_callback="http://127.0.0.1:9/nobody-listens")

    await wait_for_stat(control, "callbacks_failed", 2)

    assert (await send_sms(twilio, "+447700900138")).status == "queued"


async def test_inbound_simulation_posts_a_validly_signed_webhook(
    control: aiohttp.ClientSession, receiver: Receiver
) -> None:
    url = f"{receiver.url}/twilio/inbound"

    answer = await post_json(
        control,
        "/_sandbox/twilio/inbound",
        {
            "url": url,
            "from": "whatsapp:+447700900139",
            "to": WHATSAPP_FROM,
            "body": "Yes please",
            "account_sid": ACCOUNT_SID,
        },
    )

    webhook = await receiver.next()
    assert (answer["status"], answer["body"]) == (200, "<Response/>")
    assert webhook.params["Body"] == "Yes please" and webhook.params["From"] == "whatsapp:+447700900139"
    assert webhook.params["MessageSid"] == answer["message_sid"] and webhook.params["MessageSid"].startswith("SM")
    assert webhook.params["NumMedia"] == "0" and webhook.params["AccountSid"] == ACCOUNT_SID
    assert is_valid_signature(webhook, AUTH_TOKEN)


async def test_stats_report_peak_concurrent_api_requests(twilio: Any, control: aiohttp.ClientSession) -> None:
    await post_json(control, "/_sandbox/latency", {"seconds": 0.2})

    await asyncio.gather(*(send_sms(twilio, "+447700900140") for _ in range(10)))

    stats = await get_json(control, "/_sandbox/twilio/stats")
    assert (stats["created"], stats["peak_in_flight"], stats["in_flight"]) == (10, 10, 0)
