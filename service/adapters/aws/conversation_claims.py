"""The template sender's side of the conversations table (`ports.ConversationClaims`), and the reopening
`comms dlq redrive` does.

The claim, the send ledger and failures follow the tables of `service.domain.claims` (conversation claim,
template send ledger, failures): each claim is one conditional write whose refusal returns the refusing
record, judged by `claims.decide_conversation`. A first delivery is one conditional PutItem (cheap for DynamoDB
and moto alike); only a record that already exists costs a second write, the takeover of its lapsed claim.
Key: `primary_channel` + `conversation_id`; the stored form is `conversation_codec`'s, the message the final
update records an item of `message_items`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from service.adapters.aws import conversation_codec as codec
from service.adapters.aws import message_items
from service.adapters.aws.dynamo_calls import applied, get_item, refusal, update_if, update_or_refusal
from service.adapters.aws.dynamo_codec import to_item
from service.adapters.aws.early_delivery import DeliveryStates
from service.adapters.aws.message_items import MessageItems
from service.domain.claims import EXHAUSTIBLE_STATUSES, RETRIES_EXHAUSTED, Claim, decide_conversation, may_reopen
from service.domain.conversation import (
    ConversationKey,
    ConversationRecord,
    ConversationStatus,
    Failure,
    Message,
    NewConversation,
    SendState,
    TemplateDraft,
)
from service.domain.ports import ClaimAnswer
from service.domain.timefmt import utc_iso

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

PROCESSING = ConversationStatus.PROCESSING.value
# `claims.decide_conversation`: absent, or PROCESSING with a lapsed claim, may be taken.
CREATE_CONDITION = "attribute_not_exists(conversation_id)"
CLAIMABLE = "attribute_not_exists(conversation_id) OR (#status = :processing AND claim_expires_at <= :now)"
OWNED = "claim_owner = :owner AND #status = :processing"


class DynamoConversationClaims:
    def __init__(
        self,
        dynamodb: DynamoDBClient,
        table: str,
        clock: Callable[[], float] = time.time,
        *,
        messages_table: str,
        index_shards: int,
    ) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._clock = clock
        self._messages = MessageItems(dynamodb, messages_table)
        self._index_shards = index_shards  # settings.conversation_index_shards

    # ---- the claim -----------------------------------------------------------------------------------

    async def claim(self, new: NewConversation, owner: str, lease_until: float, now: float) -> ClaimAnswer:
        """Create the record (PROCESSING) or take over a lapsed claim, keeping what it already holds."""
        created = codec.created_item(new, owner, lease_until, self._stamp(), self._index_shards)
        refused = await refusal(
            self._dynamodb.put_item(
                TableName=self._table,
                Item=to_item(created),
                ConditionExpression=CREATE_CONDITION,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            ),
            "PutItem",
        )
        if refused is None:
            return ClaimAnswer(Claim.TAKE, codec.record_from_item(created))
        existing = codec.record_or_none(refused)
        verdict = decide_conversation(existing, now)
        if existing is None or verdict is not Claim.TAKE:  # CLAIMABLE, mirrored: a takeover it refuses is not sent
            return ClaimAnswer(verdict, existing)
        update = (
            "SET #status = :processing, claim_owner = :owner, claim_expires_at = :lease, updated_at = :stamp, "
            "claim_count = if_not_exists(claim_count, :zero) + :one"
        )
        values = {
            ":processing": PROCESSING,
            ":owner": owner,
            ":lease": lease_until,
            ":now": now,
            ":stamp": self._stamp(),
            ":zero": 0,
            ":one": 1,
        }
        params = codec.update_params(self._table, new.key, update, CLAIMABLE, values)
        taken, item = await update_or_refusal(self._dynamodb, "UpdateItem", **params)
        if not taken:
            old = codec.record_or_none(item)
            return ClaimAnswer(decide_conversation(old, now), old)
        return ClaimAnswer(Claim.TAKE, codec.record_from_item(item))

    # ---- what the claimant does (each only while it holds the claim) ---------------------------------

    async def refresh(self, key: ConversationKey, owner: str, lease_until: float) -> bool:
        return await self._owned(key, owner, "refresh", "SET claim_expires_at = :lease", {":lease": lease_until})

    async def release(self, key: ConversationKey, owner: str) -> bool:
        """The lease lapses at once: a claim left to lapse would turn the redelivery into a `HELD` receive, which
        the queue's redrive counts like a real attempt."""
        return await self.refresh(key, owner, 0)

    async def record_attempt(self, key: ConversationKey, owner: str, draft: TemplateDraft) -> bool:
        update = (
            "SET send_state = :attempting, send_attempted_at = :at, thread_id = :thread, "
            "generated_content = :generated, ai_usage = :usage, updated_at = :stamp"
        )
        values = {
            ":attempting": SendState.ATTEMPTING.value,
            ":at": draft.attempted_at,
            ":thread": draft.thread_id,
            ":generated": dict(draft.content),
            ":usage": codec.usage_fields(draft.usage),
            ":stamp": self._stamp(),
        }
        return await self._owned(key, owner, "record_attempt", update, values)

    async def clear_attempt(self, key: ConversationKey, owner: str) -> bool:
        update = "SET send_state = :not_sent, updated_at = :stamp"
        values = {":not_sent": SendState.NOT_SENT.value, ":stamp": self._stamp()}
        return await self._owned(key, owner, "clear_attempt", update, values)

    async def fail(self, key: ConversationKey, owner: str, failure: Failure) -> bool:
        """Failed for good, or (exhausted) marked `failure_kind` so `comms dlq redrive` may reopen it; the send
        ledger is left exactly as it is either way."""
        stamp = self._stamp()
        values: dict[str, Any] = {
            ":failed": failure.status.value,
            ":reason": failure.reason,
            ":zero": 0,
            ":stamp": stamp,
        }
        if not failure.exhausted:
            update = "SET #status = :failed, failure_reason = :reason, claim_expires_at = :zero, updated_at = :stamp"
            return await self._owned(key, owner, "mark_failed", update, values)
        update = (
            "SET #status = :failed, failure_reason = :reason, failure_kind = :kind, claim_expires_at = :zero, "
            "updated_at = :stamp"
        )
        return await self._owned(key, owner, "mark_exhausted", update, {**values, ":kind": RETRIES_EXHAUSTED})

    async def _owned(
        self, key: ConversationKey, owner: str, operation: str, update: str, values: Mapping[str, Any]
    ) -> bool:
        values = {":owner": owner, ":processing": PROCESSING, **values}
        return await update_if(
            self._dynamodb, operation, **codec.update_params(self._table, key, update, OWNED, values)
        )

    # ---- the final update and invalid contexts ---------------------------------------------------------

    async def finalise(self, key: ConversationKey, message: Message, thread_id: str, processing_time_ms: int) -> bool:
        """The template message is the conversation's first (position 0: replies wait for initial_message_sent) and
        the record's own: its ledger holds the content and the usage already (written before the send), so this
        one conditional update records it (provider id, `first_message_at`, the count), with no item of its own
        (`ConversationRecord.ledger_message`); a retry is refused once it is SENT."""
        positions = {message.message_id: message_items.FIRST}
        update = (
            "SET #status = :sent_status, send_state = :sent, provider_message_id = :sid, thread_id = :thread, "
            "#count = :one, #first_at = :first_at, processing_time_ms = :ms, task_complete = :zero, "
            "claim_expires_at = :zero, updated_at = :stamp"
        )
        values = {
            ":sent_status": ConversationStatus.INITIAL_MESSAGE_SENT.value,
            ":sent": SendState.SENT.value,
            ":sid": message.message_id,
            ":thread": thread_id,
            ":one": 1,
            ":first_at": message.timestamp,
            ":ms": processing_time_ms,
            ":zero": 0,
            ":stamp": self._stamp(),
        }
        names = {**codec.STATUS_NAME, "#count": codec.MESSAGE_COUNT, "#first_at": codec.FIRST_MESSAGE_AT}
        condition = "attribute_exists(conversation_id) AND send_state <> :sent"  # once: refused when already SENT
        params = codec.update_params(self._table, key, update, condition, values, names)
        finalised, item = await update_or_refusal(self._dynamodb, "UpdateItem", **params)
        # Status callbacks kept in early_delivery go onto the message: those that came before this write, or (refused:
        # already finalised, this is a retry) one it could not apply then.
        await DeliveryStates(self._dynamodb, self._table, key, self._messages).apply_pending(item, positions)
        return finalised

    async def record_invalid(self, key: ConversationKey, reason: str) -> None:
        stamp = self._stamp()
        item = {
            **codec.item_fields(key),
            codec.STATUS: ConversationStatus.FAILED_INVALID_CONTEXT.value,
            "failure_reason": reason,
            "created_at": stamp,
            "updated_at": stamp,
        }
        put = self._dynamodb.put_item(TableName=self._table, Item=to_item(item), ConditionExpression=CREATE_CONDITION)
        await applied(put, "PutItem")  # refused: the record exists, and keeps what it holds

    # ---- `comms dlq redrive` ---------------------------------------------------------------------------

    async def get(self, key: ConversationKey) -> ConversationRecord | None:
        """The record, read consistently, or None."""
        item = await get_item(self._dynamodb, TableName=self._table, Key=codec.item_key(key), ConsistentRead=True)
        return None if item is None else codec.record_from_item(item)

    async def reopen_exhausted(self, key: ConversationKey) -> str | None:
        """A conversation failed by exhausted retries (`claims.may_reopen`) back to PROCESSING with a lapsed claim
        (claim_expires_at 0), so the redriven message claims it; the ledger stays, so a message that may have gone
        out is reconciled, not sent again, and the old reason is kept as `last_failure_reason`. The `updated_at` it
        wrote (what `close_reopened` needs), or None when nothing changed."""
        stamp = self._stamp()
        statuses = sorted(status.value for status in EXHAUSTIBLE_STATUSES)
        placeholders = [f":failed{i}" for i in range(len(statuses))]
        update = (
            "SET #status = :processing, claim_expires_at = :zero, last_failure_reason = failure_reason, "
            "updated_at = :stamp, reopen_count = if_not_exists(reopen_count, :zero) + :one "
            "REMOVE failure_reason, failure_kind"
        )
        condition = f"failure_kind = :kind AND #status IN ({', '.join(placeholders)})"
        values = {
            ":processing": PROCESSING,
            ":kind": RETRIES_EXHAUSTED,
            ":zero": 0,
            ":one": 1,
            ":stamp": stamp,
            **dict(zip(placeholders, statuses, strict=True)),
        }
        params = codec.update_params(self._table, key, update, condition, values)
        return stamp if await update_if(self._dynamodb, "UpdateItem", **params) else None

    async def close_reopened(self, key: ConversationKey, before: ConversationRecord, reopened_at: str) -> bool:
        """Undo `reopen_exhausted` when its redriven copy never reached the source queue: `before` is the record as
        read just before the reopen, `reopened_at` what the reopen returned. Failed as it was again (status,
        failure_reason, failure_kind = retries_exhausted, last_failure_reason and reopen_count as they were), only
        while the record is exactly as that reopen left it (processing, claim lapsed at 0, same stamp and
        reopen_count, claim_owner unchanged): no worker can have claimed it, since no copy exists. False (nothing
        changed) when it is not, or when `before` was not a reopenable record."""
        failure = before.failure
        if failure is None or not may_reopen(before):
            return False
        values: dict[str, Any] = {
            ":processing": PROCESSING,
            ":zero": 0,
            ":reopened": reopened_at,
            ":count": before.reopen_count + 1,
            ":failed": before.status.value,
            ":reason": failure.reason,
            ":kind": RETRIES_EXHAUSTED,
            ":stamp": self._stamp(),
        }
        sets = ["#status = :failed", "failure_reason = :reason", "failure_kind = :kind", "updated_at = :stamp"]
        removes: list[str] = []
        if before.last_failure_reason is not None:
            sets.append("last_failure_reason = :last")
            values[":last"] = before.last_failure_reason
        else:
            removes.append("last_failure_reason")
        if before.reopen_count:  # reopens always count from 1: 0 means the attribute was not there
            sets.append("reopen_count = :before_count")
            values[":before_count"] = before.reopen_count
        else:
            removes.append("reopen_count")
        condition = (
            "#status = :processing AND claim_expires_at = :zero AND updated_at = :reopened "
            "AND reopen_count = :count AND attribute_not_exists(failure_kind)"
        )
        if before.claim.owner is not None:
            condition += " AND claim_owner = :owner"
            values[":owner"] = before.claim.owner
        else:
            condition += " AND attribute_not_exists(claim_owner)"
        update = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        params = codec.update_params(self._table, key, update, condition, values)
        return await update_if(self._dynamodb, "UpdateItem", **params)

    def _stamp(self) -> str:
        return utc_iso(self._clock())
