"""The replies intake's side of the conversations table (`ports.ConversationLookup`): look-ups by company
address + sender through the channel's index, and the writes webhooks make (opt-out, opt-in, hand-off,
delivery states). The stored form is `conversation_codec`'s; delivery states are `early_delivery`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.dynamo_calls import query_items, update_if
from service.adapters.aws.early_delivery import hold, set_message_status
from service.adapters.ttl_cache import TtlCache
from service.domain.conversation import ConversationKey, ConversationRecord
from service.domain.delivery_state import DeliveryStatus, may_follow
from service.domain.timefmt import utc_iso

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

# Credentials ids of a company number: its conversations read in a few pages, the credentials attribute only.
CREDENTIALS_PAGE_SIZE = 200
CREDENTIALS_PAGES = 5


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
        query = codec.credentials_query(self._table, channel, company_address, CREDENTIALS_PAGE_SIZE)
        items = await query_items(self._dynamodb, query, max_pages=CREDENTIALS_PAGES)
        found: dict[str, None] = {}  # insertion-ordered set
        for item in items:  # a record without channel config (an invalid context) is skipped
            credentials = codec.credentials_of(item, channel)
            if credentials is not None:
                found[credentials] = None
        return tuple(found)

    async def conversations_between(self, channel: str, company_address: str, sender: str) -> list[ConversationRecord]:
        """Every conversation of this company address with this sender (the channel's index, all pages)."""
        query = codec.between_query(self._table, channel, company_address, sender)
        return [codec.record_from_item(item) for item in await query_items(self._dynamodb, query)]

    async def find_open(self, channel: str, company_address: str, sender: str) -> ConversationRecord | None:
        """The newest open conversation (latest `created_at`), or None."""
        candidates = [c for c in await self.conversations_between(channel, company_address, sender) if c.is_open]
        return max(candidates, key=lambda c: c.created_at, default=None)

    # ---- writes (each a no-op on a conversation that is gone) --------------------------------------------

    async def mark_opted_out(self, key: ConversationKey) -> None:
        await self._write(key, codec.opted_out(self._stamp()), "opt")

    async def mark_opted_in(self, key: ConversationKey) -> None:
        """Back to answerable after START/UNSTOP (only if it was opted out)."""
        await self._write(key, codec.opted_in(self._stamp()), "UpdateItem")

    async def mark_handed_off(self, key: ConversationKey, reason: str) -> None:
        await self._write(key, codec.handed_off(reason, self._stamp()), "hand_off")

    async def set_delivery_status(
        self, key: ConversationKey, index: int, message_sid: str, new: DeliveryStatus
    ) -> bool:
        """Forward-only: applied when the message has no state yet or one `new` may replace; else False."""
        item_key = codec.item_key(key)
        stamp = self._stamp()
        return await set_message_status(
            self._dynamodb, self._table, item_key, index, message_sid, new, may_follow(new), stamp
        )

    async def hold_delivery_status(self, key: ConversationKey, message_sid: str, new: DeliveryStatus) -> bool:
        """A status callback for a SID not (yet) in `messages`: kept on this conversation until the final update
        that appends it applies it (`early_delivery`), or applied now if that update landed meanwhile."""
        item_key = codec.item_key(key)
        return await hold(self._dynamodb, self._table, item_key, message_sid, new, may_follow(new), self._stamp())

    async def _write(self, key: ConversationKey, write: codec.Write, operation: str) -> None:
        await update_if(self._dynamodb, operation, **write.params(self._table, key))

    def _stamp(self) -> str:
        return utc_iso(self._clock())
