"""The reply consumer and delivery-status callbacks (SPEC §7), against the moto server and the provider sandboxes.

Replies are driven the way production drives them: signed webhooks stage fragments and queue the delayed
trigger, and the replies `QueueConsumer` from `build(..., expects_consumers=True)` takes it from SQS. Crashes are
simulated by leaving the conversation exactly as a crashed replier would (ledger entry, expired lease).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from service.domain.conversation import ConversationKey
from service.domain.timefmt import utc_iso
from tests.conftest import initiate_body
from tests.replies_support import (
    COMPANY_NUMBERS,
    RepliesWorld,
    eventually,
    new_sid,
    replies_world,
    sign,
    status_form,
    unique_tel,
)

STATUS = "/webhooks/twilio/status"


async def settled(world: RepliesWorld, key: ConversationKey) -> None:
    """Nothing is left to do: no staged fragment, no lock, no trigger queued, delayed or in flight."""

    async def idle() -> bool:
        depth = await world.queue_depth("replies")
        return (
            await world.staged(key.conversation_id) == []
            and await world.lock(key.conversation_id) is None
            and depth == {"visible": 0, "in_flight": 0, "delayed": 0}
        )

    await eventually(idle, timeout_s=10, what="stage, lock and replies queue are empty")


def user_and_assistant(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, content) of every message after the first (template) one."""
    return [(m["role"], m["content"]) for m in record["messages"][1:]]


# -- batching and answering -----------------------------------------------------------------------------------------


async def test_three_fragments_in_one_window_get_one_ai_call_and_one_reply_with_all_three_in_order(
    settings, deps, tenant
):
    async with replies_world(settings, deps, consumers=True, window_s=2) as world:
        tel = unique_tel()
        key = await world.seed_conversation(tel)
        sids = [new_sid() for _ in range(3)]
        for sid, body in zip(
            sids, ("Hi!", "Is the viewing still on Saturday?", "And can I bring my dog?"), strict=True
        ):
            assert (await world.inbound(tel, body, sid=sid))[0] == 200

        record = await world.wait_for_status(key, "reply_sent", timeout_s=15)
        await settled(world, key)

        joined = "Hi!\nIs the viewing still on Saturday?\nAnd can I bring my dog?"
        assert await world.providers.ai_responses_created() == 1
        [sent] = await world.providers.twilio_messages(to=f"whatsapp:{tel}")
        assert sent["from"] == f"whatsapp:{COMPANY_NUMBERS['whatsapp']}"
        assert sent["content_sid"] is None  # a free-form reply inside the 24-hour window
        assert sent["status_callback"] == world.public_url(STATUS)
        # What the AI was given, in the stored OpenAI conversation, and what it answered ({"content": ...}).
        [(_, given), (_, answered)] = await world.providers.thread_items(record["thread_id"])
        assert given == joined
        assert orjson.loads(answered) == {"content": sent["body"]}
        user, assistant = record["messages"][1:]
        assert user["role"] == "user"
        assert user["message_id"] == sids[0]
        assert user["content"] == joined
        assert user["timestamp"].endswith("Z")
        assert assistant["role"] == "assistant"
        assert assistant["message_id"] == sent["sid"]
        assert assistant["content"] == sent["body"]
        assert assistant["prompt_tokens"] > 0
        assert assistant["total_tokens"] == assistant["prompt_tokens"] + assistant["completion_tokens"]
        assert sorted(user["fragment_sids"]) == sorted(sids)  # the fragments it answered, on its user message
        assert "reply_attempt" not in record
        assert "reply_owner" not in record


async def test_fragment_arriving_while_a_reply_is_being_made_is_answered_by_the_next_reply(settings, deps, tenant):
    async with replies_world(settings, deps, consumers=True, window_s=0) as world:
        await world.providers.set_ai_latency(1.0)
        tel = unique_tel()
        key = await world.seed_conversation(tel)
        await world.inbound(tel, "What time on Saturday?")
        await eventually(world.providers.ai_calls_started, timeout_s=10, what="the AI is writing the first reply")

        await world.inbound(tel, "Oh, and is there parking?")

        async def two_replies() -> dict[str, Any] | None:
            record = await world.conversation(key)
            return record if len(record["messages"]) == 5 and record["conversation_status"] == "reply_sent" else None

        record = await eventually(two_replies, timeout_s=20, what="two replies recorded")
        await settled(world, key)
        sent = await world.providers.twilio_messages(to=f"whatsapp:{tel}")
        assert [m["body"] for m in sent] == [record["messages"][2]["content"], record["messages"][4]["content"]]
        assert await world.providers.ai_responses_created() == 2
        assert [(role, content) for role, content in user_and_assistant(record) if role == "user"] == [
            ("user", "What time on Saturday?"),
            ("user", "Oh, and is there parking?"),
        ]
        assert sum(len(m.get("fragment_sids", [])) for m in record["messages"]) == 2
        assert "replied_message_sids" not in record  # the conversation item does not grow with each reply


