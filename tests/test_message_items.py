"""A conversation's messages as items of their own (`message_items`), on moto: the conversation item keeps its
size however long the conversation runs (so each final update costs the same write units at its first exchange and
its five-hundredth), a retried final update records its messages once, and records written before keep their
embedded messages, read first."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from bench.update_expression import item_size
from bench.write_units import index_units, table_shapes, units
from service.adapters.aws import conversation_codec as codec
from service.adapters.aws import message_items
from service.adapters.aws.conversation_admin import ConversationAdmin
from service.adapters.aws.conversation_claims import DynamoConversationClaims
from service.adapters.aws.conversation_lookup import DynamoConversationLookup
from service.adapters.aws.dynamo_codec import from_item, to_item
from service.adapters.aws.reply_claims import DynamoReplyClaims
from service.bootstrap import Dependencies
from service.domain.claims import Claim
from service.domain.conversation import (
    ConversationKey,
    ConversationRecord,
    Message,
    NewConversation,
    TemplateDraft,
    TokenUsage,
)
from service.domain.delivery_state import DeliveryStatus
from service.domain.timefmt import utc_iso
from tests.fakes import INDEX_SHARDS

EXCHANGES = 510
SECONDS_PER_EXCHANGE = 60.0  # a brisk chat: the recipient writes, the batching window, the reply
MEASURED = (1, 200, EXCHANGES)
REPLY = "Thanks for getting back to us. The viewing is on Saturday at 11:00; reply here if you need to move it. " * 2


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def new_conversation() -> NewConversation:
    tel = f"+4477{uuid.uuid4().int % 10**8:08d}"
    request_id = str(uuid.uuid4())
    return NewConversation(
        key=ConversationKey(tel, f"ci-growth#pi-growth#{request_id}#447700900002"),
        request_id=request_id,
        channel="sms",
        company_id="ci-growth",
        project_id="pi-growth",
        company_address="+447700900002",
        recipient={"recipient_tel": tel, "recipient_first_name": "Lee"},
        ai_config={"api_key_reference": "ref", "model": "gpt-x", "replies": {"instructions": "Answer briefly."}},
        channel_config={"sms_credentials_id": "comms/sms-credentials/ci-growth/pi-growth/twilio"},
        processor_version="p",
    )


def sid() -> str:
    return f"SM{uuid.uuid4().hex}"


class Conversations:
    """The three stores on one moto, reading raw items to measure them."""

    def __init__(self, deps: Dependencies, clock: Clock, dynamodb: Any = None) -> None:
        """`dynamodb`: the client the stores use (default: the shared one)."""
        settings, dynamodb = deps.settings, dynamodb or deps.aws.dynamodb
        self.settings, self.dynamodb, self.clock = settings, dynamodb, clock
        tables = (settings.conversations_table,)
        shards = settings.conversation_index_shards
        self.claims = DynamoConversationClaims(
            dynamodb, *tables, clock, messages_table=settings.messages_table, index_shards=shards
        )
        self.replies = DynamoReplyClaims(dynamodb, *tables, clock, messages_table=settings.messages_table)
        self.lookup = DynamoConversationLookup(dynamodb, *tables, clock=clock, messages_table=settings.messages_table)
        self.admin = ConversationAdmin(dynamodb, *tables, messages_table=settings.messages_table, index_shards=shards)

    async def raw(self, key: ConversationKey) -> dict[str, Any]:
        answer = await self.dynamodb.get_item(
            TableName=self.settings.conversations_table, Key=codec.item_key(key), ConsistentRead=True
        )
        return answer["Item"]

    async def message_items(self, key: ConversationKey, *positions: int) -> list[dict[str, Any]]:
        items = []
        for position in positions:
            answer = await self.dynamodb.get_item(
                TableName=self.settings.messages_table, Key=message_items.item_key(key, position)
            )
            items.append(answer["Item"])
        return items

    async def open_record(self, new: NewConversation) -> ConversationRecord:
        """The conversation as a webhook finds it (the pair's open conversation)."""
        record = await self.lookup.find_open("sms", "+447700900002", new.key.primary_channel)
        assert record is not None
        return record

    async def started(self, new: NewConversation) -> ConversationKey:
        await self.sent_first(new)
        return new.key

    async def sent_first(self, new: NewConversation) -> Message:
        """The template sender's writes: the claim, the attempt (the ledger with the content) and the final update."""
        answer = await self.claims.claim(new, "template-1", self.clock() + 60, self.clock())
        assert answer.verdict is Claim.TAKE
        usage = TokenUsage(900, 60, 960)
        draft = TemplateDraft("resp_000000", {"body": REPLY}, usage, self.clock())
        assert await self.claims.record_attempt(new.key, "template-1", draft)
        first = Message(sid(), "assistant", REPLY, utc_iso(self.clock()), usage)
        assert await self.claims.finalise(new.key, first, "resp_000000", 1200)
        return first

    async def exchange(self, key: ConversationKey, n: int) -> tuple[ConversationRecord, list[Message]]:
        self.clock.now += SECONDS_PER_EXCHANGE
        now = self.clock()
        answer = await self.replies.claim(key, "replier-1", now + 60, now)
        assert answer.verdict is Claim.TAKE and answer.record is not None
        user_sid = sid()
        messages = [
            Message(user_sid, "user", "Is it still on for Saturday?", utc_iso(now)),
            Message(sid(), "assistant", REPLY, utc_iso(now), TokenUsage(1200, 60, 1260), "sent"),
        ]
        finalised = await self.replies.finalise(
            key, "replier-1", messages, [user_sid], f"resp_{n:06d}", 1500, claimed=answer.record
        )
        assert finalised is not None
        return answer.record, messages


def conversation_write_units(settings: Any, before: dict[str, Any], after: dict[str, Any]) -> int:
    """What DynamoDB charges one update of the conversation item: the larger image, and each index's entry."""
    shape = table_shapes(settings)[settings.conversations_table]
    base = units(max(item_size(before), item_size(after)))
    return base + sum(index_units(index, before, after) for index in shape.indexes)


async def test_a_final_update_costs_the_same_write_units_at_the_first_and_the_five_hundredth_exchange(
    deps: Dependencies,
) -> None:
    clock = Clock()
    store = Conversations(deps, clock)
    key = await store.started(new_conversation())
    sizes: dict[int, int] = {}
    costs: dict[int, int] = {}
    after = await store.raw(key)
    for n in range(1, EXCHANGES + 1):
        before = after
        await store.exchange(key, n)
        after = await store.raw(key)
        sizes[n] = item_size(after)
        if n in MEASURED:  # and each message a new item of its own: one write of its own size, in no index
            messages = await store.message_items(key, 2 * n - 1, 2 * n)
            costs[n] = conversation_write_units(deps.settings, before, after) + sum(
                units(item_size(item)) for item in messages
            )

    # The item does not grow (a byte or two at most: the message count's digits), so neither does the cost.
    assert max(sizes.values()) - sizes[1] <= 2, (sizes[1], max(sizes.values()))
    assert costs[1] == costs[200] == costs[EXCHANGES], costs
    record = await store.admin.get(key)
    assert record is not None and record.recorded_messages == 1 + 2 * EXCHANGES
    assert [m.role for m in record.messages[-3:]] == ["assistant", "user", "assistant"]


async def test_a_retried_reply_final_update_records_its_messages_once(deps: Dependencies) -> None:
    clock = Clock()
    store = Conversations(deps, clock)
    key = await store.started(new_conversation())
    claimed, messages = await store.exchange(key, 1)

    again = await store.replies.finalise(
        key, "replier-1", messages, [messages[0].message_id], "resp_000001", 1500, claimed=claimed
    )

    assert again is None  # the claim was dropped by the first: refused, nothing counted twice
    record = await store.admin.get(key)
    assert record is not None
    assert [m.message_id for m in record.messages] == [record.messages[0].message_id, *(m.message_id for m in messages)]
    assert record.recorded_messages == 3


async def test_a_delivery_state_applied_between_a_final_update_and_its_retry_is_kept(deps: Dependencies) -> None:
    store = Conversations(deps, Clock())
    new = new_conversation()
    message = await store.sent_first(new)
    record = await store.open_record(new)
    found = await store.lookup.find_message(record, message.message_id)
    assert found is not None and found[0] == 0
    assert await store.lookup.set_delivery_status(record, 0, message.message_id, DeliveryStatus.DELIVERED)

    assert not await store.claims.finalise(new.key, message, "resp_000000", 1200)  # a retry: already finalised

    [kept] = await store.lookup.recent_messages(record, 5)
    assert kept.delivery_status == "delivered"


async def test_a_record_with_embedded_messages_reads_them_first_and_new_ones_after(deps: Dependencies) -> None:
    clock = Clock()
    store = Conversations(deps, clock)
    new = new_conversation()
    old = [
        {"message_id": sid(), "timestamp": utc_iso(clock() - 90), "role": "assistant", "content": "Hi Lee"},
        {"message_id": sid(), "timestamp": utc_iso(clock() - 60), "role": "user", "content": "Hello"},
        {"message_id": sid(), "timestamp": utc_iso(clock() - 30), "role": "assistant", "content": "Saturday?"},
    ]
    legacy = {
        **codec.new_conversation_fields(new, utc_iso(clock()), INDEX_SHARDS),
        **codec.item_fields(new.key),
        codec.STATUS: "reply_sent",
        "send_state": "sent",
        codec.MESSAGES: old,
        codec.REPLIED_SIDS: {old[1]["message_id"]},  # a string set, as older records hold it
    }
    await deps.aws.dynamodb.put_item(TableName=deps.settings.conversations_table, Item=to_item(legacy))

    _, messages = await store.exchange(new.key, 1)

    record = await store.admin.get(new.key)
    assert record is not None
    assert [m.message_id for m in record.messages] == [
        *(m["message_id"] for m in old),
        *(m.message_id for m in messages),
    ]
    claimed = codec.record_from_item(from_item(await store.raw(new.key)))
    assert [m.content for m in await store.replies.recent_messages(claimed, 3)] == [
        "Saturday?",
        "Is it still on for Saturday?",
        REPLY,
    ]
    found = await store.lookup.find_message(claimed, old[2]["message_id"])
    assert found is not None and found[0] == 2  # an embedded message keeps its position
    assert await store.lookup.set_delivery_status(claimed, 2, old[2]["message_id"], DeliveryStatus.READ)
    reread = codec.record_from_item(from_item(await store.raw(new.key)))
    assert (await store.lookup.recent_messages(reread, 5))[2].delivery_status == "read"


async def test_the_template_message_is_the_records_own_and_its_final_update_writes_no_item(deps: Dependencies) -> None:
    store = Conversations(deps, Clock())
    new = new_conversation()

    message = await store.sent_first(new)

    answer = await store.dynamodb.get_item(
        TableName=store.settings.messages_table, Key=message_items.item_key(new.key, 0), ConsistentRead=True
    )
    assert "Item" not in answer
    record = await store.admin.get(new.key)
    assert record is not None and record.messages == (message,)  # content, usage and id from the ledger


async def test_the_template_messages_delivery_state_is_kept_in_its_positions_item_and_read_over_the_record(
    deps: Dependencies,
) -> None:
    store = Conversations(deps, Clock())
    new = new_conversation()
    message = await store.sent_first(new)
    record = await store.open_record(new)

    assert await store.lookup.set_delivery_status(record, 0, message.message_id, DeliveryStatus.SENT)
    assert await store.lookup.set_delivery_status(record, 0, message.message_id, DeliveryStatus.DELIVERED)
    assert not await store.lookup.set_delivery_status(record, 0, message.message_id, DeliveryStatus.SENT)  # stale

    [kept] = await store.message_items(new.key, 0)
    assert set(from_item(kept)) == {
        "conversation_key",
        "position",
        "message_id",
        "delivery_status",
        "delivery_updated_at",
    }
    assert await store.lookup.find_message(record, message.message_id) == (
        0,
        replace(message, delivery_status="delivered"),
    )
    [first] = await store.lookup.recent_messages(record, 5)
    assert first == replace(message, delivery_status="delivered")
    shown = await store.admin.get(new.key)
    assert shown is not None and shown.messages[0].delivery_status == "delivered"


async def test_a_record_whose_template_message_was_written_as_an_item_reads_it_as_before(deps: Dependencies) -> None:
    store = Conversations(deps, Clock())
    new = new_conversation()
    await store.claims.claim(new, "template-1", store.clock() + 60, store.clock())
    message = Message(sid(), "assistant", "Hi Lee (as the item said)", utc_iso(store.clock()), TokenUsage(1, 2, 3))
    # What the previous release's final update wrote: the item, then the record without `first_message_at`.
    await message_items.MessageItems(store.dynamodb, store.settings.messages_table).record(new.key, 0, [message])
    update = "SET send_state = :sent, provider_message_id = :sid, #count = :one, conversation_status = :status"
    values = {":sent": "sent", ":sid": message.message_id, ":one": 1, ":status": "initial_message_sent"}
    params = codec.update_params(
        store.settings.conversations_table,
        new.key,
        update,
        "attribute_exists(conversation_id)",
        values,
        {"#count": codec.MESSAGE_COUNT},
    )
    await store.dynamodb.update_item(**params)
    record = codec.record_from_item(from_item(await store.raw(new.key)))

    assert record.ledger_message is None
    assert await store.lookup.recent_messages(record, 5) == (message,)
    assert await store.lookup.set_delivery_status(record, 0, message.message_id, DeliveryStatus.READ)
    assert (await store.lookup.recent_messages(record, 5))[0].delivery_status == "read"


class CountingDynamoDB:
    """The shared client, with the Query calls made through it counted."""

    def __init__(self, dynamodb: Any) -> None:
        self._dynamodb = dynamodb
        self.queries = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dynamodb, name)

    def query(self, **params: Any) -> Any:
        self.queries += 1
        return self._dynamodb.query(**params)


async def test_a_first_replys_history_is_the_records_template_message_read_from_no_item(deps: Dependencies) -> None:
    store = Conversations(deps, Clock())
    new = new_conversation()
    message = await store.sent_first(new)
    record = await store.open_record(new)
    assert await store.lookup.set_delivery_status(record, 0, message.message_id, DeliveryStatus.DELIVERED)
    counting = CountingDynamoDB(store.dynamodb)

    history = await Conversations(deps, store.clock, counting).replies.recent_messages(record, 40)

    assert history == (message,)  # content and fragments; the delivery state, kept in position 0's item, not read
    assert counting.queries == 0


async def test_a_later_replys_history_reads_the_items_after_the_template_message(deps: Dependencies) -> None:
    store = Conversations(deps, Clock())
    new = new_conversation()
    message = await store.sent_first(new)
    _, first_exchange = await store.exchange(new.key, 1)
    record = await store.open_record(new)

    history = await store.replies.recent_messages(record, 40)

    assert [m.message_id for m in history] == [message.message_id, *(m.message_id for m in first_exchange)]
    assert [m.fragment_sids for m in history] == [(), (first_exchange[0].message_id,), ()]
