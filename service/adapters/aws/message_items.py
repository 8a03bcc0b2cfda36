"""A conversation's messages, one item each, in the messages table (`settings.messages_table`).

Key: `conversation_key` = "<primary_channel>#<conversation_id>" (the conversation's table key in one string) and
`position` = the message's place in the conversation, zero-padded ("0000000007") so that the string order is the
conversation's order. A conversation item then never grows with its messages: each final update writes the new
message items (about the size of the message) and one conversations-table update of constant size, on the first
exchange as on the five-hundredth.

Why a position and not a timestamp: the position is fixed before the final update by the record the claim read
(`ConversationRecord.recorded_messages`), so a retried final update, or a takeover's reconcile of the same send,
writes the very same key again: a message is recorded once whatever the retries, and the order is the order of the
exchanges, whatever the clocks of the writers. Each message is written with a condition that keeps the stored one
when it is the same message (its delivery state included); the conversations-table update that raises
`message_count` comes after, so a reader bounded by the record's count never sees a half-recorded exchange.

The template message (position 0) is the record's own: its send ledger already holds the content, the usage and
the provider id, so the template's final update writes no item for it, only `first_message_at`
(`ConversationRecord.ledger_message`); one request fewer per conversation. Its delivery state, which changes
after it is recorded, lives in position 0's item, created by the first status callback (`set_status(create=True)`)
and holding only `message_id` and the state: the readers here lay it over the record's message.

Records written before messages became items keep theirs embedded in the conversation item (`messages`): those are
positions 0..k-1 and the items start at k; every read here merges them in, oldest first. Records written while
the template message was an item (no `first_message_at`) read that item as any other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from service.adapters.aws.conversation_codec import (
    embedded_elements,
    message_element,
    message_from_element,
    record_from_item,
)
from service.adapters.aws.dynamo_calls import get_item, query_items, refusal, update_or_refusal
from service.adapters.aws.dynamo_codec import attribute_values, to_item
from service.adapters.aws.resources import MESSAGES_PARTITION_KEY, MESSAGES_SORT_KEY
from service.domain.conversation import ConversationKey, ConversationRecord, Message

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

PARTITION = MESSAGES_PARTITION_KEY
POSITION = MESSAGES_SORT_KEY
POSITION_DIGITS = 10
FIRST = 0  # the template message's position (the record's own: `ConversationRecord.ledger_message`)
DELIVERY_FIELDS = ("delivery_status", "delivery_updated_at")  # what position 0's item holds for a ledger message
FIND_PAGE_SIZE = 20  # a status callback is about one of the newest messages: the first page finds it
# Keep a stored message that is this one (a retried final update must not drop a delivery state applied meanwhile).
NEW_OR_OTHER = "attribute_not_exists(#pos) OR message_id <> :id"
POSITION_NAME = {"#pos": POSITION}  # `position` is a DynamoDB reserved word


def conversation_key(key: ConversationKey) -> str:
    return f"{key.primary_channel}#{key.conversation_id}"


def position_key(position: int) -> str:
    return f"{position:0{POSITION_DIGITS}d}"


def item_key(key: ConversationKey, position: int) -> dict[str, Any]:
    return {PARTITION: {"S": conversation_key(key)}, POSITION: {"S": position_key(position)}}


def _position_of(item: Mapping[str, Any]) -> int:
    return int(str(item.get(POSITION, "0")))


def _overlaid(first: Message, item: Mapping[str, Any] | None) -> Message:
    """The record's template message with the delivery state its position's item keeps (if it has one yet)."""
    status = None if item is None else item.get("delivery_status")
    return first if status is None else replace(first, delivery_status=str(status))


def _split_first(items: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Position 0's item (if the items read start there) and the rest."""
    if items and _position_of(items[0]) == FIRST:
        return items[0], items[1:]
    return None, items