async def test_a_repeated_webhook_delivery_in_the_window_is_answered_once_and_leaves_nothing_behind(
    settings, deps, tenant
):
    """A repeat of a delivery answered 200 queues a second trigger (no queued mark is written for a window answered
    200): the second finds the claim held or the fragment answered, and answers nothing."""
    async with replies_world(settings, deps, consumers=True, window_s=1) as world:
        tel = unique_tel()
        key = await world.seed_conversation(tel)
        sid = new_sid()
        assert (await world.inbound(tel, "Can I bring my partner?", sid=sid))[0] == 200
        assert (await world.inbound(tel, "Can I bring my partner?", sid=sid))[0] == 200

        record = await world.wait_for_status(key, "reply_sent", timeout_s=15)
        await settled(world, key)

        assert len(await world.providers.twilio_messages(to=f"whatsapp:{tel}")) == 1
        assert await world.providers.ai_responses_created() == 1
        assert user_and_assistant(record)[0] == ("user", "Can I bring my partner?")
        assert len(record["messages"]) == 3


async def test_trigger_that_meets_a_live_reply_claim_is_retried_and_answered_once_the_claim_lapses(
    settings, deps, tenant
):
    async with replies_world(settings, deps, consumers=True, window_s=0) as world:
        tel = unique_tel()
        key = await world.seed_conversation(tel)
        lapses_at = time.time() + 2
        await world.update_conversation(
            key,
            conversation_status="processing_reply",
            status_before_reply="initial_message_sent",
            reply_owner="another-worker/abc",
            reply_lease_expires=lapses_at,
        )

        await world.inbound(tel, "Hello?")

        record = await world.wait_for_status(key, "reply_sent", timeout_s=20)
        assert time.time() >= lapses_at
        await settled(world, key)
        assert world.finished("retry", "reply_claim_held") >= 1
        assert user_and_assistant(record)[0] == ("user", "Hello?")
        assert len(await world.providers.twilio_messages(to=f"whatsapp:{tel}")) == 1
        assert await world.providers.ai_responses_created() == 1


async def _crashed_after_ledger(world: RepliesWorld, key: ConversationKey, body: str, content: str) -> dict[str, Any]:
    """Leave the conversation as a replier that crashed after writing its ledger entry: claim lapsed, attempt kept."""
    [fragment] = await world.staged(key.conversation_id)
    record = await world.conversation(key)
    attempt = {
        "message_sids": [fragment["message_sid"]],
        "text": body,
        "first_received_at": fragment["received_at"],
        "content": content,
        "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49},
        "thread_id": record["thread_id"],
        "attempted_at": time.time() - 1,
    }
    await world.update_conversation(
        key,
        conversation_status="processing_reply",
        status_before_reply="initial_message_sent",
        reply_owner="crashed-worker/abc",
        reply_lease_expires=time.time() - 1,
        reply_attempt=attempt,
    )
    return fragment


async def test_redelivered_trigger_after_a_crash_between_send_and_final_update_does_not_send_again(
    settings, deps, tenant
):
    async with replies_world(settings, deps, consumers=True, start=False, window_s=0) as world:
        tel = unique_tel()
        key = await world.seed_conversation(tel)
        await world.inbound(tel, "Is parking available?")  # staged, lock taken, trigger queued
        content = "Yes, there are two spaces in front of the house."
        fragment = await _crashed_after_ledger(world, key, "Is parking available?", content)
        sent_before_crash = await world.providers.twilio_send("whatsapp", tel, content)

        await world.start_consumers()

        record = await world.wait_for_status(key, "reply_sent", timeout_s=15)
        await settled(world, key)
        [only] = await world.providers.twilio_messages(to=f"whatsapp:{tel}")
        assert only["sid"] == sent_before_crash
        assert await world.providers.ai_responses_created() == 0
        user, assistant = record["messages"][1:]
        assert (user["message_id"], user["content"]) == (fragment["message_sid"], "Is parking available?")
        assert (assistant["message_id"], assistant["content"]) == (sent_before_crash, content)
        assert assistant["total_tokens"] == 49
        assert "reply_attempt" not in record


