"""Conversation records in the conversations table: the claim, the send ledger and the final update.

Every write that changes ownership or the ledger is conditional (see
`service.domain.conversation_claim` for the states). Key: `primary_channel` + `conversation_id`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.adapters.aws.dynamo_calls import update_if
from service.adapters.aws.dynamo_codec import attribute_values, from_item, to_attribute
from service.adapters.aws.early_delivery import apply_pending_safely
from service.adapters.aws.errors import AWS_FAILURES, is_conditional_check_failure, unavailable
from service.domain.conversation import ConversationKey, ConversationStatus
from service.domain.conversation_claim import (
    EXHAUSTIBLE_STATUSES,
    RETRIES_EXHAUSTED,
    ClaimVerdict,
    ConversationSnapshot,
    SendState,
    verdict_for_refusal,
)

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

_CLAIMABLE = "attribute_not_exists(conversation_id) OR (#status = :processing AND claim_expires_at < :now)"
_OWNED = "claim_owner = :owner AND #status = :processing"


def item_fields(key: ConversationKey) -> dict[str, str]:
    return {"primary_channel": key.primary_channel, "conversation_id": key.conversation_id}


def item_key(key: ConversationKey) -> dict[str, Any]:
    return {name: to_attribute(value) for name, value in item_fields(key).items()}


@dataclass(frozen=True, slots=True)
class ClaimResult:
    verdict: ClaimVerdict
    snapshot: ConversationSnapshot


class DynamoConversationStore:
    def __init__(self, dynamodb: DynamoDBClient, table: str) -> None:
        self._dynamodb = dynamodb
        self._table = table

    async def claim(
        self, key: ConversationKey, initial: Mapping[str, Any], owner: str, lease_until: float, now: float, stamp: str
    ) -> ClaimResult:
        """Create the record (PROCESSING) or take over an expired claim, keeping what it already holds.

        A first delivery is one conditional PutItem (cheap for DynamoDB and moto alike); only a record that
        already exists costs a second write, the takeover of its lapsed claim.
        """
        claim_fields = {
            "conversation_status": ConversationStatus.PROCESSING.value,
            "claim_owner": owner,
            "claim_expires_at": lease_until,
            "updated_at": stamp,
            "claim_count": 1,
        }
        record = {**initial, **item_fields(key), **claim_fields}
        try:
            await self._dynamodb.put_item(
                TableName=self._table,
                Item={name: to_attribute(value) for name, value in record.items()},
                ConditionExpression="attribute_not_exists(conversation_id)",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except AWS_FAILURES as exc:
            if not is_conditional_check_failure(exc):
                raise unavailable("dynamodb", "PutItem", exc) from exc
            existing = ConversationSnapshot.from_record(from_item(getattr(exc, "response", {}).get("Item") or {}))
            if existing.status == ConversationStatus.PROCESSING and existing.claim_expires_at < now:
                return await self._take_over(key, owner, lease_until, now, stamp)
            return ClaimResult(verdict_for_refusal(existing, now), existing)
        return ClaimResult(ClaimVerdict.CLAIMED, ConversationSnapshot.from_record(record))

    async def _take_over(
        self, key: ConversationKey, owner: str, lease_until: float, now: float, stamp: str
    ) -> ClaimResult:
        """Take a lapsed claim: only the claim fields change; the record keeps its ledger and content."""
        values = {
            ":processing": ConversationStatus.PROCESSING.value,
            ":owner": owner,
            ":lease": lease_until,
            ":now": now,
            ":stamp": stamp,
            ":zero": 0,
            ":one": 1,
        }
        expression = (
            "SET #status = :processing, claim_owner = :owner, claim_expires_at = :lease, updated_at = :stamp, "
            "claim_count = if_not_exists(claim_count, :zero) + :one"
        )
        try:
            answer = await self._dynamodb.update_item(
                TableName=self._table,
                Key=item_key(key),
                UpdateExpression=expression,
                ConditionExpression=_CLAIMABLE,
                ExpressionAttributeNames={"#status": "conversation_status"},
                ExpressionAttributeValues=attribute_values(values),
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except AWS_FAILURES as exc:
            if not is_conditional_check_failure(exc):
                raise unavailable("dynamodb", "UpdateItem", exc) from exc
            old = getattr(exc, "response", {}).get("Item") or {}
            snapshot = ConversationSnapshot.from_record(from_item(old))
            return ClaimResult(verdict_for_refusal(snapshot, now), snapshot)
        return ClaimResult(ClaimVerdict.CLAIMED, ConversationSnapshot.from_record(from_item(answer["Attributes"])))

    async def _owned_update(
        self, key: ConversationKey, owner: str, expression: str, values: Mapping[str, Any], operation: str
    ) -> bool:
        """A write that applies only while `owner` still holds the claim; False when it does not."""
        return await update_if(
            self._dynamodb,
            operation,
            TableName=self._table,
            Key=item_key(key),
            UpdateExpression=expression,
            ConditionExpression=_OWNED,
            ExpressionAttributeNames={"#status": "conversation_status"},
            ExpressionAttributeValues=attribute_values(
                {":owner": owner, ":processing": ConversationStatus.PROCESSING.value, **values}
            ),
        )

    async def refresh_claim(self, key: ConversationKey, owner: str, lease_until: float) -> bool:
        return await self._owned_update(key, owner, "SET claim_expires_at = :lease", {":lease": lease_until}, "refresh")

    async def record_attempt(
        self,
        key: ConversationKey,
        owner: str,
        *,
        thread_id: str,
        generated: dict[str, str],
        usage: dict[str, int],
        attempted_at: float,
        stamp: str,
    ) -> bool:
        """The ledger entry written before the provider is called; False if the claim was lost (do not send)."""
        expression = (
            "SET send_state = :attempting, send_attempted_at = :at, thread_id = :thread, "
            "generated_content = :generated, ai_usage = :usage, updated_at = :stamp"
        )
        values = {
            ":attempting": SendState.ATTEMPTING.value,
            ":at": attempted_at,
            ":thread": thread_id,
            ":generated": generated,
            ":usage": usage,
            ":stamp": stamp,
        }
        return await self._owned_update(key, owner, expression, values, "record_attempt")

    async def clear_attempt(self, key: ConversationKey, owner: str, stamp: str) -> bool:
        """The provider certainly did not send: a later attempt may send without reconciling."""
        values = {":not_sent": SendState.NOT_SENT.value, ":stamp": stamp}
        return await self._owned_update(
            key, owner, "SET send_state = :not_sent, updated_at = :stamp", values, "clear_attempt"
        )

    async def mark_failed(
        self, key: ConversationKey, owner: str, status: ConversationStatus, reason: str, stamp: str
    ) -> bool:
        expression = "SET #status = :failed, failure_reason = :reason, claim_expires_at = :zero, updated_at = :stamp"
        values = {":failed": status.value, ":reason": reason, ":zero": 0, ":stamp": stamp}
        return await self._owned_update(key, owner, expression, values, "mark_failed")

    async def finalise(
        self,
        key: ConversationKey,
        *,
        message: dict[str, Any],
        provider_message_id: str,
        thread_id: str,
        processing_time_ms: int,
        stamp: str,
    ) -> bool:
        """Status INITIAL_MESSAGE_SENT, message appended; once only (False if it was already finalised)."""
        expression = (
            "SET #status = :sent_status, send_state = :sent, provider_message_id = :sid, thread_id = :thread, "
            "#messages = list_append(if_not_exists(#messages, :empty), :message), processing_time_ms = :ms, "
            "task_complete = :zero, claim_expires_at = :zero, updated_at = :stamp"
        )
        values = {
            ":sent_status": ConversationStatus.INITIAL_MESSAGE_SENT.value,
            ":sent": SendState.SENT.value,
            ":sid": provider_message_id,
            ":thread": thread_id,
            ":empty": [],
            ":message": [message],
            ":ms": processing_time_ms,
            ":zero": 0,
            ":stamp": stamp,
        }
        sids = [str(message.get("message_id") or provider_message_id)]
        try:
            answer = await self._dynamodb.update_item(
                TableName=self._table,
                Key=item_key(key),
                UpdateExpression=expression,
                ConditionExpression="attribute_exists(conversation_id) AND send_state <> :sent",
                ExpressionAttributeNames={"#status": "conversation_status", "#messages": "messages"},
                ExpressionAttributeValues=attribute_values(values),
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except AWS_FAILURES as exc:
            if not is_conditional_check_failure(exc):
                raise unavailable("dynamodb", "UpdateItem", exc) from exc
            # Already finalised (a retry): a status callback it could not apply then is applied now.
            old = from_item(getattr(exc, "response", {}).get("Item") or {})
            await apply_pending_safely(self._dynamodb, self._table, item_key(key), old, sids)
            return False
        # Status callbacks that came before this write (kept in early_delivery): onto the message it appended.
        await apply_pending_safely(self._dynamodb, self._table, item_key(key), from_item(answer["Attributes"]), sids)
        return True

    async def record_invalid(self, key: ConversationKey, fields: Mapping[str, Any], reason: str, stamp: str) -> None:
        """A context too malformed to process, but naming its conversation: record why (once)."""
        item = {
            **fields,
            "conversation_status": ConversationStatus.FAILED_INVALID_CONTEXT.value,
            "failure_reason": reason,
            "created_at": stamp,
            "updated_at": stamp,
        }
        try:
            await self._dynamodb.put_item(
                TableName=self._table,
                Item={**item_key(key), **{k: to_attribute(v) for k, v in item.items() if v is not None}},
                ConditionExpression="attribute_not_exists(conversation_id)",
            )
        except AWS_FAILURES as exc:
            if not is_conditional_check_failure(exc):
                raise unavailable("dynamodb", "PutItem", exc) from exc

    async def get(self, key: ConversationKey) -> dict[str, Any] | None:
        return await get_conversation(self._dynamodb, self._table, key)

    async def mark_exhausted(
        self, key: ConversationKey, owner: str, status: ConversationStatus, reason: str, stamp: str
    ) -> bool:
        """Retries ran out on a transient failure: failed like `mark_failed`, but marked `failure_kind` =
        retries_exhausted so `comms dlq redrive` may reopen it. The send ledger is left exactly as it is."""
        expression = (
            "SET #status = :failed, failure_reason = :reason, failure_kind = :kind, claim_expires_at = :zero, "
            "updated_at = :stamp"
        )
        values = {":failed": status.value, ":reason": reason, ":kind": RETRIES_EXHAUSTED, ":zero": 0, ":stamp": stamp}
        return await self._owned_update(key, owner, expression, values, "mark_exhausted")

    async def reopen_exhausted(self, key: ConversationKey, stamp: str) -> bool:
        """`comms dlq redrive`: a conversation failed by exhausted retries back to PROCESSING with a lapsed claim
        (claim_expires_at 0), so the redriven message claims it. The ledger stays: a message that may have gone
        out is reconciled, not sent again. False (nothing changed) for any other record."""
        statuses = sorted(s.value for s in EXHAUSTIBLE_STATUSES)
        placeholders = [f":failed{i}" for i in range(len(statuses))]
        values: dict[str, Any] = {
            ":processing": ConversationStatus.PROCESSING.value,
            ":kind": RETRIES_EXHAUSTED,
            ":zero": 0,
            ":one": 1,
            ":stamp": stamp,
            **dict(zip(placeholders, statuses, strict=True)),
        }
        return await update_if(
            self._dynamodb,
            "UpdateItem",
            TableName=self._table,
            Key=item_key(key),
            UpdateExpression=(
                "SET #status = :processing, claim_expires_at = :zero, last_failure_reason = failure_reason, "
                "updated_at = :stamp, reopen_count = if_not_exists(reopen_count, :zero) + :one "
                "REMOVE failure_reason, failure_kind"
            ),
            ConditionExpression=f"failure_kind = :kind AND #status IN ({', '.join(placeholders)})",
            ExpressionAttributeNames={"#status": "conversation_status"},
            ExpressionAttributeValues=attribute_values(values),
        )

    async def close_reopened(
        self, key: ConversationKey, before: Mapping[str, Any], reopened_at: str, stamp: str
    ) -> bool:
        """Undo `reopen_exhausted` when its redriven copy never reached the source queue: `before` is the record as
        read just before the reopen, `reopened_at` the stamp the reopen wrote. Failed as it was again (status,
        failure_reason, failure_kind = retries_exhausted, last_failure_reason and reopen_count as they were), only
        while the record is exactly as that reopen left it (processing, claim lapsed at 0, same stamp and
        reopen_count, claim_owner unchanged): no worker can have claimed it, since no copy exists. False (nothing
        changed) when it is not, or when `before` was not a reopenable record."""
        status = str(before.get("conversation_status", ""))
        reason = before.get("failure_reason")
        if before.get("failure_kind") != RETRIES_EXHAUSTED or status not in EXHAUSTIBLE_STATUSES or reason is None:
            return False
        count = int(before.get("reopen_count") or 0)
        values: dict[str, Any] = {
            ":processing": ConversationStatus.PROCESSING.value,
            ":zero": 0,
            ":reopened": reopened_at,
            ":count": count + 1,
            ":failed": status,
            ":reason": reason,
            ":kind": RETRIES_EXHAUSTED,
            ":stamp": stamp,
        }
        sets = ["#status = :failed", "failure_reason = :reason", "failure_kind = :kind", "updated_at = :stamp"]
        removes: list[str] = []
        if "last_failure_reason" in before:
            sets.append("last_failure_reason = :last")
            values[":last"] = before["last_failure_reason"]
        else:
            removes.append("last_failure_reason")
        if "reopen_count" in before:
            sets.append("reopen_count = :before_count")
            values[":before_count"] = count
        else:
            removes.append("reopen_count")
        condition = (
            "#status = :processing AND claim_expires_at = :zero AND updated_at = :reopened "
            "AND reopen_count = :count AND attribute_not_exists(failure_kind)"
        )
        if before.get("claim_owner") is not None:
            condition += " AND claim_owner = :owner"
            values[":owner"] = before["claim_owner"]
        else:
            condition += " AND attribute_not_exists(claim_owner)"
        expression = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        return await update_if(
            self._dynamodb,
            "UpdateItem",
            TableName=self._table,
            Key=item_key(key),
            UpdateExpression=expression,
            ConditionExpression=condition,
            ExpressionAttributeNames={"#status": "conversation_status"},
            ExpressionAttributeValues=attribute_values(values),
        )


async def get_conversation(dynamodb: DynamoDBClient, table: str, key: ConversationKey) -> dict[str, Any] | None:
    """The record, read consistently (after a conditional write refused us), or None."""
    try:
        answer = await dynamodb.get_item(TableName=table, Key=item_key(key), ConsistentRead=True)
    except AWS_FAILURES as exc:
        raise unavailable("dynamodb", "GetItem", exc) from exc
    item = answer.get("Item")
    return from_item(item) if item else None
