"""The replies intake's side of the conversations table (`ports.ConversationLookup`): look-ups by company
address + sender through the channel's index (which holds only the credentials, `created_at` and `task_complete`:
the records found are then read from the table), the messages a webhook needs (`message_items`), and the writes
webhooks make (opt-out, opt-in, hand-off, delivery states), each a no-op on a conversation that is gone. The stored
form is `conversation_codec`'s; delivery states are `early_delivery`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.batch_reads import get_items
from service.adapters.aws.dynamo_calls import get_item, query_items, update_if
from service.adapters.aws.dynamo_codec import attribute_values
from service.adapters.aws.early_delivery import DeliveryStates
from service.adapters.aws.message_items import MessageItems
from service.adapters.ttl_cache import TtlCache
from service.domain.conversation import ConversationKey, ConversationRecord, ConversationStatus, Message
from service.domain.delivery_state import DeliveryStatus
from service.domain.timefmt import utc_iso

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

# Credentials ids of a company number: its conversations read in a few pages, the credentials attribute only.
CREDENTIALS_PAGE_SIZE = 200
CREDENTIALS_PAGES = 5
EXISTS = "attribute_exists(conversation_id)"
OPTED_OUT = ConversationStatus.OPTED_OUT.value


class DynamoConversationLookup:
    def __init__(
        self,
        dynamodb: DynamoDBClient,
        table: str,
        number_cache_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        *,
        messages_table: str,
    ) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._clock = clock
        self._messages = MessageItems(dynamodb, messages_table)
        # company address -> the credentials ids its conversations name (found ones only, briefly)
        self._numbers: TtlCache[tuple[str, str], tuple[str, ...]] = TtlCache(number_cache_ttl_s, max_entries=10_000)

    # ---- look-ups ----------------------------------------------------------------------------------------

    async def tenant_credentials(self, channel: str, company_address: str) -> tuple[str, ...]:
        """The distinct credentials ids the conversations of this company address name (the index's partition
        key: no sender involved), in the order first seen, cached briefly; empty when none names the address.

        All of them, not the first: a project whose credentials id changed leaves its old conversations naming
        the old one, and the request is accepted if any of them verifies it."""
        key = (channel, company_address)
        found = await self._numbers.get(key, lambda: self._credentials_of(channel, company_address))
        if not found:
            self._numbers.invalidate(key)  # a number's first conversation must be found as soon as it exists
        return found

    async def _credentials_of(self, channel: str, company_address: str) -> tuple[str, ...]:
        """A bounded query: only the credentials attribute, at most `CREDENTIALS_PAGES` pages."""
        index = codec.INDEX_BY_CHANNEL[channel]
        query = {
            "TableName": self._table,
            "IndexName": index.name,
            "KeyConditionExpression": "#pk = :pk",
            "ProjectionExpression": "#config.#credentials",
            "ExpressionAttributeNames": {
                "#pk": index.partition_key,
                "#config": "channel_config",
                "#credentials": codec.credentials_attribute(channel),
            },
            "ExpressionAttributeValues": attribute_values({":pk": company_address}),
            "Limit": CREDENTIALS_PAGE_SIZE,
        }
        found: dict[str, None] = {}  # insertion-ordered set
        for item in await query_items(self._dynamodb, query, max_pages=CREDENTIALS_PAGES):
            credentials = codec.credentials_of(item, channel)
            if credentials is not None:  # None: a record without channel config (an invalid context)
                found[credentials] = None
        return tuple(found)

    async def conversations_between(self, channel: str, company_address: str, sender: str) -> list[ConversationRecord]:
        """Every conversation of this company address with this sender: their keys from the channel's index (all
        pages), then the records themselves, read consistently in one BatchGetItem."""
        entries = await self._between(channel, company_address, sender, only_open=False)
        keys = [codec.item_key(codec.key_of(entry)) for entry in entries]
        items = await get_items(self._dynamodb, self._table, keys) if keys else []
        return [codec.record_from_item(item) for item in items]

    async def find_open(self, channel: str, company_address: str, sender: str) -> ConversationRecord | None:
        """The newest open conversation (latest `created_at`), or None: the index holds `created_at` and
        `task_complete` (closed ones are filtered out by DynamoDB), the record is then read consistently with one
        GetItem (the index holds none of what changes, so no conversation update is paid again in it)."""
        entries = await self._between(channel, company_address, sender, only_open=True)
        newest = max(entries, key=lambda entry: str(entry.get("created_at", "")), default=None)
        if newest is None:
            return None
        key = codec.item_key(codec.key_of(newest))
        item = await get_item(self._dynamodb, TableName=self._table, Key=key, ConsistentRead=True)
        record = None if item is None else codec.record_from_item(item)
        return record if record is not None and record.is_open else None

    async def _between(
        self, channel: str, company_address: str, sender: str, *, only_open: bool
    ) -> list[dict[str, Any]]:
        """The pair's index entries: keys, `created_at`, `task_complete`, `channel_config`."""
        index = codec.INDEX_BY_CHANNEL[channel]
        values: dict[str, Any] = {":pk": company_address, ":sk": sender.lower() if channel == "email" else sender}
        query = {
            "TableName": self._table,
            "IndexName": index.name,
            "KeyConditionExpression": "#pk = :pk AND #sk = :sk",
            "ExpressionAttributeNames": {"#pk": index.partition_key, "#sk": str(index.sort_key)},
        }
        if only_open:
            query["FilterExpression"] = "task_complete = :open"
            values[":open"] = 0
        query["ExpressionAttributeValues"] = attribute_values(values)
        return await query_items(self._dynamodb, query)

    # ---- writes ------------------------------------------------------------------------------------------

    async def mark_opted_out(self, key: ConversationKey) -> None:
        update = "SET #status = :opted_out, opted_out_at = :stamp, updated_at = :stamp"
        await self._write("opt", key, update, EXISTS, {":opted_out": OPTED_OUT, ":stamp": self._stamp()})

    async def mark_opted_in(self, key: ConversationKey) -> None:
        update = "SET #status = :replied, updated_at = :stamp REMOVE opted_out_at"
        values = {":replied": ConversationStatus.REPLY_SENT.value, ":opted_out": OPTED_OUT, ":stamp": self._stamp()}
        await self._write("UpdateItem", key, update, "#status = :opted_out", values)

    async def mark_handed_off(self, key: ConversationKey, reason: str) -> None:
        update = "SET #status = :handed_off, hand_off_reason = :reason, updated_at = :stamp"
        values = {":handed_off": ConversationStatus.HANDED_OFF.value, ":reason": reason, ":stamp": self._stamp()}
        await self._write("hand_off", key, update, EXISTS, values)

    async def recent_messages(self, record: ConversationRecord, limit: int) -> tuple[Message, ...]:
        return await self._messages.recent(record, limit)

    async def find_message(self, record: ConversationRecord, message_sid: str) -> tuple[int, Message] | None:
        return await self._messages.find(record.key, message_sid, record.messages, record.ledger_message)

    async def set_delivery_status(
        self, record: ConversationRecord, index: int, message_sid: str, new: DeliveryStatus
    ) -> bool:
        on_record = index == 0 and record.holds_message(message_sid)
        return await self._states(record.key).set_status(index, message_sid, new, self._stamp(), on_record=on_record)

    async def hold_delivery_status(self, key: ConversationKey, message_sid: str, new: DeliveryStatus) -> bool:
        return await self._states(key).hold(message_sid, new, self._stamp())

    def _states(self, key: ConversationKey) -> DeliveryStates:
        return DeliveryStates(self._dynamodb, self._table, key, self._messages)

    async def _write(
        self, operation: str, key: ConversationKey, update: str, condition: str, values: Mapping[str, Any]
    ) -> None:
        await update_if(self._dynamodb, operation, **codec.update_params(self._table, key, update, condition, values))

    def _stamp(self) -> str:
        return utc_iso(self._clock())
