"""The template sender's side of the conversations table (`ports.ConversationClaims`), and the reopening
`comms dlq redrive` does.

The claim, the send ledger and failures follow the tables of `service.domain.claims` (conversation claim,
template send ledger, failures): each claim is one conditional write whose refusal returns the refusing
record, judged by `claims.decide_conversation`. A first delivery is one conditional PutItem (cheap for DynamoDB
and moto alike); only a record that already exists costs a second write, the takeover of its lapsed claim.
Key: `primary_channel` + `conversation_id`; the stored form is `conversation_codec`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.dynamo_calls import refusing_item, update_if
from service.adapters.aws.dynamo_codec import from_item, to_item
from service.adapters.aws.early_delivery import apply_pending_safely
from service.adapters.aws.errors import AWS_FAILURES, is_conditional_check_failure, unavailable
from service.domain.claims import Claim, decide_conversation
from service.domain.conversation import (
    ConversationKey,
    ConversationRecord,
    Failure,
    Message,
    NewConversation,
    TemplateDraft,
)
from service.domain.ports import ClaimAnswer
from service.domain.timefmt import utc_iso

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


class DynamoConversationClaims:
    def __init__(self, dynamodb: DynamoDBClient, table: str, clock: Callable[[], float] = time.time) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._clock = clock

    # ---- the claim -----------------------------------------------------------------------------------

    async def claim(self, new: NewConversation, owner: str, lease_until: float, now: float) -> ClaimAnswer:
        """Create the record (PROCESSING) or take over a lapsed claim, keeping what it already holds."""
        created = codec.created_item(new, owner, lease_until, self._stamp())
        try:
            await self._dynamodb.put_item(
                TableName=self._table,
                Item=to_item(created),
                ConditionExpression=codec.CREATE_CONDITION,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except AWS_FAILURES as exc:
            if not is_conditional_check_failure(exc):
                raise unavailable("dynamodb", "PutItem", exc) from exc
            existing = codec.record_or_none(refusing_item(exc))
            if existing is not None and codec.may_take_over(existing, now):
                return await self._take_over(new.key, owner, lease_until, now)
            return ClaimAnswer(decide_conversation(existing, now), existing)
        return ClaimAnswer(Claim.TAKE, codec.record_from_item(created))

    async def _take_over(self, key: ConversationKey, owner: str, lease_until: float, now: float) -> ClaimAnswer:
        write = codec.take_over(owner, lease_until, now, self._stamp())
        try:
            answer = await self._dynamodb.update_item(
                **write.params(self._table, key), ReturnValues="ALL_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD"
            )
        except AWS_FAILURES as exc:
            if not is_conditional_check_failure(exc):
                raise unavailable("dynamodb", "UpdateItem", exc) from exc
            old = codec.record_or_none(refusing_item(exc))
            return ClaimAnswer(decide_conversation(old, now), old)
        return ClaimAnswer(Claim.TAKE, codec.record_from_item(from_item(answer["Attributes"])))

    # ---- what the claimant does (each only while it holds the claim) ---------------------------------

    async def refresh(self, key: ConversationKey, owner: str, lease_until: float) -> bool:
        return await self._write(key, codec.refresh_claim(owner, lease_until), "refresh")

    async def release(self, key: ConversationKey, owner: str) -> bool:
        """The lease lapses at once: a claim left to lapse would turn the redelivery into a `HELD` receive, which
        the queue's redrive counts like a real attempt."""
        return await self._write(key, codec.refresh_claim(owner, 0), "refresh")

    async def record_attempt(self, key: ConversationKey, owner: str, draft: TemplateDraft) -> bool:
        return await self._write(key, codec.record_draft(owner, draft, self._stamp()), "record_attempt")

    async def clear_attempt(self, key: ConversationKey, owner: str) -> bool:
        return await self._write(key, codec.clear_draft(owner, self._stamp()), "clear_attempt")

    async def fail(self, key: ConversationKey, owner: str, failure: Failure) -> bool:
        operation = "mark_exhausted" if failure.exhausted else "mark_failed"
        return await self._write(key, codec.fail_claim(owner, failure, self._stamp()), operation)

    async def _write(self, key: ConversationKey, write: codec.Write, operation: str) -> bool:
        return await update_if(self._dynamodb, operation, **write.params(self._table, key))

    # ---- the final update and invalid contexts ---------------------------------------------------------

    async def finalise(self, key: ConversationKey, message: Message, thread_id: str, processing_time_ms: int) -> bool:
        write = codec.finalise_template(message, thread_id, processing_time_ms, self._stamp())
        item_key = codec.item_key(key)
        sids = [message.message_id]
        try:
            answer = await self._dynamodb.update_item(
                **write.params(self._table, key), ReturnValues="ALL_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD"
            )
        except AWS_FAILURES as exc:
            if not is_conditional_check_failure(exc):
                raise unavailable("dynamodb", "UpdateItem", exc) from exc
            # Already finalised (a retry): a status callback it could not apply then is applied now.
            await apply_pending_safely(self._dynamodb, self._table, item_key, refusing_item(exc), sids)
            return False
        # Status callbacks that came before this write (kept in early_delivery): onto the message it appended.
        await apply_pending_safely(self._dynamodb, self._table, item_key, from_item(answer["Attributes"]), sids)
        return True

    async def record_invalid(self, key: ConversationKey, reason: str) -> None:
        try:
            await self._dynamodb.put_item(
                TableName=self._table,
                Item=to_item(codec.invalid_item(key, reason, self._stamp())),
                ConditionExpression=codec.CREATE_CONDITION,
            )
        except AWS_FAILURES as exc:
            if not is_conditional_check_failure(exc):
                raise unavailable("dynamodb", "PutItem", exc) from exc

    # ---- `comms dlq redrive` ---------------------------------------------------------------------------

    async def get(self, key: ConversationKey) -> ConversationRecord | None:
        """The record, read consistently, or None."""
        try:
            answer = await self._dynamodb.get_item(TableName=self._table, Key=codec.item_key(key), ConsistentRead=True)
        except AWS_FAILURES as exc:
            raise unavailable("dynamodb", "GetItem", exc) from exc
        item = answer.get("Item")
        return codec.record_from_item(from_item(item)) if item else None

    async def reopen_exhausted(self, key: ConversationKey) -> str | None:
        """A conversation failed by exhausted retries (`claims.may_reopen`) back to PROCESSING with a lapsed claim,
        so the redriven message claims it; the ledger stays, so a message that may have gone out is reconciled,
        not sent again. The `updated_at` it wrote (what `close_reopened` needs), or None when nothing changed."""
        stamp = self._stamp()
        reopened = await update_if(self._dynamodb, "UpdateItem", **codec.reopen(stamp).params(self._table, key))
        return stamp if reopened else None

    async def close_reopened(self, key: ConversationKey, before: ConversationRecord, reopened_at: str) -> bool:
        """Undo `reopen_exhausted` when its redriven copy never reached the source queue: `before` is the record as
        read just before the reopen, `reopened_at` what the reopen returned. Failed as it was again (status,
        failure_reason, failure_kind = retries_exhausted, last_failure_reason and reopen_count as they were), only
        while the record is exactly as that reopen left it (processing, claim lapsed at 0, same stamp and
        reopen_count, claim_owner unchanged): no worker can have claimed it, since no copy exists. False (nothing
        changed) when it is not, or when `before` was not a reopenable record."""
        write = codec.close_reopened(before, reopened_at, self._stamp())
        if write is None:
            return False
        return await update_if(self._dynamodb, "UpdateItem", **write.params(self._table, key))

    def _stamp(self) -> str:
        return utc_iso(self._clock())
