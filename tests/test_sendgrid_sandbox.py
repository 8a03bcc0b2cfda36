"""The SendGrid v3 mail send sandbox over plain aiohttp: auth, SendGrid's field errors, 202 + X-Message-Id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from local_stack.sandbox_http import serve
from local_stack.sendgrid_sandbox import create_sendgrid_sandbox

API_KEY = "SG.sandbox-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def mail(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "personalizations": [{"to": [{"email": "buyer@example.com", "name": "Buyer"}]}],
        "from": {"email": "hello@demo-homes.example", "name": "Demo Homes"},
        "subject": "Your viewing",
        "content": [{"type": "text/plain", "value": "See you Tuesday"}],
        "custom_args": {"conversation_id": "conv-1"},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


@pytest.fixture
async def sendgrid() -> AsyncIterator[aiohttp.ClientSession]:
    server = await serve(create_sendgrid_sandbox({API_KEY}))
    async with aiohttp.ClientSession(base_url=server.url) as session:
        yield session
    await server.close()


async def send(sendgrid: aiohttp.ClientSession, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with sendgrid.post("/v3/mail/send", json=body, headers=AUTH if headers is None else headers) as response:
        text = await response.text()
        return response.status, (await response.json() if text else text)


def error_fields(answer: dict[str, Any]) -> list[str | None]:
    return [error["field"] for error in answer["errors"]]


async def test_valid_mail_is_accepted_with_202_empty_body_and_x_message_id(sendgrid: aiohttp.ClientSession) -> None:
    async with sendgrid.post("/v3/mail/send", json=mail(), headers=AUTH) as response:
        status, body, message_id = response.status, await response.text(), response.headers.get("X-Message-Id")

    async with sendgrid.get("/_sandbox/sendgrid/messages") as listed:
        [accepted] = await listed.json()
    assert (status, body) == (202, "")
    assert message_id and accepted["message_id"] == message_id
    assert accepted["to"] == ["buyer@example.com"] and accepted["custom_args"] == {"conversation_id": "conv-1"}


async def test_missing_authorization_is_401(sendgrid: aiohttp.ClientSession) -> None:
    status, answer = await send(sendgrid, mail(), headers={})

    assert status == 401
    assert answer["errors"][0]["field"] is None and answer["errors"][0]["message"]


async def test_unknown_api_key_is_401(sendgrid: aiohttp.ClientSession) -> None:
    status, answer = await send(sendgrid, mail(), headers={"Authorization": "Bearer SG.someone-else"})

    assert (status, answer["errors"][0]["message"]) == (
        401,
        "The provided authorization grant is invalid, expired, or revoked",
    )


async def test_missing_from_is_400_on_from_email(sendgrid: aiohttp.ClientSession) -> None:
    status, answer = await send(sendgrid, {k: v for k, v in mail().items() if k != "from"})

    assert (status, error_fields(answer)) == (400, ["from.email"])
    assert answer["errors"][0]["help"].startswith("http://sendgrid.com/docs/")


async def test_invalid_recipient_email_is_400_on_its_field(sendgrid: aiohttp.ClientSession) -> None:
    status, answer = await send(sendgrid, mail(personalizations=[{"to": [{"email": "not-an-email"}]}]))

    assert (status, error_fields(answer)) == (400, ["personalizations.0.to.0.email"])
    assert answer["errors"][0]["message"] == "Does not contain a valid address."


async def test_missing_personalizations_is_400(sendgrid: aiohttp.ClientSession) -> None:
    status, answer = await send(sendgrid, mail(personalizations=[]))

    assert (status, error_fields(answer)) == (400, ["personalizations"])


async def test_missing_subject_and_content_are_both_reported(sendgrid: aiohttp.ClientSession) -> None:
    body = {k: v for k, v in mail().items() if k not in ("subject", "content")}

    status, answer = await send(sendgrid, body)

    assert (status, error_fields(answer)) == (400, ["subject", "content"])


async def test_template_id_stands_in_for_subject_and_content(sendgrid: aiohttp.ClientSession) -> None:
    body = {k: v for k, v in mail().items() if k not in ("subject", "content")} | {"template_id": "d-123"}

    status, _ = await send(sendgrid, body)

    assert status == 202


async def test_body_that_is_not_json_is_400_bad_request(sendgrid: aiohttp.ClientSession) -> None:
    async with sendgrid.post("/v3/mail/send", data=b"{nope", headers=AUTH) as response:
        status, answer = response.status, await response.json()

    assert (status, answer) == (400, {"errors": [{"message": "Bad Request", "field": None, "help": None}]})


async def test_programmed_recipient_failure_is_returned(sendgrid: aiohttp.ClientSession) -> None:
    failure = {"email": "Buyer@Example.com", "status": 403, "message": "recipient blocked"}
    async with sendgrid.post("/_sandbox/sendgrid/recipients", json=failure) as programmed:
        assert programmed.status == 200

    status, answer = await send(sendgrid, mail())

    assert (status, answer["errors"][0]["message"]) == (403, "recipient blocked")
