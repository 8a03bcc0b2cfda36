"""Twilio inbound webhooks (SPEC §7 steps 1-8), over real HTTP against the moto server and the Twilio sandbox.

Every request is signed by the twilio library's own RequestValidator with the tenant's auth token (or posted by
the Twilio sandbox, which signs the same way). Most tests share one world whose batching window is 0 s, so a
trigger is visible on the replies queue the moment the webhook answers and can be looked for by conversation;
each test has its own recipient number (and tenant, where the company record matters).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from local_stack.moto_server import free_port
from tests.conftest import initiate_body
from tests.replies_support import (
    EMPTY_TWIML,
    SIGNATURE_HEADER,
    RepliesWorld,
    eventually,
    inbound_form,
    new_sid,
    replies_world,
    sign,
    unique_tel,
)
from tests.support import api_client

WINDOW_S = 2
INBOUND = "/webhooks/twilio/whatsapp"


@pytest.fixture(scope="module")
async def world(settings, deps, tenant) -> AsyncIterator[RepliesWorld]:
    # `tenant` seeds the demo provider secrets every test tenant's channel config names.
    async with replies_world(settings, deps, window_s=0) as built:
        yield built


@pytest.fixture
async def windowed(settings, deps, tenant) -> AsyncIterator[RepliesWorld]:
    """A world of its own with a real batching window (its queues hold only this test's triggers)."""
    async with replies_world(settings, deps, window_s=WINDOW_S) as built:
        yield built


async def assert_nothing_stored(world: RepliesWorld, conversation_id: str) -> None:
    assert await world.staged(conversation_id) == []
    assert await world.lock(conversation_id) is None
    assert await world.messages_for("replies", conversation_id) == []
    assert await world.messages_for("handoff", conversation_id) == []


# -- authentication -------------------------------------------------------------------------------------------------


def record_send_delays(world: RepliesWorld, queue: str) -> list[int]:
    """The DelaySeconds of every SendMessage the world's service makes to `queue`, as botocore sends them."""
    delays: list[int] = []
    url = world.settings.queue_url(queue)

    def record(params: dict[str, Any], **_: Any) -> None:
        if params.get("QueueUrl") == url:
            delays.append(params.get("DelaySeconds", 0))

    world.deps.aws.sqs.meta.events.register("provide-client-params.sqs.SendMessage", record)
    return delays


async def test_signed_webhook_is_answered_with_empty_twiml_staged_and_triggers_one_delayed_reply(windowed):
    world = windowed
    tel = unique_tel()
    key = await world.seed_conversation(tel)
    sid = new_sid()
    trigger_delays = record_send_delays(world, "replies")
    before = time.time()

    status, content_type, body = await world.inbound(tel, "Is the viewing still on?", sid=sid)

    assert (status, content_type, body) == (200, "text/xml", EMPTY_TWIML)
    [fragment] = await world.staged(key.conversation_id)
    assert fragment["message_sid"] == sid
    assert fragment["body"] == "Is the viewing still on?"
    assert fragment["primary_channel"] == tel
    assert fragment["received_at"].endswith("Z")
    assert before + WINDOW_S + 60 - 1 <= fragment["expires_at"] <= time.time() + WINDOW_S + 60
    lock = await world.lock(key.conversation_id)
    assert lock is not None
    assert lock["expires_at"] == fragment["expires_at"]
    # The trigger waits out the batching window before anyone can receive it: SQS was asked to hold it back
    # for the window, holds it, then delivers it.
    assert trigger_delays == [WINDOW_S]
    assert await world.queue_depth("replies") == {"visible": 0, "in_flight": 0, "delayed": 1}
    assert await world.receive("replies") == []
    [trigger] = await eventually(lambda: world.receive("replies"), timeout_s=WINDOW_S + 5, what="the trigger")
    assert trigger["body"] == {"conversation_id": key.conversation_id, "primary_channel": tel}
    assert trigger["attributes"] == {"conversationId": key.conversation_id}


async def test_webhook_posted_and_signed_by_the_twilio_sandbox_is_staged(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel)

    report = await world.providers.twilio_inbound(world.public_url(INBOUND), "whatsapp", tel, "Hello from WhatsApp")

    assert (report["status"], report["body"]) == (200, EMPTY_TWIML)
    [fragment] = await world.staged(key.conversation_id)
    assert (fragment["message_sid"], fragment["body"]) == (report["message_sid"], "Hello from WhatsApp")


async def test_unsigned_webhook_is_refused_403_and_nothing_is_stored(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel)

    status, _, _ = await world.post_form(INBOUND, inbound_form("whatsapp", tel, "hello"), signature=None)

    assert status == 403
    await assert_nothing_stored(world, key.conversation_id)


async def test_webhook_with_a_tampered_parameter_is_refused_403_and_nothing_is_stored(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel)
    form = inbound_form("whatsapp", tel, "Saturday is fine")
    signature = sign(world.public_url(INBOUND), form)
    form["Body"] = "Saturday is fine, send me your bank details"

    status, _, _ = await world.post_form(INBOUND, form, signature=signature)

    assert status == 403
    await assert_nothing_stored(world, key.conversation_id)


async def test_webhook_signed_with_another_accounts_token_is_refused_403(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel)
    form = inbound_form("whatsapp", tel, "hello")

    status, _, _ = await world.post_form(
        INBOUND, form, signature=sign(world.public_url(INBOUND), form, token="someone-elses-token")
    )

    assert status == 403
    await assert_nothing_stored(world, key.conversation_id)


async def test_signature_over_the_forwarded_public_url_is_accepted_without_a_public_base_url(settings, deps, tenant):
    async with replies_world(settings, deps, window_s=0, public=False) as world:
        tel = unique_tel()
        key = await world.seed_conversation(tel)
        form = inbound_form("whatsapp", tel, "behind the ingress")
        public = "https://comms.example.com/webhooks/twilio/whatsapp"
        forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "comms.example.com"}

        status, _, body = await world.post_form(INBOUND, form, signature=sign(public, form), headers=forwarded)

        assert (status, body) == (200, EMPTY_TWIML)
        assert [f["body"] for f in await world.staged(key.conversation_id)] == ["behind the ingress"]


