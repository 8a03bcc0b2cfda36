"""Webhooks reveal nothing about who talks to whom before the signature is verified (defect 10).

The tenant, and so the auth token, follows from the business number alone; only a request signed with that
token gets as far as looking up the (From, To) pair. Anything unverifiable (unsigned, a bad signature, a number
no tenant owns) is answered the same 403 SPEC §2 error body whatever the pair.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from local_stack.moto_server import free_port
from tests.replies_support import (
    EMPTY_TWIML,
    SIGNATURE_HEADER,
    RepliesWorld,
    inbound_form,
    new_sid,
    replies_world,
    sign,
    status_form,
    unique_tel,
)
from tests.support import api_client

INBOUND = "/webhooks/twilio/whatsapp"
STATUS = "/webhooks/twilio/status"


@pytest.fixture(scope="module")
async def world(settings, deps, tenant) -> AsyncIterator[RepliesWorld]:
    async with replies_world(settings, deps, window_s=0) as built:
        yield built


def refusal(status: int, content_type: str, body: str) -> tuple[int, str, dict[str, Any]]:
    """The answer with the per-request id taken out (it differs on every request by design)."""
    assert content_type == "application/json", body
    parsed = orjson.loads(body)
    assert parsed.pop("request_id")
    return status, content_type, parsed


FORBIDDEN = (
    403,
    "application/json",
    {"status": "error", "error_code": "AUTHORIZATION_ERROR", "message": "invalid signature"},
)


async def drain(world: RepliesWorld, queue: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    while batch := await world.receive(queue):
        found += batch
    return found


async def nothing_stored(world: RepliesWorld, conversation_id: str) -> None:
    assert await world.staged(conversation_id) == []
    assert await world.lock(conversation_id) is None
    assert await world.messages_for("replies", conversation_id) == []


# -- inbound messages -----------------------------------------------------------------------------------------------


async def test_unsigned_inbound_is_answered_the_same_for_a_real_pair_and_an_unknown_pair(world):
    real = unique_tel()
    key = await world.seed_conversation(real)

    for_real = await world.post_form(INBOUND, inbound_form("whatsapp", real, "hi"), signature=None)
    for_unknown = await world.post_form(INBOUND, inbound_form("whatsapp", unique_tel(), "hi"), signature=None)

    assert refusal(*for_real) == refusal(*for_unknown) == FORBIDDEN
    await nothing_stored(world, key.conversation_id)


async def test_badly_signed_inbound_is_answered_the_same_for_a_real_pair_and_an_unknown_pair(world):
    real = unique_tel()
    key = await world.seed_conversation(real)
    real_form, unknown_form = inbound_form("whatsapp", real, "hi"), inbound_form("whatsapp", unique_tel(), "hi")

    for_real = await world.post_form(INBOUND, real_form, signature=sign(world.public_url(INBOUND), real_form, "x"))
    for_unknown = await world.post_form(
        INBOUND, unknown_form, signature=sign(world.public_url(INBOUND), unknown_form, "x")
    )

    assert refusal(*for_real) == refusal(*for_unknown) == FORBIDDEN
    await nothing_stored(world, key.conversation_id)


async def test_inbound_to_a_number_no_tenant_owns_is_refused_like_an_unsigned_one(world):
    form = inbound_form("whatsapp", unique_tel(), "hi")
    form["To"] = f"whatsapp:+44779{uuid.uuid4().int % 10**7:07d}"

    answer = await world.post_form(INBOUND, form, signature=sign(world.public_url(INBOUND), form))

    assert refusal(*answer) == FORBIDDEN


async def test_signed_inbound_from_an_unknown_pair_is_answered_200_empty_twiml_and_stores_nothing(world):
    tel = unique_tel()
    form = inbound_form("whatsapp", tel, "who is this?")

    answer = await world.post_form(INBOUND, form, signature=sign(world.public_url(INBOUND), form))

    assert answer == (200, "text/xml", EMPTY_TWIML)
    for queue in ("replies", "handoff"):
        queued = [m for m in await drain(world, queue) if tel in orjson.dumps(m["body"]).decode()]
        assert queued == []


async def test_signed_inbound_for_a_real_pair_is_still_staged(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel)

    assert (await world.inbound(tel, "still works"))[:2] == (200, "text/xml")

    assert [f["body"] for f in await world.staged(key.conversation_id)] == ["still works"]


async def test_conversation_is_checked_with_its_own_tenants_token_too(world):
    """A number shared by mistake between tenants: the token that verified the number must also be the pair's.
    If it is not, the request is answered as for an unknown pair (one tenant must not learn another's pairs)."""
    number = f"+44779{uuid.uuid4().int % 10**7:07d}"
    other_secret = f"test/other-tenant/{uuid.uuid4().hex}"
    await world.deps.aws.secrets.create_secret(
        Name=other_secret, SecretString=orjson.dumps({"twilio_auth_token": "another-tenants-token"}).decode()
    )
    # Sorted first on the number's index (lowest recipient), so it is the one the number's tenant is read from.
    await world.seed_conversation("+440000000001", gsi_company_whatsapp_number=number, thread=False)
    tel = f"+44779{uuid.uuid4().int % 10**7:07d}"
    other = await world.seed_conversation(
        tel,
        gsi_company_whatsapp_number=number,
        channel_config={"whatsapp_credentials_id": other_secret, "company_whatsapp_number": number},
        thread=False,
    )
    form = inbound_form("whatsapp", tel, "signed with the first tenant's token")
    form["To"] = f"whatsapp:{number}"

    answer = await world.post_form(INBOUND, form, signature=sign(world.public_url(INBOUND), form))
    unknown = inbound_form("whatsapp", f"+44779{uuid.uuid4().int % 10**7:07d}", "nobody's pair")
    unknown["To"] = f"whatsapp:{number}"
    for_unknown = await world.post_form(INBOUND, unknown, signature=sign(world.public_url(INBOUND), unknown))

    assert answer == for_unknown == (200, "text/xml", EMPTY_TWIML)
    await nothing_stored(world, other.conversation_id)


async def test_number_whose_old_conversations_name_old_credentials_still_verifies_with_the_current_ones(world):
    """A project's credentials id changed: conversations from before name the old one, newer ones the current
    one. A request signed with the current token is accepted whichever conversation the number is read from."""
    number = f"+44779{uuid.uuid4().int % 10**7:07d}"
    old_secret = f"test/rotated-away/{uuid.uuid4().hex}"
    await world.deps.aws.secrets.create_secret(
        Name=old_secret, SecretString=orjson.dumps({"twilio_auth_token": "the-old-token"}).decode()
    )
    # Sorted first on the number's index (lowest recipient): an old conversation naming the old credentials.
    await world.seed_conversation(
        "+440000000001",
        gsi_company_whatsapp_number=number,
        channel_config={"whatsapp_credentials_id": old_secret, "company_whatsapp_number": number},
        thread=False,
    )
    tel = f"+44779{uuid.uuid4().int % 10**7:07d}"
    current = await world.seed_conversation(tel, gsi_company_whatsapp_number=number, thread=False)
    form = inbound_form("whatsapp", tel, "signed with the current token")
    form["To"] = f"whatsapp:{number}"

    answer = await world.post_form(INBOUND, form, signature=sign(world.public_url(INBOUND), form))

    assert answer == (200, "text/xml", EMPTY_TWIML)
    assert [f["body"] for f in await world.staged(current.conversation_id)] == ["signed with the current token"]


async def test_status_callback_for_another_tenants_conversation_is_answered_as_unknown(world):
    number = f"+44779{uuid.uuid4().int % 10**7:07d}"
    other_secret = f"test/other-tenant/{uuid.uuid4().hex}"
    await world.deps.aws.secrets.create_secret(
        Name=other_secret, SecretString=orjson.dumps({"twilio_auth_token": "another-tenants-token"}).decode()
    )
    await world.seed_conversation("+440000000001", gsi_company_whatsapp_number=number, thread=False)
    tel, sid = f"+44779{uuid.uuid4().int % 10**7:07d}", new_sid()
    message = {"message_id": sid, "timestamp": "2026-01-01T00:00:00.000Z", "role": "assistant", "content": "Hi"}
    other = await world.seed_conversation(
        tel,
        gsi_company_whatsapp_number=number,
        channel_config={"whatsapp_credentials_id": other_secret, "company_whatsapp_number": number},
        messages=[message],
        thread=False,
    )
    form = status_form("whatsapp", tel, sid, "delivered")
    form["From"] = f"whatsapp:{number}"

    answer = await world.post_form(STATUS, form, signature=sign(world.public_url(STATUS), form))

    assert answer == (200, "text/xml", EMPTY_TWIML)
    assert "delivery_status" not in (await world.conversation(other))["messages"][0]


async def test_inbound_without_message_sid_is_a_400_error_body(world):
    form = inbound_form("whatsapp", unique_tel(), "hello")
    for name in ("MessageSid", "SmsMessageSid", "SmsSid"):
        del form[name]

    status, content_type, body = await world.post_form(INBOUND, form, signature=sign(world.public_url(INBOUND), form))

    assert (status, content_type) == (400, "application/json")
    assert orjson.loads(body)["error_code"] == "INVALID_REQUEST"


async def test_dynamodb_unreachable_is_a_503_error_body_with_retry_after(world):
    tel = unique_tel()
    await world.seed_conversation(tel)
    form = inbound_form("whatsapp", tel, "anyone?")
    dead = f"http://127.0.0.1:{free_port()}"
    settings = {"aws_max_attempts": 1, "sqs_send_attempts": 1, "aws_connect_timeout_s": 0.5}
    async with api_client(world.settings, dynamodb_endpoint_url=dead, **settings) as (broken, _):
        response = await broken.post(
            INBOUND, data=form, headers={SIGNATURE_HEADER: sign(world.public_url(INBOUND), form)}
        )
        body = await response.json()

    assert response.status == 503
    assert response.headers["Retry-After"]
    assert body["status"] == "error"
    assert body["error_code"] == "DATABASE_ERROR"
    assert body["request_id"]


# -- status callbacks -----------------------------------------------------------------------------------------------


async def test_unsigned_status_callback_is_answered_the_same_for_a_real_message_and_an_unknown_pair(world):
    real, sid = unique_tel(), new_sid()
    message = {"message_id": sid, "timestamp": "2026-01-01T00:00:00.000Z", "role": "assistant", "content": "Hi"}
    key = await world.seed_conversation(real, messages=[message], thread=False)

    for_real = await world.post_form(STATUS, status_form("whatsapp", real, sid, "delivered"), signature=None)
    for_unknown = await world.post_form(
        STATUS, status_form("whatsapp", unique_tel(), new_sid(), "delivered"), signature=None
    )

    assert refusal(*for_real) == refusal(*for_unknown) == FORBIDDEN
    assert "delivery_status" not in (await world.conversation(key))["messages"][0]


async def test_badly_signed_status_callback_is_answered_the_same_for_a_real_message_and_an_unknown_pair(world):
    real, sid = unique_tel(), new_sid()
    message = {"message_id": sid, "timestamp": "2026-01-01T00:00:00.000Z", "role": "assistant", "content": "Hi"}
    await world.seed_conversation(real, messages=[message], thread=False)
    real_form = status_form("whatsapp", real, sid, "delivered")
    unknown_form = status_form("whatsapp", unique_tel(), new_sid(), "delivered")

    for_real = await world.post_form(STATUS, real_form, signature=sign(world.public_url(STATUS), real_form, "x"))
    for_unknown = await world.post_form(
        STATUS, unknown_form, signature=sign(world.public_url(STATUS), unknown_form, "x")
    )

    assert refusal(*for_real) == refusal(*for_unknown) == FORBIDDEN


async def test_status_callback_from_a_number_no_tenant_owns_is_refused_like_an_unsigned_one(world):
    form = status_form("whatsapp", unique_tel(), new_sid(), "delivered")
    form["From"] = f"whatsapp:+44779{uuid.uuid4().int % 10**7:07d}"

    answer = await world.post_form(STATUS, form, signature=sign(world.public_url(STATUS), form))

    assert refusal(*answer) == FORBIDDEN


async def test_signed_status_callback_for_an_unknown_pair_is_answered_200_empty_twiml(world):
    form = status_form("whatsapp", unique_tel(), new_sid(), "delivered")

    answer = await world.post_form(STATUS, form, signature=sign(world.public_url(STATUS), form))

    assert answer == (200, "text/xml", EMPTY_TWIML)


async def test_sms_status_callback_is_verified_with_the_sms_numbers_tenant(world):
    tel, sid = unique_tel(), new_sid()
    message = {"message_id": sid, "timestamp": "2026-01-01T00:00:00.000Z", "role": "assistant", "content": "Hi"}
    key = await world.seed_conversation(tel, channel="sms", messages=[message], thread=False)

    assert await world.status_callback(tel, sid, "delivered", channel="sms") == 200

    assert (await world.conversation(key))["messages"][0]["delivery_status"] == "delivered"