async def test_redelivered_trigger_after_a_crash_before_the_send_sends_the_recorded_reply_once(settings, deps, tenant):
    async with replies_world(settings, deps, consumers=True, start=False, window_s=0) as world:
        tel = unique_tel()
        key = await world.seed_conversation(tel)
        await world.inbound(tel, "Can we move it to Sunday?")
        content = "Sunday at 11:00 works, see you then."
        await _crashed_after_ledger(world, key, "Can we move it to Sunday?", content)

        await world.start_consumers()

        record = await world.wait_for_status(key, "reply_sent", timeout_s=15)
        await settled(world, key)
        [sent] = await world.providers.twilio_messages(to=f"whatsapp:{tel}")
        assert sent["body"] == content
        assert await world.providers.ai_responses_created() == 0  # the recorded reply is sent, not a new one
        assert record["messages"][2]["message_id"] == sent["sid"]


async def test_stop_inside_the_batching_window_cancels_the_pending_reply(settings, deps, tenant):
    async with replies_world(settings, deps, consumers=True, window_s=1) as world:
        tel = unique_tel()
        key = await world.seed_conversation(tel)
        await world.inbound(tel, "Tell me more")

        await world.inbound(tel, "STOP")

        await eventually(
            lambda: world.finished("done", "not_answerable"), timeout_s=10, what="the trigger is taken and dropped"
        )
        assert await world.providers.twilio_messages(to=f"whatsapp:{tel}") == []
        assert await world.providers.ai_responses_created() == 0
        assert (await world.conversation(key))["conversation_status"] == "opted_out"
        assert await world.lock(key.conversation_id) is None


async def test_stop_while_the_reply_is_being_sent_still_records_the_reply_that_went_out(settings, deps, tenant):
    """STOP lands after the ledger entry, while Twilio is sending: the reply goes out, so the record must hold it."""
    async with replies_world(settings, deps, consumers=True, window_s=0) as world:
        await world.providers.set_twilio_latency(2.0)
        tel = unique_tel()
        key = await world.seed_conversation(tel)
        await world.inbound(tel, "What is the asking price?")
        await eventually(world.providers.twilio_sends_started, timeout_s=10, what="Twilio is sending the reply")

        await world.inbound(tel, "STOP")

        [sent] = await eventually(
            lambda: world.providers.twilio_messages(to=f"whatsapp:{tel}"), timeout_s=10, what="the reply went out"
        )
        await eventually(world.consumer_idle, timeout_s=10, what="the replier finished")
        record = await world.conversation(key)
        assert record["conversation_status"] == "opted_out"
        assert record["messages"][-1]["message_id"] == sent["sid"]
        assert "reply_attempt" not in record


async def test_status_callback_that_arrives_before_the_reply_is_recorded_is_not_lost(settings, deps, tenant):
    """Twilio can report a message before its final update lands; here the replier crashed in between."""
    async with replies_world(settings, deps, consumers=True, start=False, window_s=0) as world:
        tel = unique_tel()
        key = await world.seed_conversation(tel)
        await world.inbound(tel, "Is the garden south-facing?")
        content = "It is, and it gets the sun all afternoon."
        await _crashed_after_ledger(world, key, "Is the garden south-facing?", content)
        sid = await world.providers.twilio_send("whatsapp", tel, content)
        assert await world.status_callback(tel, sid, "delivered") == 200

        await world.start_consumers()

        record = await world.wait_for_status(key, "reply_sent", timeout_s=15)
        assert record["messages"][-1]["message_id"] == sid
        assert record["messages"][-1].get("delivery_status") == "delivered"


# -- retries exhausted ----------------------------------------------------------------------------------------------