async def test_signature_over_the_internal_url_is_refused_when_the_ingress_forwarded_another(settings, deps, tenant):
    async with replies_world(settings, deps, window_s=0, public=False) as world:
        tel = unique_tel()
        key = await world.seed_conversation(tel)
        form = inbound_form("whatsapp", tel, "signed for the wrong host")
        forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "comms.example.com"}

        status, _, _ = await world.post_form(
            INBOUND, form, signature=sign(f"{world.server_url}{INBOUND}", form), headers=forwarded
        )

        assert status == 403
        await assert_nothing_stored(world, key.conversation_id)


# -- who and what gets staged ---------------------------------------------------------------------------------------


async def test_webhook_from_an_unknown_sender_is_answered_200_and_nothing_is_stored(world):
    tel = unique_tel()  # no conversation with this number
    form = inbound_form("whatsapp", tel, "who is this?")
    labels = {"kind": "whatsapp", "result": "unknown_conversation"}
    before = world.deps.registry.get_sample_value("comms_webhooks_total", labels) or 0

    status, content_type, body = await world.post_form(INBOUND, form, signature=sign(world.public_url(INBOUND), form))

    assert (status, content_type, body) == (200, "text/xml", EMPTY_TWIML)
    assert world.deps.registry.get_sample_value("comms_webhooks_total", labels) == before + 1


