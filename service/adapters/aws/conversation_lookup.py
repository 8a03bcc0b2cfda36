"""The replies intake's side of the conversations table (`ports.ConversationLookup`): look-ups by company
address + sender through the channel's index, and the writes webhooks make (opt-out, opt-in, hand-off,
delivery states), each a no-op on a conversation that is gone. The stored form is `conversation_codec`'s;
delivery states are `early_delivery`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.dynamo_calls import query_items, update_if
from service.adapters.aws.dynamo_codec import attribute_values
from service.adapters.aws.early_delivery import DeliveryStates
from service.adapters.ttl_cache import TtlCache
from service.domain.conversation import ConversationKey, ConversationRecord, ConversationStatus
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
    ) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._clock = clock
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
        """Every conversation of this company address with this sender (the channel's index, all pages)."""
        return await self._between(channel, company_address, sender, only_open=False)

    async def find_open(self, channel: str, company_address: str, sender: str) -> ConversationRecord | None:
        """The newest open conversation (latest `created_at`), or None. Closed ones are filtered out by DynamoDB
        (`task_complete` = 0 is what `record_from_item` calls open): a returning recipient's finished conversations,
        messages and all, are neither sent back nor decoded on every inbound message."""
        candidates = [c for c in await self._between(channel, company_address, sender, only_open=True) if c.is_open]
        return max(candidates, key=lambda c: c.created_at, default=None)

    async def _between(
        self, channel: str, company_address: str, sender: str, *, only_open: bool
    ) -> list[ConversationRecord]:
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
        return [codec.record_from_item(item) for item in await query_items(self._dynamodb, query)]

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

    async def set_delivery_status(
        self, key: ConversationKey, index: int, message_sid: str, new: DeliveryStatus
    ) -> bool:
        states = DeliveryStates(self._dynamodb, self._table, key)
        return await states.set_status(index, message_sid, new, self._stamp())

    async def hold_delivery_status(self, key: ConversationKey, message_sid: str, new: DeliveryStatus) -> bool:
        return await DeliveryStates(self._dynamodb, self._table, key).hold(message_sid, new, self._stamp())

    async def _write(
        self, operation: str, key: ConversationKey, update: str, condition: str, values: Mapping[str, Any]
    ) -> None:
        await update_if(self._dynamodb, operation, **codec.update_params(self._table, key, update, condition, values))

    def _stamp(self) -> str:
        return utc_iso(self._clock())
