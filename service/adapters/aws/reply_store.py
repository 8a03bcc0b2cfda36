"""The replies side of the conversations table: look-ups by company address + sender, the reply claim
(a lease, so a crashed replier never locks a conversation for ever), the reply ledger, delivery states.

Reply claim states (`conversation_status`):
    initial_message_sent | reply_sent  --claim-->  processing_reply (reply_owner, reply_lease_expires)
    processing_reply, lease expired    --claim-->  processing_reply (new owner: a takeover)
    processing_reply  --finalise-->  reply_sent      --release-->  the status it had before the claim
    processing_reply  --fail-->      failed_to_process_ai | failed_to_send_message
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from service.adapters.aws.conversation_store import get_conversation, item_key
from service.adapters.aws.dynamo_calls import query_items
from service.adapters.aws.dynamo_codec import attribute_values, from_item
from service.adapters.aws.early_delivery import apply_pending_safely, hold, set_message_status
from service.adapters.aws.errors import AWS_FAILURES, is_conditional_check_failure, unavailable
from service.adapters.ttl_cache import TtlCache
from service.domain.conversation import ConversationKey, ConversationStatus
from service.domain.conversation_claim import RETRIES_EXHAUSTED
from service.domain.delivery_state import DeliveryStatus
from service.resources import CONVERSATION_INDEXES, Index

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

INDEX_BY_CHANNEL: dict[str, Index] = {
    "whatsapp": CONVERSATION_INDEXES[1],
    "sms": CONVERSATION_INDEXES[2],
    "email": CONVERSATION_INDEXES[3],
}
# Credentials ids of a company number: its conversations read in a few pages, the credentials attribute only.
CREDENTIALS_PAGE_SIZE = 200
CREDENTIALS_PAGES = 5
REPLYABLE = (ConversationStatus.INITIAL_MESSAGE_SENT.value, ConversationStatus.REPLY_SENT.value)
_CLAIMABLE = "(#status IN (:initial, :replied)) OR (#status = :processing_reply AND reply_lease_expires < :now)"
_OWNED = "reply_owner = :owner AND #status = :processing_reply"
# An opt-out or hand-off that landed while the owner was sending: its reply went out and must still be recorded.
_OWNED_BUT_STOPPED = "reply_owner = :owner AND #status IN (:opted_out, :handed_off)"


class ReplyClaimVerdict(StrEnum):
    CLAIMED = "claimed"
    HELD_ELSEWHERE = "held_elsewhere"  # a live lease: try again when it lapses, never drop the trigger
    NOT_ANSWERABLE = "not_answerable"  # missing, handed off, opted out, failed, or still sending the first message


@dataclass(frozen=True, slots=True)
class ReplyClaim:
    verdict: ReplyClaimVerdict
    record: dict[str, Any]


class DynamoReplyStore:
    def __init__(self, dynamodb: DynamoDBClient, table: str, number_cache_ttl_s: float = 60.0) -> None:
        self._dynamodb = dynamodb
        self._table = table
        # company number -> the credentials ids its conversations name (found ones only, briefly)
        self._numbers: TtlCache[tuple[str, str], tuple[str, ...]] = TtlCache(number_cache_ttl_s, max_entries=10_000)

    # ---- look-ups ------------------------------------------------------------------------------

    async def conversations_between(self, channel: str, company_address: str, sender: str) -> list[dict[str, Any]]:
        """Every conversation of this company address with this sender (GSI, all pages)."""
        index = INDEX_BY_CHANNEL[channel]
        sender_key = sender.lower() if channel == "email" else sender
        return await query_items(
            self._dynamodb,
            {
                "TableName": self._table,
                "IndexName": index.name,
                "KeyConditionExpression": "#pk = :pk AND #sk = :sk",
                "ExpressionAttributeNames": {"#pk": index.partition_key, "#sk": str(index.sort_key)},
                "ExpressionAttributeValues": attribute_values({":pk": company_address, ":sk": sender_key}),
            },
        )

    async def find_open(self, channel: str, company_address: str, sender: str) -> dict[str, Any] | None:
        """The newest open conversation (`task_complete` = 0, latest `created_at`), or None."""
        candidates = [
            c for c in await self.conversations_between(channel, company_address, sender) if c.get("task_complete") == 0
        ]
        return max(candidates, key=lambda c: str(c.get("created_at", "")), default=None)

    async def tenant_credentials(self, channel: str, company_address: str) -> tuple[str, ...]:
        """The distinct credentials ids (`channel_config.<channel>_credentials_id`) the conversations of this
        company address name (the index's partition key: no sender involved), in the order first seen, cached
        briefly; empty when no conversation names the address.

        All of them, not the first: a project whose credentials id changed leaves its old conversations naming
        the old one, and the request is accepted if any of them verifies it."""
        key = (channel, company_address)
        found = await self._numbers.get(key, lambda: self._credentials_of(channel, company_address))
        if not found:
            self._numbers.invalidate(key)  # a number's first conversation must be found as soon as it exists
        return found

    async def _credentials_of(self, channel: str, company_address: str) -> tuple[str, ...]:
        """A bounded query: only the credentials attribute, at most `CREDENTIALS_PAGES` pages."""
        index = INDEX_BY_CHANNEL[channel]
        attribute = f"{channel}_credentials_id"
        items = await query_items(
            self._dynamodb,
            {
                "TableName": self._table,
                "IndexName": index.name,
                "KeyConditionExpression": "#pk = :pk",
                "ProjectionExpression": "#config.#credentials",
                "ExpressionAttributeNames": {
                    "#pk": index.partition_key,
                    "#config": "channel_config",
                    "#credentials": attribute,
                },
                "ExpressionAttributeValues": attribute_values({":pk": company_address}),
                "Limit": CREDENTIALS_PAGE_SIZE,
            },
            max_pages=CREDENTIALS_PAGES,
        )
        found: dict[str, None] = {}  # insertion-ordered set
        for item in items:  # a record without channel config (an invalid context) is skipped
            credentials = (item.get("channel_config") or {}).get(attribute)
            if isinstance(credentials, str) and credentials:
                found[credentials] = None
        return tuple(found)

    async def get(self, key: ConversationKey) -> dict[str, Any] | None:
        return await get_conversation(self._dynamodb, self._table, key)

    # ---- the reply claim -----------------------------------------------------------------------

    async def claim(self, key: ConversationKey, owner: str, lease_until: float, now: float, stamp: str) -> ReplyClaim:
        values = {
            ":initial": ConversationStatus.INITIAL_MESSAGE_SENT.value,
            ":replied": ConversationStatus.REPLY_SENT.value,
            ":processing_reply": ConversationStatus.PROCESSING_REPLY.value,
            ":owner": owner,
            ":lease": lease_until,
            ":now": now,
            ":stamp": stamp,
        }
        expression = (
            "SET status_before_reply = if_not_exists(status_before_reply, #status), "
            "#status = :processing_reply, reply_owner = :owner, reply_lease_expires = :lease, updated_at = :stamp"
        )
        try:
            answer = await self._dynamodb.update_item(
                TableName=self._table,
                Key=item_key(key),
                UpdateExpression=expression,
                ConditionExpression=f"attribute_exists(conversation_id) AND ({_CLAIMABLE})",
                ExpressionAttributeNames={"#status": "conversation_status"},
                ExpressionAttributeValues=attribute_values(values),
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except AWS_FAILURES as exc:
            if not is_conditional_check_failure(exc):
                raise unavailable("dynamodb", "UpdateItem", exc) from exc
            old = from_item(getattr(exc, "response", {}).get("Item") or {})
            held = old.get("conversation_status") == ConversationStatus.PROCESSING_REPLY.value
            verdict = ReplyClaimVerdict.HELD_ELSEWHERE if held else ReplyClaimVerdict.NOT_ANSWERABLE
            return ReplyClaim(verdict, old)
        return ReplyClaim(ReplyClaimVerdict.CLAIMED, from_item(answer["Attributes"]))

    async def _owned_update(
        self,
        key: ConversationKey,
        owner: str,
        expression: str,
        values: Mapping[str, Any],
        operation: str,
        names: Mapping[str, str] | None = None,
        *,
        stopped: bool = False,
    ) -> dict[str, Any] | None:
        """A write applied only while `owner` holds the reply claim: the new record, or None when it does not."""
        if stopped:
            condition = _OWNED_BUT_STOPPED
            guard = {
                ":opted_out": ConversationStatus.OPTED_OUT.value,
                ":handed_off": ConversationStatus.HANDED_OFF.value,
            }
        else:
            condition, guard = _OWNED, {":processing_reply": ConversationStatus.PROCESSING_REPLY.value}
        try:
            answer = await self._dynamodb.update_item(
                TableName=self._table,
                Key=item_key(key),
                UpdateExpression=expression,
                ConditionExpression=condition,
                ExpressionAttributeNames={"#status": "conversation_status", **(names or {})},
                ExpressionAttributeValues=attribute_values({":owner": owner, **guard, **values}),
                ReturnValues="ALL_NEW",
            )
        except AWS_FAILURES as exc:
            if is_conditional_check_failure(exc):
                return None
            raise unavailable("dynamodb", operation, exc) from exc
        return from_item(answer["Attributes"])

    async def refresh(self, key: ConversationKey, owner: str, lease_until: float) -> bool:
        expression = "SET reply_lease_expires = :lease"
        return await self._owned_update(key, owner, expression, {":lease": lease_until}, "refresh") is not None

    async def record_attempt(self, key: ConversationKey, owner: str, attempt: Mapping[str, Any], stamp: str) -> bool:
        """The reply ledger entry, written before the provider is called; False if the claim was lost."""
        expression = "SET reply_attempt = :attempt, updated_at = :stamp"
        values = {":attempt": dict(attempt), ":stamp": stamp}
        return await self._owned_update(key, owner, expression, values, "record_attempt") is not None

    async def clear_attempt(self, key: ConversationKey, owner: str) -> bool:
        """The provider certainly did not send: the next attempt may send without reconciling."""
        return await self._owned_update(key, owner, "REMOVE reply_attempt", {}, "clear_attempt") is not None

    async def finalise(
        self,
        key: ConversationKey,
        owner: str,
        *,
        messages: Sequence[Mapping[str, Any]],
        answered_sids: Sequence[str],
        processing_time_ms: int,
        stamp: str,
        stopped: bool = False,
    ) -> dict[str, Any] | None:
        """`reply_sent`, both messages appended, the fragments marked answered, the claim dropped: one write.

        `stopped`: an opt-out or hand-off replaced `processing_reply` while the reply was being sent; record the
        reply and drop the claim but keep that status."""
        status = "" if stopped else "#status = :reply_sent, "
        expression = (
            f"SET {status}#messages = list_append(if_not_exists(#messages, :empty), :messages), "
            "processing_time_ms = :ms, updated_at = :stamp "
            "REMOVE reply_attempt, reply_owner, reply_lease_expires, status_before_reply "
            "ADD replied_message_sids :sids"
        )
        values = {
            ":empty": [],
            ":messages": [dict(m) for m in messages],
            ":ms": processing_time_ms,
            ":stamp": stamp,
            ":sids": set(answered_sids),
        }
        if not stopped:
            values[":reply_sent"] = ConversationStatus.REPLY_SENT.value
        record = await self._owned_update(
            key, owner, expression, values, "finalise", {"#messages": "messages"}, stopped=stopped
        )
        if record is not None:  # status callbacks that came before this write: onto the messages it appended
            sids = [str(m["message_id"]) for m in messages if m.get("message_id")]
            await apply_pending_safely(self._dynamodb, self._table, item_key(key), record, sids)
        return record

    async def release(self, key: ConversationKey, owner: str, stamp: str) -> bool:
        """Nothing to answer: back to the status the conversation had before the claim."""
        expression = (
            "SET #status = status_before_reply, updated_at = :stamp "
            "REMOVE reply_owner, reply_lease_expires, status_before_reply"
        )
        return await self._owned_update(key, owner, expression, {":stamp": stamp}, "release") is not None

    async def fail(self, key: ConversationKey, owner: str, status: ConversationStatus, reason: str, stamp: str) -> bool:
        expression = (
            "SET #status = :failed, failure_reason = :reason, updated_at = :stamp "
            "REMOVE reply_owner, reply_lease_expires, status_before_reply"
        )
        values = {":failed": status.value, ":reason": reason, ":stamp": stamp}
        return await self._owned_update(key, owner, expression, values, "fail") is not None

    # ---- intake-side updates -------------------------------------------------------------------

    async def _set(self, key: ConversationKey, expression: str, values: Mapping[str, Any], operation: str) -> None:
        try:
            await self._dynamodb.update_item(
                TableName=self._table,
                Key=item_key(key),
                UpdateExpression=expression,
                ConditionExpression="attribute_exists(conversation_id)",
                ExpressionAttributeNames={"#status": "conversation_status"},
                ExpressionAttributeValues=attribute_values(values),
            )
        except AWS_FAILURES as exc:
            if is_conditional_check_failure(exc):
                return
            raise unavailable("dynamodb", operation, exc) from exc

    async def mark_opted_out(self, key: ConversationKey, stamp: str) -> None:
        expression = "SET #status = :opted_out, opted_out_at = :stamp, updated_at = :stamp"
        await self._set(key, expression, {":opted_out": ConversationStatus.OPTED_OUT.value, ":stamp": stamp}, "opt")

    async def mark_opted_in(self, key: ConversationKey, stamp: str) -> None:
        """Back to answerable after START/UNSTOP (only if it was opted out)."""
        try:
            await self._dynamodb.update_item(
                TableName=self._table,
                Key=item_key(key),
                UpdateExpression="SET #status = :replied, updated_at = :stamp REMOVE opted_out_at",
                ConditionExpression="#status = :opted_out",
                ExpressionAttributeNames={"#status": "conversation_status"},
                ExpressionAttributeValues=attribute_values(
                    {
                        ":replied": ConversationStatus.REPLY_SENT.value,
                        ":opted_out": ConversationStatus.OPTED_OUT.value,
                        ":stamp": stamp,
                    }
                ),
            )
        except AWS_FAILURES as exc:
            if not is_conditional_check_failure(exc):
                raise unavailable("dynamodb", "UpdateItem", exc) from exc

    async def mark_handed_off(self, key: ConversationKey, reason: str, stamp: str) -> None:
        expression = "SET #status = :handed_off, hand_off_reason = :reason, updated_at = :stamp"
        values = {":handed_off": ConversationStatus.HANDED_OFF.value, ":reason": reason, ":stamp": stamp}
        await self._set(key, expression, values, "hand_off")

    async def hold_delivery_status(
        self,
        key: ConversationKey,
        message_sid: str,
        new: DeliveryStatus,
        may_replace: frozenset[DeliveryStatus],
        stamp: str,
    ) -> bool:
        """A status callback for a SID not (yet) in `messages`: kept on this conversation until the final update
        that appends it applies it (`early_delivery`), or applied now if that update landed meanwhile."""
        return await hold(self._dynamodb, self._table, item_key(key), message_sid, new, may_replace, stamp)

    async def set_delivery_status(
        self,
        key: ConversationKey,
        index: int,
        message_sid: str,
        new: DeliveryStatus,
        may_replace: frozenset[DeliveryStatus],
        stamp: str,
    ) -> bool:
        """Forward-only: applied when the message has no state yet or one `new` may replace; else False."""
        return await set_message_status(
            self._dynamodb, self._table, item_key(key), index, message_sid, new, may_replace, stamp
        )

    async def release_exhausted(
        self, key: ConversationKey, owner: str, status: ConversationStatus, reason: str, stamp: str
    ) -> bool:
        """Retries ran out on a transient failure: back to the status before the claim (the conversation stays
        answerable), the failure noted in `last_reply_failure`; `reply_attempt` is kept, so a reply that may have
        gone out is reconciled by the next trigger, never sent twice."""
        expression = (
            "SET #status = status_before_reply, last_reply_failure = :failure, updated_at = :stamp "
            "REMOVE reply_owner, reply_lease_expires, status_before_reply"
        )
        failure = {"status": status.value, "reason": reason, "failure_kind": RETRIES_EXHAUSTED, "at": stamp}
        values = {":failure": failure, ":stamp": stamp}
        return await self._owned_update(key, owner, expression, values, "release_exhausted") is not None
