"""TwilioSender against the Twilio sandbox over real HTTP: what arrives, how failures classify, find_sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from twilio.http.async_http_client import AsyncTwilioHttpClient

from local_stack.sandbox_http import RunningServer, serve
from local_stack.twilio_sandbox import create_twilio_sandbox
from service.adapters.providers.twilio_client import build_async_http_client
from service.adapters.providers.twilio_sender import TwilioSender
from service.domain.provider_ports import (
    OutboundMessage,
    PermanentProviderError,
    ProviderRateLimited,
    SendOutcomeUnknown,
    TransientProviderError,
)

ACCOUNT_SID = "AC" + "1" * 32
AUTH_TOKEN = "sandbox-auth-token"
CREDENTIALS = {"twilio_account_sid": ACCOUNT_SID, "twilio_auth_token": AUTH_TOKEN}
COMPANY_NUMBER = "+447700900001"
RECIPIENT = "+447700900123"
TEMPLATE_SID = "HX" + "a" * 32
STATUS_CALLBACK = "https://hooks.example.com/twilio/status"


@pytest.fixture(scope="module")
async def sandbox() -> AsyncIterator[RunningServer]:
    server = await serve(create_twilio_sandbox({ACCOUNT_SID: AUTH_TOKEN}))
    assert server.runner.server is not None
    server.runner.server.handler_cancellation = True  # a client giving up on a hung request ends its handler
    yield server
    await server.close()


@pytest.fixture(scope="module")
async def http_client() -> AsyncIterator[AsyncTwilioHttpClient]:
    client = build_async_http_client(timeout_s=5.0, pool_size=16)
    yield client
    await client.close()


@pytest.fixture
async def control(sandbox: RunningServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=sandbox.url) as session:
        await post_json(session, "/_sandbox/reset", {})
        await post_json(session, "/_sandbox/twilio/reset", {})
        yield session


@pytest.fixture
def sender(sandbox: RunningServer, http_client: AsyncTwilioHttpClient) -> TwilioSender:
    return TwilioSender(http_client, sandbox.url, timeout_s=0.5)


async def post_json(control: aiohttp.ClientSession, path: str, payload: dict[str, Any]) -> Any:
    async with control.post(path, json=payload) as answer:
        assert answer.status == 200, await answer.text()
        return await answer.json()


async def created_messages(control: aiohttp.ClientSession) -> list[dict[str, Any]]:
    async with control.get("/_sandbox/twilio/messages") as answer:
        messages: list[dict[str, Any]] = await answer.json()
        return messages


def template(**changes: Any) -> OutboundMessage:
    message = OutboundMessage(
        channel="whatsapp",
        credentials=CREDENTIALS,
        sender=COMPANY_NUMBER,
        recipient=RECIPIENT,
        content_sid=TEMPLATE_SID,
        content_variables={"1": "Hi Lee", "2": "12 Acacia Avenue", "3": "Saturday 10am"},
        status_callback_url=STATUS_CALLBACK,
        reference="conv-1",
    )
    return replace(message, **changes)


def sms(body: str = "Your viewing is on Saturday at 10am.", **changes: Any) -> OutboundMessage:
    message = OutboundMessage(
        channel="sms", credentials=CREDENTIALS, sender=COMPANY_NUMBER, recipient=RECIPIENT, body=body
    )
    return replace(message, **changes)


# ---- what arrives ---------------------------------------------------------------------------------


async def test_whatsapp_template_arrives_with_prefixes_content_sid_and_variables(
    sender: TwilioSender, control: aiohttp.ClientSession
) -> None:
    sent = await sender.send(template())
    [created] = await created_messages(control)
    assert sent.provider_message_id == created["sid"] and sent.provider_message_id.startswith("SM")
    assert (created["to"], created["from"]) == (f"whatsapp:{RECIPIENT}", f"whatsapp:{COMPANY_NUMBER}")
    assert created["content_sid"] == TEMPLATE_SID
    assert created["content_variables"] == {"1": "Hi Lee", "2": "12 Acacia Avenue", "3": "Saturday 10am"}
    assert created["status_callback"] == STATUS_CALLBACK


async def test_whatsapp_reply_without_template_sends_the_body(
    sender: TwilioSender, control: aiohttp.ClientSession
) -> None:
    await sender.send(template(content_sid=None, content_variables=None, body="Saturday is still fine."))
    [created] = await created_messages(control)
    assert created["to"] == f"whatsapp:{RECIPIENT}" and created["content_sid"] is None
    assert created["body"] == "Saturday is still fine."


async def test_sms_sends_the_body_between_bare_numbers(sender: TwilioSender, control: aiohttp.ClientSession) -> None:
    sent = await sender.send(sms())
    [created] = await created_messages(control)
    assert (created["to"], created["from"], created["body"]) == (
        RECIPIENT,
        COMPANY_NUMBER,
        "Your viewing is on Saturday at 10am.",
    )
    assert sent.status == "queued"


async def test_sms_without_a_body_is_permanent_and_not_sent(
    sender: TwilioSender, control: aiohttp.ClientSession
) -> None:
    with pytest.raises(PermanentProviderError):
        await sender.send(sms(body=""))
    assert await created_messages(control) == []


# ---- failures -------------------------------------------------------------------------------------


async def test_invalid_recipient_is_permanent_21211(sender: TwilioSender, control: aiohttp.ClientSession) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        await sender.send(template(recipient="+12"))
    assert caught.value.code == "21211"


async def test_outside_the_24_hour_window_is_permanent_63016(
    sender: TwilioSender, control: aiohttp.ClientSession
) -> None:
    await post_json(control, "/_sandbox/twilio/recipients", {"number": RECIPIENT, "status": 400, "code": 63016})
    with pytest.raises(PermanentProviderError) as caught:
        await sender.send(template(content_sid=None, body="Saturday is still fine."))
    assert caught.value.code == "63016"


async def test_wrong_auth_token_is_permanent_20003(sender: TwilioSender, control: aiohttp.ClientSession) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        await sender.send(sms(credentials={**CREDENTIALS, "twilio_auth_token": "revoked"}))
    assert caught.value.code == "20003"


async def test_injected_503_is_transient_and_not_unknown(sender: TwilioSender, control: aiohttp.ClientSession) -> None:
    await post_json(control, "/_sandbox/faults", {"status": 503, "path_prefix": "/2010-04-01/"})
    with pytest.raises(TransientProviderError) as caught:
        await sender.send(sms())
    assert not isinstance(caught.value, SendOutcomeUnknown)


async def test_rate_limit_429_is_transient(sender: TwilioSender, control: aiohttp.ClientSession) -> None:
    await post_json(control, "/_sandbox/faults", {"status": 429, "path_prefix": "/2010-04-01/", "retry_after": 1})
    with pytest.raises(TransientProviderError) as caught:
        await sender.send(sms())
    assert not isinstance(caught.value, SendOutcomeUnknown)


async def test_a_sender_over_its_rate_is_a_rate_limited_failure_naming_20429(
    sender: TwilioSender, control: aiohttp.ClientSession
) -> None:
    await post_json(control, "/_sandbox/twilio/sender-limit", {"max_sends": 1, "window_s": 600})
    await sender.send(sms())
    with pytest.raises(ProviderRateLimited) as caught:
        await sender.send(sms())
    assert (caught.value.reason, caught.value.code) == ("twilio_rate_limited", "20429")


async def test_hang_is_send_outcome_unknown_within_the_timeout(
    sandbox: RunningServer, control: aiohttp.ClientSession
) -> None:
    await post_json(control, "/_sandbox/faults", {"mode": "hang", "path_prefix": "/2010-04-01/"})
    # The HTTP client would wait a minute and the sandbox an hour: only the sender's own 0.5 s timeout ends it first.
    patient = build_async_http_client(timeout_s=60.0, pool_size=1)
    try:
        async with asyncio.timeout(5):  # hang guard
            with pytest.raises(SendOutcomeUnknown) as caught:
                await TwilioSender(patient, sandbox.url, timeout_s=0.5).send(sms())
    finally:
        await patient.close()
    assert (caught.value.reason, caught.value.code) == ("twilio_outcome_unknown", "TimeoutError")
    assert await created_messages(control) == []


async def test_dropped_connection_is_send_outcome_unknown(sender: TwilioSender, control: aiohttp.ClientSession) -> None:
    await post_json(control, "/_sandbox/faults", {"mode": "reset", "path_prefix": "/2010-04-01/"})
    with pytest.raises(SendOutcomeUnknown):
        await sender.send(sms())


async def test_unreachable_twilio_is_transient_and_not_unknown(http_client: AsyncTwilioHttpClient) -> None:
    closed = await serve(create_twilio_sandbox())
    url = closed.url
    await closed.close()
    with pytest.raises(TransientProviderError) as caught:
        await TwilioSender(http_client, url, timeout_s=2.0).send(sms())
    assert not isinstance(caught.value, SendOutcomeUnknown)


# ---- find_sent ------------------------------------------------------------------------------------


async def test_find_sent_finds_an_earlier_template_send(sender: TwilioSender, control: aiohttp.ClientSession) -> None:
    since = time.time()
    sent = await sender.send(template())
    found = await sender.find_sent(template(), since)
    assert found is not None and found.provider_message_id == sent.provider_message_id


async def test_find_sent_finds_an_earlier_sms_by_its_body(sender: TwilioSender, control: aiohttp.ClientSession) -> None:
    since = time.time()
    sent = await sender.send(sms("first"))
    await sender.send(sms("second"))
    found = await sender.find_sent(sms("first"), since)
    assert found is not None and found.provider_message_id == sent.provider_message_id


async def test_find_sent_returns_none_for_a_message_never_sent(
    sender: TwilioSender, control: aiohttp.ClientSession
) -> None:
    await sender.send(template(recipient="+447700900777"))
    assert await sender.find_sent(template(), time.time()) is None


async def test_find_sent_ignores_a_different_body_to_the_same_recipient(
    sender: TwilioSender, control: aiohttp.ClientSession
) -> None:
    await sender.send(sms("an earlier reply"))
    assert await sender.find_sent(sms("this reply"), time.time()) is None


async def test_find_sent_ignores_messages_sent_before_since(
    sender: TwilioSender, control: aiohttp.ClientSession
) -> None:
    await sender.send(template())
    assert await sender.find_sent(template(), time.time() + 60) is None


async def test_find_sent_with_revoked_credentials_is_permanent(
    sender: TwilioSender, control: aiohttp.ClientSession
) -> None:
    with pytest.raises(PermanentProviderError):
        await sender.find_sent(sms(credentials={**CREDENTIALS, "twilio_auth_token": "revoked"}), time.time())


async def test_find_sent_during_an_outage_is_transient(sender: TwilioSender, control: aiohttp.ClientSession) -> None:
    await post_json(control, "/_sandbox/faults", {"status": 500, "path_prefix": "/2010-04-01/"})
    with pytest.raises(TransientProviderError):
        await sender.find_sent(sms(), time.time())


# ---- clients --------------------------------------------------------------------------------------


async def test_clients_are_cached_per_account_on_the_shared_http_client(
    sender: TwilioSender, http_client: AsyncTwilioHttpClient
) -> None:
    other = {"twilio_account_sid": "AC" + "2" * 32, "twilio_auth_token": "other"}
    first, second, again = (sender._client_for(c) for c in (CREDENTIALS, other, CREDENTIALS))
    assert first is again and first is not second
    assert first.http_client is http_client and second.http_client is http_client