@dataclass(frozen=True, slots=True)
class MessageItems:
    dynamodb: DynamoDBClient
    table: str

    async def record(self, key: ConversationKey, first: int, messages: Sequence[Message]) -> dict[str, int]:
        """Write `messages` at positions `first`, `first` + 1, ... (concurrently: one PutItem each, the cheapest
        write; a transaction would cost twice). Returns each provider id's position."""
        positions = {message.message_id: first + offset for offset, message in enumerate(messages)}
        await asyncio.gather(*(self._put(key, first + offset, m) for offset, m in enumerate(messages)))
        return positions

    async def _put(self, key: ConversationKey, position: int, message: Message) -> None:
        item = {PARTITION: conversation_key(key), POSITION: position_key(position), **message_element(message)}
        put = self.dynamodb.put_item(
            TableName=self.table,
            Item=to_item(item),
            ConditionExpression=NEW_OR_OTHER,
            ExpressionAttributeNames=POSITION_NAME,
            ExpressionAttributeValues=attribute_values({":id": message.message_id}),
        )
        await refusal(put, "PutItem")  # refused: this message is stored there already

    async def recent(
        self, record: ConversationRecord, limit: int | None = None, *, delivery_states: bool = True
    ) -> tuple[Message, ...]:
        """The newest `limit` (None: all) of the messages `record` has recorded, oldest first: one Query of the
        positions wanted (none for a record whose messages are all embedded), the embedded ones before them, the
        record's own template message (with its delivery state) at position 0.

        `delivery_states=False` (a reply's context and its answered fragments, which need no delivery state):
        the template message as the record holds it, its position's item not read, so a conversation's first
        reply reads no item at all."""
        first = record.ledger_message
        floor = len(record.messages) if first is None or delivery_states else max(len(record.messages), FIRST + 1)
        items = await self._items(record, floor, limit)
        messages: list[Message]
        if first is not None and (limit is None or limit >= record.recorded_messages):
            kept, rest = _split_first(items)
            messages = [_overlaid(first, kept), *(message_from_element(item) for item in rest)]
        else:
            messages = [message_from_element(item) for item in items]
        room = len(record.messages) if limit is None else min(len(record.messages), max(0, limit - len(messages)))
        return (*record.messages[len(record.messages) - room :], *messages)

    async def stored(self, item: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every message of a stored conversation item as stored (each element as it is, delivery times and all),
        oldest first: the embedded ones, the record's own template message, then the items without their keys.
        What an operator is shown."""
        embedded = embedded_elements(item)
        record = record_from_item(item)
        items = await self._items(record, len(embedded), None)
        first = record.ledger_message
        head: list[dict[str, Any]] = []
        if first is not None:
            kept, items = _split_first(items)
            head = [{**message_element(first), **{k: kept[k] for k in DELIVERY_FIELDS if kept and k in kept}}]
        rest = ({k: v for k, v in found.items() if k not in (PARTITION, POSITION)} for found in items)
        return [*embedded, *head, *rest]

    async def _items(self, record: ConversationRecord, floor: int, limit: int | None) -> list[dict[str, Any]]:
        """The message items among the newest `limit` positions the record counts, from position `floor` on (after
        its embedded ones)."""
        end = record.recorded_messages
        start = floor if limit is None else max(floor, end - limit)
        if end <= start:
            return []
        query = {
            "TableName": self.table,
            "KeyConditionExpression": "#pk = :pk AND #pos BETWEEN :first AND :last",
            "ExpressionAttributeNames": {"#pk": PARTITION, "#pos": POSITION},
            "ExpressionAttributeValues": attribute_values(
                {":pk": conversation_key(record.key), ":first": position_key(start), ":last": position_key(end - 1)}
            ),
            "ConsistentRead": True,  # the record's count was raised after these were written
        }
        return await query_items(self.dynamodb, query)

    async def find(
        self, key: ConversationKey, sid: str, embedded: Sequence[Message] = (), first: Message | None = None
    ) -> tuple[int, Message] | None:
        """The message with this provider id and its position: the record's own template message (`first`, its
        delivery state read from position 0's item), else the items newest first (read consistently, up to the
        first page that has it), then the embedded ones."""
        if first is not None and first.message_id == sid:
            kept = await get_item(self.dynamodb, TableName=self.table, Key=item_key(key, FIRST), ConsistentRead=True)
            return FIRST, _overlaid(first, kept)
        query = {
            "TableName": self.table,
            "KeyConditionExpression": "#pk = :pk",
            "FilterExpression": "message_id = :sid",
            "ExpressionAttributeNames": {"#pk": PARTITION},
            "ExpressionAttributeValues": attribute_values({":pk": conversation_key(key), ":sid": sid}),
            "ScanIndexForward": False,
            "ConsistentRead": True,
            "Limit": FIND_PAGE_SIZE,
        }
        found = await query_items(self.dynamodb, query, until_found=True)
        if found:
            return _position_of(found[0]), message_from_element(found[0])
        for index, message in enumerate(embedded):
            if message.message_id == sid:
                return index, message
        return None

    async def set_status(
        self,
        key: ConversationKey,
        position: int,
        update: str,
        condition: str,
        values: Mapping[str, Any],
        *,
        create: bool = False,
    ) -> bool | None:
        """A conditional update of the message item at `position`: True applied, False refused, None when there
        is no such item (the message may be embedded in an older record). `create`: the record's own template
        message, whose delivery state lives in position 0's item: the first state creates it (with `:sid`)."""
        if create:
            update, guard = f"{update}, message_id = :sid", f"attribute_not_exists(#pos) OR ({condition})"
        else:
            guard = f"attribute_exists(#pos) AND ({condition})"
        applied, old = await update_or_refusal(
            self.dynamodb,
            "UpdateItem",
            TableName=self.table,
            Key=item_key(key, position),
            UpdateExpression=update,
            ConditionExpression=guard,
            ExpressionAttributeNames=POSITION_NAME,
            ExpressionAttributeValues=attribute_values(values),
        )
        return True if applied else (False if old or create else None)