async def test_reply_whose_ai_fails_on_every_receive_is_dead_lettered_and_the_conversation_stays_answerable(
    settings, deps, tenant
):
    async with replies_world(settings, deps, consumers=True, window_s=0, ai_max_attempts=1) as world:
        openai = world.providers.openai.url
        fault = {"path_prefix": "/v1/responses", "method": "POST", "status": 500, "count": 1000, "retry_after": 1}
        await world.providers._call("POST", f"{openai}/_sandbox/faults", fault)
        tel = unique_tel()
        key = await world.seed_conversation(tel)
        await world.inbound(tel, "Is the viewing still on?")
        dlq = f"{world.settings.replies_queue_url}-dlq"

        async def dead_lettered() -> list[dict[str, Any]]:
            answer = await world.deps.aws.sqs.receive_message(QueueUrl=dlq, VisibilityTimeout=0)
            return list(answer.get("Messages", []))

        [dead] = await eventually(dead_lettered, timeout_s=30, what="the trigger is in the replies DLQ")
        assert orjson.loads(dead["Body"])["conversation_id"] == key.conversation_id
        record = await world.conversation(key)
        # Answerable still: back to its status before the claim, the failure noted, the trigger lock free.
        assert record["conversation_status"] == "initial_message_sent"
        failure = record["last_reply_failure"]
        assert failure["status"] == "failed_to_process_ai" and failure["failure_kind"] == "retries_exhausted"
        assert "ai_transient" in failure["reason"] and "retries_exhausted" in failure["reason"]
        assert "reply_owner" not in record and "status_before_reply" not in record
        assert await world.lock(key.conversation_id) is None
        # The DLQ copy lands before the consumer counts the finish (it first deletes the original, batched).
        await eventually(
            lambda: world.finished("dead_letter", "retries_exhausted"), timeout_s=10, what="the finish is counted"
        )
        assert world.finished("dead_letter", "retries_exhausted") == 1
        assert await world.providers.ai_calls_started() == 3

        await world.providers._call("POST", f"{openai}/_sandbox/reset")  # the AI is healthy again
        await world.inbound(tel, "Hello?")

        record = await world.wait_for_status(key, "reply_sent", timeout_s=15)
        await settled(world, key)
        [sent] = await world.providers.twilio_messages(to=f"whatsapp:{tel}")
        assert user_and_assistant(record) == [("user", "Is the viewing still on?\nHello?"), ("assistant", sent["body"])]


# -- end to end -----------------------------------------------------------------------------------------------------


async def test_initiated_conversation_is_answered_in_its_ai_thread_and_delivery_callbacks_land_on_the_reply(
    settings, deps, tenant
):
    async with replies_world(settings, deps, consumers=True, channels=("whatsapp",), window_s=0) as world:
        await world.providers.twilio_status_callbacks(enabled=True, delay_s=0.5)
        tel = unique_tel()
        body = initiate_body(
            "whatsapp",
            company_data={"company_id": world.tenant.company_id, "project_id": world.tenant.project_id},
            recipient_data={"recipient_tel": tel},
        )
        response = await world.client.post(
            "/initiate-conversation", json=body, headers={"x-api-key": world.tenant.api_key}
        )
        assert response.status == 200, await response.text()
        key = ConversationKey(tel, (await response.json())["conversation_id"])
        await world.wait_for_status(key, "initial_message_sent", timeout_s=15)

        report = await world.providers.twilio_inbound(
            world.public_url("/webhooks/twilio/whatsapp"), "whatsapp", tel, "Is Saturday still OK?"
        )
        assert report["status"] == 200

        record = await world.wait_for_status(key, "reply_sent", timeout_s=15)
        template, reply = await world.providers.twilio_messages(to=f"whatsapp:{tel}")
        assert template["content_sid"] is not None
        assert [m["message_id"] for m in record["messages"]] == [template["sid"], report["message_sid"], reply["sid"]]
        previous, given, answered = await world.providers.exchange(record["thread_id"])
        assert previous is not None and previous.startswith("resp_")  # the template's response: one AI call each
        assert given == [("user", "Is Saturday still OK?")]
        assert orjson.loads(answered) == {"content": reply["body"]}
        assert await world.providers.ai_responses_created() == 2

        async def delivered() -> bool:
            messages = (await world.conversation(key))["messages"]
            return messages[0].get("delivery_status") == messages[2].get("delivery_status") == "delivered"

        await eventually(delivered, timeout_s=10, what="both sent messages are marked delivered")


