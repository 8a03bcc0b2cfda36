"""Staged reply fragments (stage table) and the per-conversation trigger lock (lock table): `ports.ReplyStage`.

Stage: PK `conversation_id`, SK `message_sid`; a repeated MessageSid is stored once.
Lock: PK `conversation_id`; `take_lock` is one conditional PutItem mirroring the TAKE rows of
`claims.decide_trigger_lock` (absent **or expired**: TTL deletes lazily, so an expired lock may still be
there; or the holder's own whose trigger is not marked queued). Both carry `expires_at` (epoch seconds) for TTL.
The end of a window (`finish_window`) deletes its fragments and the lock in one BatchWriteItem over both tables.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from service.adapters.aws.dynamo_calls import applied, query_items, send
from service.adapters.aws.dynamo_codec import to_attribute, to_item
from service.domain.conversation import ConversationKey
from service.domain.errors import DependencyUnavailable
from service.domain.inbound import Fragment

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

BATCH_WRITE_LIMIT = 25
UNPROCESSED_RETRIES = 5


class DynamoReplyStage:
    def __init__(self, dynamodb: DynamoDBClient, stage_table: str, lock_table: str) -> None:
        self._dynamodb = dynamodb
        self._stage_table = stage_table
        self._lock_table = lock_table

    # ---- fragments -----------------------------------------------------------------------------

    async def stage(self, key: ConversationKey, fragment: Fragment, expires_at: int) -> bool:
        """Store the fragment; False when this MessageSid was already staged (a webhook retry)."""
        item = to_item(
            {
                "conversation_id": key.conversation_id,
                "message_sid": fragment.message_sid,
                "primary_channel": key.primary_channel,
                "body": fragment.body,
                "received_at": fragment.received_at,
                "expires_at": expires_at,
            }
        )
        put = self._dynamodb.put_item(
            TableName=self._stage_table, Item=item, ConditionExpression="attribute_not_exists(message_sid)"
        )
        return await applied(put, "PutItem")

    async def staged(self, conversation_id: str) -> list[Fragment]:
        """Every staged fragment of the conversation (strongly consistent, all pages)."""
        items = await query_items(
            self._dynamodb,
            {
                "TableName": self._stage_table,
                "KeyConditionExpression": "conversation_id = :id",
                "ExpressionAttributeValues": {":id": to_attribute(conversation_id)},
                "ConsistentRead": True,
            },
        )
        return [
            Fragment(str(item["message_sid"]), str(item.get("body", "")), str(item["received_at"])) for item in items
        ]

    async def delete_staged(self, conversation_id: str, message_sids: Sequence[str]) -> None:
        """Delete the answered fragments (batched; unprocessed items retried)."""
        deletes = self._fragment_deletes(conversation_id, message_sids)
        for offset in range(0, len(deletes), BATCH_WRITE_LIMIT):
            await self._batch_write({self._stage_table: deletes[offset : offset + BATCH_WRITE_LIMIT]})

    async def finish_window(self, conversation_id: str, message_sids: Sequence[str]) -> None:
        """The fragments and the lock in one BatchWriteItem over both tables (beyond 24 fragments, the others
        first). In no set order, and that is safe: the caller recorded the fragments as answered (or not to be
        answered) before, so a fragment that takes the lock the moment it is gone never brings them into a batch."""
        deletes = self._fragment_deletes(conversation_id, message_sids)
        split = max(0, len(deletes) - (BATCH_WRITE_LIMIT - 1))  # the last 24 go with the lock
        for offset in range(0, split, BATCH_WRITE_LIMIT):
            await self._batch_write({self._stage_table: deletes[offset : min(split, offset + BATCH_WRITE_LIMIT)]})
        lock = {"DeleteRequest": {"Key": {"conversation_id": to_attribute(conversation_id)}}}
        last = {self._stage_table: deletes[split:]} if deletes[split:] else {}
        await self._batch_write({**last, self._lock_table: [lock]})

    @staticmethod
    def _fragment_deletes(conversation_id: str, message_sids: Sequence[str]) -> list[Any]:
        key = to_attribute(conversation_id)
        return [
            {"DeleteRequest": {"Key": {"conversation_id": key, "message_sid": to_attribute(sid)}}}
            for sid in message_sids
        ]

    async def _batch_write(self, requests: dict[str, list[Any]]) -> None:
        """One BatchWriteItem (at most 25 requests in all), its unprocessed items retried with backoff."""
        pending = requests
        for attempt in range(UNPROCESSED_RETRIES):
            answer = await send(self._dynamodb.batch_write_item(RequestItems=pending), "BatchWriteItem")
            pending = {table: list(items) for table, items in answer.get("UnprocessedItems", {}).items() if items}
            if not pending:
                return
            await asyncio.sleep(0.05 * 2**attempt)
        left = sum(len(items) for items in pending.values())
        raise DependencyUnavailable("dynamodb", "BatchWriteItem", f"{left} deletes left unprocessed")

    # ---- trigger lock --------------------------------------------------------------------------

    async def take_lock(self, conversation_id: str, holder: str, now: float, expires_at: int) -> bool:
        """True when this caller now holds the trigger lock: it was absent, had expired, or is `holder`'s own
        and its trigger is not marked queued (`mark_queued`).

        So a webhook retry of the same MessageSid whose first delivery took the lock but never queued the trigger
        (cut or crashed in between) queues it then; one whose trigger is known queued does not queue a second
        (a second would be harmless anyway: the reply claim deduplicates)."""
        item = to_item({"conversation_id": conversation_id, "holder": holder, "expires_at": expires_at})
        put = self._dynamodb.put_item(
            TableName=self._lock_table,
            Item=item,
            ConditionExpression=(
                "attribute_not_exists(conversation_id) OR expires_at <= :now"
                " OR (holder = :holder AND attribute_not_exists(trigger_queued))"
            ),
            ExpressionAttributeValues={":now": to_attribute(int(now)), ":holder": to_attribute(holder)},
        )
        return await applied(put, "PutItem")

    async def mark_queued(self, conversation_id: str, holder: str) -> None:
        """Note on `holder`'s lock that its trigger is queued (its retries then no longer re-take it)."""
        update = self._dynamodb.update_item(
            TableName=self._lock_table,
            Key={"conversation_id": to_attribute(conversation_id)},
            UpdateExpression="SET trigger_queued = :yes",
            ConditionExpression="holder = :holder",
            ExpressionAttributeValues={":yes": to_attribute(True), ":holder": to_attribute(holder)},
        )
        await applied(update, "UpdateItem")  # refused: the lock is no longer `holder`'s

    async def release_lock(self, conversation_id: str, holder: str | None = None) -> None:
        """Drop the lock (only `holder`'s, when given)."""
        params: dict[str, Any] = {
            "TableName": self._lock_table,
            "Key": {"conversation_id": to_attribute(conversation_id)},
        }
        if holder is not None:
            params["ConditionExpression"] = "holder = :holder"
            params["ExpressionAttributeValues"] = {":holder": to_attribute(holder)}
        await applied(self._dynamodb.delete_item(**params), "DeleteItem")
