"""Status callbacks that arrive before the final update records their message (defect 9).

Twilio does not retry a status callback, and a crash-recovered send is recorded only after a redelivery has
reconciled it: a signed callback for a SID not (yet) in `messages` is kept on the conversation awaiting it and
applied, forward-only, by the final update that appends that SID (template sender or replier), whichever of the
two writes lands first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.adapters.aws.conversation_claims import DynamoConversationClaims
from service.adapters.aws.conversation_codec import record_from_item
from service.adapters.aws.conversation_lookup import DynamoConversationLookup
from service.adapters.aws.early_delivery import PENDING_ATTRIBUTE, PENDING_CAP
from service.adapters.aws.reply_claims import DynamoReplyClaims
from service.domain.conversation import ConversationKey, ConversationRecord, Message
from service.domain.delivery_state import DeliveryStatus
from service.domain.timefmt import utc_iso
from tests.replies_support import RepliesWorld, new_sid, replies_world, unique_tel

OWNER = "replier-1"


@pytest.fixture(scope="module")
async def world(settings, deps, tenant) -> AsyncIterator[RepliesWorld]:
    # Every test has its own recipient number, so one world serves them all.
    async with replies_world(settings, deps) as built:
        yield built


def template_claims(world: RepliesWorld) -> DynamoConversationClaims:
    settings = world.settings
    return DynamoConversationClaims(
        world.deps.aws.dynamodb,
        settings.conversations_table,
        messages_table=settings.messages_table,
        index_shards=settings.conversation_index_shards,
    )


def reply_claims(world: RepliesWorld) -> DynamoReplyClaims:
    return DynamoReplyClaims(
        world.deps.aws.dynamodb, world.settings.conversations_table, messages_table=world.settings.messages_table
    )


def lookup(world: RepliesWorld) -> DynamoConversationLookup:
    return DynamoConversationLookup(
        world.deps.aws.dynamodb, world.settings.conversations_table, messages_table=world.settings.messages_table
    )


def assistant(sid: str, delivery_status: str | None = None) -> Message:
    return Message(sid, "assistant", "Hi", utc_iso(time.time()), delivery_status=delivery_status)


async def sending_template(world: RepliesWorld, **attributes: Any) -> tuple[str, ConversationKey]:
    """A conversation whose template was sent but whose final update has not landed (a crash in between)."""
    tel = unique_tel()
    key = await world.seed_conversation(
        tel,
        status="processing",
        messages=[],
        send_state="attempting",
        generated_content={"1": "Hi"},  # the ledger as the attempt left it: the template message's content
        claim_owner="template-1",
        claim_expires_at=0,
        thread=False,
        **attributes,
    )
    return tel, key


async def finalise_template(world: RepliesWorld, key: ConversationKey, message: Message) -> bool:
    return await template_claims(world).finalise(key, message, "conv_test", 5)


async def sending_reply(world: RepliesWorld) -> tuple[str, ConversationKey]:
    """A conversation whose reply went out but whose final update has not landed."""
    tel = unique_tel()
    key = await world.seed_conversation(
        tel,
        status="processing_reply",
        reply_owner=OWNER,
        reply_lease_expires=time.time() + 60,
        reply_attempt={"batch": "x"},
        status_before_reply="initial_message_sent",
        thread=False,
    )
    return tel, key


async def finalise_reply(world: RepliesWorld, key: ConversationKey, reply: Message) -> ConversationRecord | None:
    user_sid = new_sid()
    user = Message(user_sid, "user", "Hello?", utc_iso(time.time()))
    claimed = record_from_item(await world.conversation(key))
    return await reply_claims(world).finalise(key, OWNER, [user, reply], [user_sid], "resp_test", 5, claimed=claimed)


async def message_named(world: RepliesWorld, key: ConversationKey, sid: str) -> dict[str, Any]:
    record = await world.conversation(key)
    [message] = [m for m in record.get("messages") or [] if m.get("message_id") == sid]
    return message


async def pending(world: RepliesWorld, key: ConversationKey) -> dict[str, Any]:
    return dict((await world.conversation(key)).get(PENDING_ATTRIBUTE) or {})


# -- the callback first, then the final update ----------------------------------------------------------------------


async def test_callback_before_the_template_final_update_is_applied_when_the_message_is_appended(world):
    tel, key = await sending_template(world)
    sid = new_sid()

    assert await world.status_callback(tel, sid, "delivered") == 200
    assert await finalise_template(world, key, assistant(sid))

    message = await message_named(world, key, sid)
    assert message["delivery_status"] == "delivered"
    assert message["delivery_updated_at"].endswith("Z")
    assert sid not in await pending(world, key)


async def test_callback_before_the_reply_final_update_is_applied_when_the_reply_is_appended(world):
    tel, key = await sending_reply(world)
    sid = new_sid()

    assert await world.status_callback(tel, sid, "read") == 200
    assert await finalise_reply(world, key, assistant(sid)) is not None

    record = await world.conversation(key)
    assert record["conversation_status"] == "reply_sent"
    assert record["messages"][-1]["message_id"] == sid
    assert record["messages"][-1]["delivery_status"] == "read"
    assert sid not in await pending(world, key)


async def test_two_early_callbacks_out_of_order_keep_the_later_state(world):
    tel, key = await sending_template(world)
    sid = new_sid()

    assert await world.status_callback(tel, sid, "delivered") == 200
    assert await world.status_callback(tel, sid, "sent") == 200  # older news, arriving later
    assert await finalise_template(world, key, assistant(sid))

    assert (await message_named(world, key, sid))["delivery_status"] == "delivered"


async def test_early_callbacks_in_order_move_the_kept_state_forward(world):
    tel, key = await sending_template(world)
    sid = new_sid()

    for status in ("queued", "sent", "delivered"):
        assert await world.status_callback(tel, sid, status) == 200
    assert (await pending(world, key))[sid]["status"] == "delivered"
    assert await finalise_template(world, key, assistant(sid))

    assert (await message_named(world, key, sid))["delivery_status"] == "delivered"


async def test_kept_state_never_moves_a_message_recorded_with_a_later_state_backwards(world):
    tel, key = await sending_reply(world)
    sid = new_sid()
    assert await world.status_callback(tel, sid, "sent") == 200

    # The replier reconciled with Twilio, which already said "delivered".
    await finalise_reply(world, key, assistant(sid, delivery_status="delivered"))

    assert (await message_named(world, key, sid))["delivery_status"] == "delivered"
    assert sid not in await pending(world, key)


async def test_callback_after_the_final_update_still_applies_directly(world):
    tel, key = await sending_template(world)
    sid = new_sid()
    assert await finalise_template(world, key, assistant(sid))

    assert await world.status_callback(tel, sid, "delivered") == 200

    assert (await message_named(world, key, sid))["delivery_status"] == "delivered"
    assert await pending(world, key) == {}


async def test_callback_whose_lookup_missed_a_final_update_that_landed_meanwhile_is_applied(world):
    """The race the other way: the callback read `messages` just before the final update appended the SID."""
    _, key = await sending_template(world)
    sid = new_sid()
    assert await finalise_template(world, key, assistant(sid))

    held = await lookup(world).hold_delivery_status(key, sid, DeliveryStatus.DELIVERED)

    assert held
    assert (await message_named(world, key, sid))["delivery_status"] == "delivered"
    assert sid not in await pending(world, key)


async def test_early_callback_is_kept_on_the_conversation_awaiting_its_final_update_not_a_newer_one(world):
    tel, awaiting = await sending_template(world, created_at="2026-01-01T10:00:00.000Z")
    newer = await world.seed_conversation(tel, created_at="2026-01-01T11:00:00.000Z", thread=False)
    sid = new_sid()

    assert await world.status_callback(tel, sid, "delivered") == 200
    assert await finalise_template(world, awaiting, assistant(sid))

    assert (await message_named(world, awaiting, sid))["delivery_status"] == "delivered"
    assert sid not in await pending(world, newer)


async def test_kept_callbacks_are_bounded_per_conversation(world):
    tel, key = await sending_template(world)

    for _ in range(PENDING_CAP + 3):
        assert await world.status_callback(tel, new_sid(), "sent") == 200

    assert len(await pending(world, key)) == PENDING_CAP


async def test_a_full_map_drops_its_oldest_entry_to_keep_a_new_callback(world):
    """Kept on up to three conversations but forgotten only by the one recording the message: a map filled by
    such leftovers must still keep the next early callback (in place of the oldest), not refuse it for good."""
    tel, key = await sending_template(world)
    sids = [new_sid() for _ in range(PENDING_CAP + 3)]

    for sid in sids:
        assert await world.status_callback(tel, sid, "sent") == 200
        await asyncio.sleep(0.002)  # distinct `at` stamps (ms resolution)

    kept = await pending(world, key)
    assert len(kept) == PENDING_CAP
    assert set(kept) == set(sids[3:])
    assert await finalise_template(world, key, assistant(sids[-1]))
    assert (await message_named(world, key, sids[-1]))["delivery_status"] == "sent"


async def test_callback_for_a_pair_with_no_conversation_is_answered_200_and_stores_nothing(world):
    tel = unique_tel()

    assert await world.status_callback(tel, new_sid(), "delivered") == 200

    assert await lookup(world).conversations_between("whatsapp", "+447700900001", tel) == []


async def test_failed_early_callback_is_applied_and_nothing_moves_it(world):
    tel, key = await sending_template(world)
    sid = new_sid()

    assert await world.status_callback(tel, sid, "undelivered") == 200
    assert await world.status_callback(tel, sid, "delivered") == 200  # cannot follow a terminal failure
    assert await finalise_template(world, key, assistant(sid))

    assert (await message_named(world, key, sid))["delivery_status"] == "undelivered"