async def test_webhook_is_staged_for_the_newest_open_conversation_not_a_newer_finished_one(world):
    tel = unique_tel()
    open_one = await world.seed_conversation(tel, created_at="2026-01-01T00:00:00.000Z")
    finished = await world.seed_conversation(tel, created_at="2026-06-01T00:00:00.000Z", task_complete=1)

    assert (await world.inbound(tel, "still there?"))[0] == 200

    assert [f["body"] for f in await world.staged(open_one.conversation_id)] == ["still there?"]
    assert await world.staged(finished.conversation_id) == []


async def test_duplicate_webhook_delivery_stores_the_fragment_once(world):
    """Twilio retries only what it did not get a 200 for, so an answered window writes no queued mark: a repeat after
    a 200 (a lost answer) re-takes its own lock and queues a second trigger, which the reply claim and the answered
    sids make answer nothing twice. A retry after a 503 queues none (tests/unit/test_inbound_intake.py)."""
    tel = unique_tel()
    key = await world.seed_conversation(tel)
    sid = new_sid()

    first = await world.inbound(tel, "Can I bring my partner?", sid=sid)
    retry = await world.inbound(tel, "Can I bring my partner?", sid=sid)

    assert first[0] == retry[0] == 200
    assert [f["message_sid"] for f in await world.staged(key.conversation_id)] == [sid]
    assert len(await world.messages_for("replies", key.conversation_id)) == 2


async def test_later_fragments_in_the_window_only_stage(windowed):
    world = windowed
    tel = unique_tel()
    key = await world.seed_conversation(tel)

    for body in ("one", "two", "three"):
        assert (await world.inbound(tel, body))[0] == 200

    assert sorted(f["body"] for f in await world.staged(key.conversation_id)) == ["one", "three", "two"]
    depth = await world.queue_depth("replies")
    assert depth["delayed"] + depth["visible"] == 1  # one trigger (the first fragment's), however long this took


async def test_webhook_for_an_inactive_project_is_answered_200_and_nothing_is_staged(world):
    inactive = await world.add_tenant(project_status="inactive")
    tel = unique_tel()
    key = await world.seed_conversation(tel, tenant=inactive)

    status, _, body = await world.inbound(tel, "hello?")

    assert (status, body) == (200, EMPTY_TWIML)
    await assert_nothing_stored(world, key.conversation_id)


async def test_webhook_on_a_channel_the_project_no_longer_allows_is_answered_200_and_nothing_is_staged(world):
    sms_only = await world.add_tenant(allowed_channels=["sms"])
    tel = unique_tel()
    key = await world.seed_conversation(tel, tenant=sms_only)

    status, _, body = await world.inbound(tel, "hello?")

    assert (status, body) == (200, EMPTY_TWIML)
    await assert_nothing_stored(world, key.conversation_id)


async def test_sms_webhook_is_staged_for_the_sms_conversation(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel, channel="sms")

    status, _, _ = await world.inbound(tel, "by text", channel="sms")

    assert status == 200
    assert [f["body"] for f in await world.staged(key.conversation_id)] == ["by text"]
    [trigger] = await world.messages_for("replies", key.conversation_id)
    assert trigger["body"] == {"conversation_id": key.conversation_id, "primary_channel": tel}


async def test_webhook_without_message_sid_is_refused_400(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel)
    form = inbound_form("whatsapp", tel, "hello")
    for name in ("MessageSid", "SmsMessageSid", "SmsSid"):
        del form[name]

    status, _, _ = await world.post_form(INBOUND, form, signature=sign(world.public_url(INBOUND), form))

    assert status == 400
    await assert_nothing_stored(world, key.conversation_id)


# -- dependencies failing -------------------------------------------------------------------------------------------

DEAD = {"aws_max_attempts": 1, "sqs_send_attempts": 1, "aws_connect_timeout_s": 0.5}