# -- delivery status callbacks --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def world(settings, deps, tenant) -> AsyncIterator[RepliesWorld]:
    # Status callbacks touch only their own conversation (fresh number each), so one world serves them all.
    async with replies_world(settings, deps) as built:
        yield built


async def _sent_message(world: RepliesWorld) -> tuple[str, ConversationKey, str]:
    """A conversation whose only message is an assistant message with a known Twilio SID."""
    tel, sid = unique_tel(), new_sid()
    message = {"message_id": sid, "timestamp": utc_iso(time.time()), "role": "assistant", "content": "Hi Lee"}
    key = await world.seed_conversation(tel, messages=[message], thread=False)
    return tel, key, sid


async def _delivery_status(world: RepliesWorld, key: ConversationKey, index: int = 0) -> str | None:
    status: str | None = (await world.conversation(key))["messages"][index].get("delivery_status")
    return status


async def test_status_callbacks_in_order_move_the_message_queued_sent_delivered_read(world):
    tel, key, sid = await _sent_message(world)

    for status in ("queued", "sent", "delivered", "read"):
        assert await world.status_callback(tel, sid, status) == 200
        assert await _delivery_status(world, key) == status


@pytest.mark.parametrize(
    ("first", "late"),
    [
        ("delivered", "sent"),
        ("read", "failed"),
        ("read", "delivered"),
        ("failed", "delivered"),
        ("undelivered", "sent"),
    ],
)
async def test_status_callback_arriving_out_of_order_never_moves_the_state_backwards(world, first, late):
    tel, key, sid = await _sent_message(world)
    await world.status_callback(tel, sid, first)

    assert await world.status_callback(tel, sid, late) == 200

    assert await _delivery_status(world, key) == first


async def test_repeated_status_callback_is_idempotent(world):
    tel, key, sid = await _sent_message(world)
    await world.status_callback(tel, sid, "delivered")
    before = (await world.conversation(key))["messages"][0]

    assert await world.status_callback(tel, sid, "delivered") == 200

    assert (await world.conversation(key))["messages"][0] == before
    assert before["delivery_status"] == "delivered"


async def test_status_callback_updates_only_the_message_it_names(world):
    tel, first_sid, second_sid = unique_tel(), new_sid(), new_sid()
    stamp = utc_iso(time.time())
    messages = [
        {"message_id": first_sid, "timestamp": stamp, "role": "assistant", "content": "Hi Lee"},
        {"message_id": "SM" + "f" * 32, "timestamp": stamp, "role": "user", "content": "Hi!"},
        {"message_id": second_sid, "timestamp": stamp, "role": "assistant", "content": "How can I help?"},
    ]
    key = await world.seed_conversation(tel, messages=messages, thread=False)

    await world.status_callback(tel, second_sid, "read")

    assert [m.get("delivery_status") for m in (await world.conversation(key))["messages"]] == [None, None, "read"]


async def test_unsigned_status_callback_is_refused_403_and_changes_nothing(world):
    tel, key, sid = await _sent_message(world)

    status, _, _ = await world.post_form(STATUS, status_form("whatsapp", tel, sid, "delivered"), signature=None)

    assert status == 403
    assert await _delivery_status(world, key) is None


async def test_tampered_status_callback_is_refused_403_and_changes_nothing(world):
    tel, key, sid = await _sent_message(world)
    form = status_form("whatsapp", tel, sid, "delivered")
    signature = sign(world.public_url(STATUS), form)
    form["MessageStatus"] = "read"

    status, _, _ = await world.post_form(STATUS, form, signature=signature)

    assert status == 403
    assert await _delivery_status(world, key) is None


async def test_status_callback_for_an_unknown_message_is_answered_200(world):
    tel, key, _ = await _sent_message(world)

    assert await world.status_callback(tel, new_sid(), "delivered") == 200

    assert await _delivery_status(world, key) is None


async def test_sms_status_callback_updates_the_sms_conversation(world):
    tel, sid = unique_tel(), new_sid()
    message = {"message_id": sid, "timestamp": utc_iso(time.time()), "role": "assistant", "content": "Hi Lee"}
    key = await world.seed_conversation(tel, channel="sms", messages=[message], thread=False)

    assert await world.status_callback(tel, sid, "delivered", channel="sms") == 200

    assert await _delivery_status(world, key) == "delivered"
