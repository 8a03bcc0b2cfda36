"""SendGridSender against the SendGrid sandbox over real HTTP: the mail that arrives and how failures classify."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from local_stack.sandbox_http import RunningServer, serve
from local_stack.sendgrid_sandbox import create_sendgrid_sandbox
from service.adapters.providers.sendgrid_sender import SendGridSender
from service.domain.provider_ports import (
    OutboundMessage,
    PermanentProviderError,
    SendOutcomeUnknown,
    TransientProviderError,
)

API_KEY = "SG.sandbox-key"
CREDENTIALS = {"sendgrid_api_key": API_KEY, "from_email": "hello@demo-homes.example", "from_name": "Demo Homes"}
RECIPIENT = "lee@example.com"


@pytest.fixture(scope="module")
async def sandbox() -> AsyncIterator[RunningServer]:
    server = await serve(create_sendgrid_sandbox({API_KEY}))
    assert server.runner.server is not None
    server.runner.server.handler_cancellation = True  # a client giving up on a hung request ends its handler
    yield server
    await server.close()


@pytest.fixture(scope="module")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as shared:
        yield shared


@pytest.fixture
async def control(sandbox: RunningServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=sandbox.url) as client:
        await post_json(client, "/_sandbox/reset", {})
        await post_json(client, "/_sandbox/sendgrid/reset", {})
        yield client


@pytest.fixture
def sender(sandbox: RunningServer, session: aiohttp.ClientSession) -> SendGridSender:
    return SendGridSender(session, sandbox.url, timeout_s=0.5)


async def post_json(control: aiohttp.ClientSession, path: str, payload: dict[str, Any]) -> Any:
    async with control.post(path, json=payload) as answer:
        assert answer.status == 200, await answer.text()
        return await answer.json()


async def accepted_mails(control: aiohttp.ClientSession) -> list[dict[str, Any]]:
    async with control.get("/_sandbox/sendgrid/messages") as answer:
        mails: list[dict[str, Any]] = await answer.json()
        return mails


def email(**changes: Any) -> OutboundMessage:
    message = OutboundMessage(
        channel="email",
        credentials=CREDENTIALS,
        sender="company@demo-homes.example",
        recipient=RECIPIENT,
        subject="Your viewing at 12 Acacia Avenue",
        body="Hi Lee,\n\nSee you on Saturday at 10am <3",
        reference="conv-1",
        sender_name="Company",
    )
    return replace(message, **changes)


async def test_accepted_mail_returns_its_x_message_id(sender: SendGridSender, control: aiohttp.ClientSession) -> None:
    sent = await sender.send(email())
    [mail] = await accepted_mails(control)
    assert sent.provider_message_id == mail["message_id"] and sent.provider_message_id


async def test_mail_carries_sender_subject_both_bodies_and_the_conversation_id(
    sender: SendGridSender, control: aiohttp.ClientSession
) -> None:
    await sender.send(email())
    [mail] = await accepted_mails(control)
    assert mail["to"] == [RECIPIENT]
    assert mail["from"] == {"email": "hello@demo-homes.example", "name": "Demo Homes"}
    assert mail["subject"] == "Your viewing at 12 Acacia Avenue"
    plain, rich = mail["content"]
    assert plain == {"type": "text/plain", "value": "Hi Lee,\n\nSee you on Saturday at 10am <3"}
    assert rich == {"type": "text/html", "value": "<p>Hi Lee,</p><p>See you on Saturday at 10am &lt;3</p>"}
    assert mail["custom_args"] == {"conversation_id": "conv-1"}


async def test_from_falls_back_to_the_message_sender(sender: SendGridSender, control: aiohttp.ClientSession) -> None:
    await sender.send(email(credentials={"sendgrid_api_key": API_KEY}))
    [mail] = await accepted_mails(control)
    assert mail["from"] == {"email": "company@demo-homes.example", "name": "Company"}


async def test_invalid_recipient_400_is_permanent_with_the_first_error_message(
    sender: SendGridSender, control: aiohttp.ClientSession
) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        await sender.send(email(recipient="not-an-email"))
    assert (caught.value.code, caught.value.reason) == ("400", "Does not contain a valid address.")


async def test_revoked_api_key_401_is_permanent(sender: SendGridSender, control: aiohttp.ClientSession) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        await sender.send(email(credentials={**CREDENTIALS, "sendgrid_api_key": "SG.revoked"}))
    assert caught.value.code == "401"


async def test_injected_503_is_transient_with_retry_after(
    sender: SendGridSender, control: aiohttp.ClientSession
) -> None:
    await post_json(control, "/_sandbox/faults", {"status": 503, "path_prefix": "/v3/", "retry_after": 7})
    with pytest.raises(TransientProviderError) as caught:
        await sender.send(email())
    assert not isinstance(caught.value, SendOutcomeUnknown)
    assert (caught.value.code, caught.value.retry_after_s) == ("503", 7.0)


async def test_rate_limit_429_is_transient(sender: SendGridSender, control: aiohttp.ClientSession) -> None:
    await post_json(control, "/_sandbox/faults", {"status": 429, "path_prefix": "/v3/"})
    with pytest.raises(TransientProviderError) as caught:
        await sender.send(email())
    assert not isinstance(caught.value, SendOutcomeUnknown)


async def test_hang_is_send_outcome_unknown_within_the_timeout(
    sender: SendGridSender, control: aiohttp.ClientSession
) -> None:
    await post_json(control, "/_sandbox/faults", {"mode": "hang", "path_prefix": "/v3/"})
    # The session would wait 5 minutes and the sandbox an hour: only the sender's own 0.5 s timeout ends it first.
    async with asyncio.timeout(5):  # hang guard
        with pytest.raises(SendOutcomeUnknown) as caught:
            await sender.send(email())
    assert (caught.value.reason, caught.value.code) == ("sendgrid_outcome_unknown", "TimeoutError")
    assert await accepted_mails(control) == []


async def test_dropped_connection_is_send_outcome_unknown(
    sender: SendGridSender, control: aiohttp.ClientSession
) -> None:
    await post_json(control, "/_sandbox/faults", {"mode": "reset", "path_prefix": "/v3/"})
    with pytest.raises(SendOutcomeUnknown):
        await sender.send(email())


async def test_mail_without_a_subject_is_permanent_and_not_sent(
    sender: SendGridSender, control: aiohttp.ClientSession
) -> None:
    with pytest.raises(PermanentProviderError):
        await sender.send(email(subject=None))
    assert await accepted_mails(control) == []


async def test_find_sent_is_permanent_because_sendgrid_cannot_look_up(sender: SendGridSender) -> None:
    with pytest.raises(PermanentProviderError) as caught:
        await sender.find_sent(email(), time.time())
    assert caught.value.reason == "sendgrid_lookup_unsupported"


async def test_unreachable_sendgrid_is_transient_and_not_unknown(session: aiohttp.ClientSession) -> None:
    closed = await serve(create_sendgrid_sandbox())
    url = closed.url
    await closed.close()
    with pytest.raises(TransientProviderError) as caught:
        await SendGridSender(session, url, timeout_s=2.0).send(email())
    assert not isinstance(caught.value, SendOutcomeUnknown)