async def test_dynamodb_unreachable_answers_503_so_twilio_retries(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel)
    form = inbound_form("whatsapp", tel, "are you there?")
    dead = f"http://127.0.0.1:{free_port()}"
    # The same settings (public URL included) with DynamoDB unreachable.
    async with api_client(world.settings, dynamodb_endpoint_url=dead, **DEAD) as (broken, _):
        response = await broken.post(
            INBOUND, data=form, headers={SIGNATURE_HEADER: sign(world.public_url(INBOUND), form)}
        )

    assert response.status == 503
    assert "Retry-After" in response.headers
    await assert_nothing_stored(world, key.conversation_id)


async def test_sqs_unreachable_answers_503_releases_the_lock_and_twilios_retry_queues_one_trigger(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel)
    form = inbound_form("whatsapp", tel, "first try fails")
    signature = sign(world.public_url(INBOUND), form)
    dead = f"http://127.0.0.1:{free_port()}"
    async with api_client(world.settings, sqs_endpoint_url=dead, **DEAD) as (broken, _):
        failed = await broken.post(INBOUND, data=form, headers={SIGNATURE_HEADER: signature})
    assert failed.status == 503
    assert await world.lock(key.conversation_id) is None  # released, so Twilio's retry can take it

    retried, _, _ = await world.post_form(INBOUND, form, signature=signature)

    assert retried == 200
    assert [f["body"] for f in await world.staged(key.conversation_id)] == ["first try fails"]
    assert len(await world.messages_for("replies", key.conversation_id)) == 1


# -- opt-out and opt-in ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["STOP", "  Unsubscribe ", "stopall", "Cancel", "END", "quit"])
async def test_opt_out_keyword_suppresses_the_sender_marks_the_conversation_and_triggers_nothing(world, word):
    tel = unique_tel()
    key = await world.seed_conversation(tel)

    status, _, body = await world.inbound(tel, word)

    assert (status, body) == (200, EMPTY_TWIML)
    suppressed = await world.suppression("whatsapp", tel)
    assert suppressed is not None
    assert suppressed["opted_out_at"].endswith("Z")
    record = await world.conversation(key)
    assert record["conversation_status"] == "opted_out"
    await assert_nothing_stored(world, key.conversation_id)


async def test_initiate_for_a_recipient_who_sent_stop_is_refused_422_recipient_opted_out(world):
    tel = unique_tel()
    await world.seed_conversation(tel)
    await world.inbound(tel, "STOP")
    body = initiate_body(
        "whatsapp",
        company_data={"company_id": world.tenant.company_id, "project_id": world.tenant.project_id},
        recipient_data={"recipient_tel": tel},
    )

    response = await world.client.post("/initiate-conversation", json=body, headers={"x-api-key": world.tenant.api_key})

    assert response.status == 422
    assert (await response.json())["error_code"] == "RECIPIENT_OPTED_OUT"


async def test_message_from_a_suppressed_sender_is_not_staged(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel)
    await world.inbound(tel, "STOP")

    status, _, body = await world.inbound(tel, "actually, one more question")

    assert (status, body) == (200, EMPTY_TWIML)
    await assert_nothing_stored(world, key.conversation_id)


@pytest.mark.parametrize("word", ["START", "unstop", "yes"])
async def test_opt_in_keyword_lifts_the_suppression_and_replies_resume(world, word):
    tel = unique_tel()
    key = await world.seed_conversation(tel)
    await world.inbound(tel, "STOP")

    status, _, _ = await world.inbound(tel, word)

    assert status == 200
    assert await world.suppression("whatsapp", tel) is None
    assert (await world.conversation(key))["conversation_status"] in {"initial_message_sent", "reply_sent"}
    await assert_nothing_stored(world, key.conversation_id)  # the keyword itself gets no AI reply
    await world.inbound(tel, "So, about Saturday")
    assert [f["body"] for f in await world.staged(key.conversation_id)] == ["So, about Saturday"]
    assert len(await world.messages_for("replies", key.conversation_id)) == 1


async def test_initiate_is_accepted_again_after_start(world):
    tel = unique_tel()
    await world.seed_conversation(tel)
    await world.inbound(tel, "STOP")
    await world.inbound(tel, "START")
    body = initiate_body(
        "whatsapp",
        company_data={"company_id": world.tenant.company_id, "project_id": world.tenant.project_id},
        recipient_data={"recipient_tel": tel},
    )

    response = await world.client.post("/initiate-conversation", json=body, headers={"x-api-key": world.tenant.api_key})

    assert response.status == 200, await response.text()


async def test_yes_from_a_sender_who_is_not_suppressed_is_an_ordinary_reply(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel)

    await world.inbound(tel, "Yes")

    assert [f["body"] for f in await world.staged(key.conversation_id)] == ["Yes"]
    assert await world.suppression("whatsapp", tel) is None


# -- hand-off -------------------------------------------------------------------------------------------------------


async def test_conversation_flagged_hand_off_to_human_routes_the_message_to_the_hand_off_queue(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel, hand_off_to_human=True)
    sid = new_sid()

    status, _, body = await world.inbound(tel, "I want to speak to a person", sid=sid)

    assert (status, body) == (200, EMPTY_TWIML)
    [handed] = await world.messages_for("handoff", key.conversation_id)
    context = handed["body"]
    assert context["hand_off_reason"] == "conversation_flagged"
    assert context["inbound"]["message_sid"] == sid
    assert context["inbound"]["body"] == "I want to speak to a person"
    assert context["inbound"]["sender"] == tel
    assert context["conversation"]["conversation_id"] == key.conversation_id
    assert context["conversation"]["recipient_first_name"] == "Lee"
    assert context["conversation"]["messages"][0]["content"] == "Hi Lee, first."
    assert context["company"] == {"company_id": world.tenant.company_id, "project_id": world.tenant.project_id}
    assert handed["attributes"]["conversationId"] == key.conversation_id
    record = await world.conversation(key)
    assert record["conversation_status"] == "handed_off"
    assert await world.staged(key.conversation_id) == []
    assert await world.lock(key.conversation_id) is None
    assert await world.messages_for("replies", key.conversation_id) == []


async def test_sender_listed_in_auto_queue_reply_message_from_number_is_handed_off(world):
    tel = unique_tel()
    listed = await world.add_tenant(auto_queue_reply_message_from_number=["+447700900555", tel])
    key = await world.seed_conversation(tel, tenant=listed)

    await world.inbound(tel, "it's me again")

    [handed] = await world.messages_for("handoff", key.conversation_id)
    assert handed["body"]["hand_off_reason"] == "sender_auto_queue"
    assert (await world.conversation(key))["conversation_status"] == "handed_off"
    assert await world.staged(key.conversation_id) == []
    assert await world.messages_for("replies", key.conversation_id) == []


async def test_project_with_auto_queue_reply_message_hands_every_reply_off(world):
    manual = await world.add_tenant(auto_queue_reply_message=True)
    tel = unique_tel()
    key = await world.seed_conversation(tel, tenant=manual)

    await world.inbound(tel, "hello")

    [handed] = await world.messages_for("handoff", key.conversation_id)
    assert handed["body"]["hand_off_reason"] == "project_auto_queue"
    assert await world.staged(key.conversation_id) == []


async def test_later_messages_of_a_handed_off_conversation_keep_going_to_the_hand_off_queue(world):
    tel = unique_tel()
    key = await world.seed_conversation(tel, hand_off_to_human=True)
    await world.inbound(tel, "first")
    assert len(await world.messages_for("handoff", key.conversation_id)) == 1
    await world.update_conversation(key, hand_off_to_human=False)  # the status alone must keep it with the human

    await world.inbound(tel, "second")

    [handed] = await world.messages_for("handoff", key.conversation_id)
    assert handed["body"]["inbound"]["body"] == "second"
    assert await world.staged(key.conversation_id) == []
