"""The reply sender's side of the conversations table (`ports.ReplyClaims`): the reply claim (a lease, so a
crashed replier never locks a conversation for ever), the reply ledger and the final update.

The claim follows the reply-claim table of `service.domain.claims`: one conditional UpdateItem whose refusal
returns the refusing record, judged by `claims.decide_reply`. Its transitions:

    initial_message_sent | reply_sent  --claim-->              processing_reply (the status before kept)
    processing_reply, lease lapsed     --claim-->              processing_reply (a takeover)
    processing_reply  --finalise-->           reply_sent (the messages written as items first, `message_items`)
    processing_reply  --finish_unanswered-->  the status before the claim
    processing_reply  --fail-->               failed_* (permanent), or the status before the claim with the
                                              failure noted (retries exhausted: still answerable)
    opted_out | handed_off (landed while sending)  --finalise-->  unchanged, the reply recorded
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.dynamo_calls import update_or_refusal, update_returning
from service.adapters.aws.early_delivery import DeliveryStates
from service.adapters.aws.message_items import MessageItems
from service.domain.claims import RETRIES_EXHAUSTED, Claim, decide_reply
from service.domain.conversation import (
    ConversationKey,
    ConversationRecord,
    ConversationStatus,
    Failure,
    Message,
    ReplyAttempt,
)
from service.domain.ports import ClaimAnswer
from service.domain.timefmt import utc_iso

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

REPLYING = ConversationStatus.PROCESSING_REPLY.value
# `claims.decide_reply`: answerable, or processing_reply with a lapsed lease, may be taken.
CLAIMABLE = (
    "attribute_exists(conversation_id) AND ((#status IN (:initial, :replied)) "
    "OR (#status = :replying AND reply_lease_expires <= :now))"
)
OWNED = "reply_owner = :owner AND #status = :replying"
# An opt-out or hand-off that landed while the owner was sending: its reply went out and must still be recorded.
OWNED_BUT_STOPPED = "reply_owner = :owner AND #status IN (:opted_out, :handed_off)"
DROP_CLAIM = "REMOVE reply_owner, reply_lease_expires, status_before_reply"
# The final update, after the status it sets (if any): the messages counted (their items are written just before:
# the user message lists the fragments it answered), the AI continuation the next reply chains from. Nothing in it
# grows with the conversation.
RECORD_REPLY = (
    "#count = :count, thread_id = :thread, processing_time_ms = :ms, updated_at = :stamp "
    "REMOVE reply_attempt, reply_owner, reply_lease_expires, status_before_reply"
)


def with_fragments(messages: Sequence[Message], answered_sids: Sequence[str]) -> list[Message]:
    """The user message (else the first) lists the fragments it joined: how a later reply knows them answered."""
    first_user = next((i for i, message in enumerate(messages) if message.role == "user"), 0)
    return [
        replace(message, fragment_sids=message.fragment_sids or tuple(answered_sids)) if i == first_user else message
        for i, message in enumerate(messages)
    ]


class DynamoReplyClaims:
    def __init__(
        self,
        dynamodb: DynamoDBClient,
        table: str,
        clock: Callable[[], float] = time.time,
        *,
        messages_table: str,
    ) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._clock = clock
        self._messages = MessageItems(dynamodb, messages_table)

    async def claim(self, key: ConversationKey, owner: str, lease_until: float, now: float) -> ClaimAnswer:
        """-> processing_reply, remembering the status to return to."""
        update = (
            "SET status_before_reply = if_not_exists(status_before_reply, #status), "
            "#status = :replying, reply_owner = :owner, reply_lease_expires = :lease, updated_at = :stamp"
        )
        values = {
            ":initial": ConversationStatus.INITIAL_MESSAGE_SENT.value,
            ":replied": ConversationStatus.REPLY_SENT.value,
            ":replying": REPLYING,
            ":owner": owner,
            ":lease": lease_until,
            ":now": now,
            ":stamp": self._stamp(),
        }
        params = codec.update_params(self._table, key, update, CLAIMABLE, values)
        taken, item = await update_or_refusal(self._dynamodb, "UpdateItem", **params)
        if not taken:
            old = codec.record_or_none(item)
            return ClaimAnswer(decide_reply(old, now), old)
        return ClaimAnswer(Claim.TAKE, codec.record_from_item(item))

    # ---- what the claimant does (each only while it holds the claim) ---------------------------------

    async def refresh(self, key: ConversationKey, owner: str, lease_until: float) -> bool:
        return await self._owned(key, owner, "refresh", "SET reply_lease_expires = :lease", {":lease": lease_until})

    async def release(self, key: ConversationKey, owner: str) -> bool:
        """The lease lapses at once: a retried trigger finds the claim open to takeover, not held until then."""
        return await self.refresh(key, owner, 0)

    async def record_attempt(self, key: ConversationKey, owner: str, draft: ReplyAttempt) -> bool:
        update = "SET reply_attempt = :attempt, updated_at = :stamp"
        values = {":attempt": codec.reply_attempt_fields(draft), ":stamp": self._stamp()}
        return await self._owned(key, owner, "record_attempt", update, values)

    async def clear_attempt(self, key: ConversationKey, owner: str) -> bool:
        return await self._owned(key, owner, "clear_attempt", "REMOVE reply_attempt", {})

    async def fail(self, key: ConversationKey, owner: str, failure: Failure) -> bool:
        """Failed for good; or, retries exhausted, back to the status before the claim (still answerable) with the
        failure noted in `last_reply_failure` and `reply_attempt` kept (a reply that may have gone out is reconciled
        by the next trigger, never sent twice)."""
        stamp = self._stamp()
        if not failure.exhausted:
            update = f"SET #status = :failed, failure_reason = :reason, updated_at = :stamp {DROP_CLAIM}"
            values = {":failed": failure.status.value, ":reason": failure.reason, ":stamp": stamp}
            return await self._owned(key, owner, "fail", update, values)
        noted = {
            "status": failure.status.value,
            "reason": failure.reason,
            "failure_kind": RETRIES_EXHAUSTED,
            "at": stamp,
        }
        update = f"SET #status = status_before_reply, last_reply_failure = :failure, updated_at = :stamp {DROP_CLAIM}"
        return await self._owned(key, owner, "release_exhausted", update, {":failure": noted, ":stamp": stamp})

    async def finish_unanswered(self, key: ConversationKey, owner: str) -> bool:
        update = f"SET #status = status_before_reply, updated_at = :stamp {DROP_CLAIM}"
        return await self._owned(key, owner, "release", update, {":stamp": self._stamp()})

    async def finalise(
        self,
        key: ConversationKey,
        owner: str,
        messages: Sequence[Message],
        answered_sids: Sequence[str],
        thread_id: str,
        processing_time_ms: int,
        *,
        claimed: ConversationRecord,
    ) -> ConversationRecord | None:
        """The message items first (at the positions the claimed record fixes: a retry or a takeover writes the
        same keys), then the conversation update that counts them, conditional on the claim."""
        first = claimed.recorded_messages
        positions = await self._messages.record(key, first, with_fragments(messages, answered_sids))
        shared = {
            ":owner": owner,
            ":count": first + len(messages),
            ":thread": thread_id,
            ":ms": processing_time_ms,
            ":stamp": self._stamp(),
        }
        names = {**codec.STATUS_NAME, "#count": codec.MESSAGE_COUNT}
        replied_values = {**shared, ":replying": REPLYING, ":replied_status": ConversationStatus.REPLY_SENT.value}
        update = f"SET #status = :replied_status, {RECORD_REPLY}"
        item = await self._update("finalise", key, update, OWNED, replied_values, names)
        if item is None:  # STOP or a hand-off replaced processing_reply while sending: record it, keep that status
            stopped = {
                **shared,
                ":opted_out": ConversationStatus.OPTED_OUT.value,
                ":handed_off": ConversationStatus.HANDED_OFF.value,
            }
            item = await self._update("finalise", key, f"SET {RECORD_REPLY}", OWNED_BUT_STOPPED, stopped, names)
        if item is None:  # the lease lapsed and another trigger took over: it reconciles and finalises
            return None
        # Status callbacks that came before this write (kept in early_delivery): onto the messages it recorded.
        recorded = {sid: position for sid, position in positions.items() if sid}
        await DeliveryStates(self._dynamodb, self._table, key, self._messages).apply_pending(item, recorded)
        return codec.record_from_item(item)

    async def recent_messages(self, record: ConversationRecord, limit: int) -> tuple[Message, ...]:
        return await self._messages.recent(record, limit, delivery_states=False)  # a first reply reads no item

    async def _owned(
        self, key: ConversationKey, owner: str, operation: str, update: str, values: Mapping[str, Any]
    ) -> bool:
        values = {":owner": owner, ":replying": REPLYING, **values}
        return await self._update(operation, key, update, OWNED, values) is not None

    async def _update(
        self,
        operation: str,
        key: ConversationKey,
        update: str,
        condition: str,
        values: Mapping[str, Any],
        names: Mapping[str, str] = codec.STATUS_NAME,
    ) -> dict[str, Any] | None:
        """The record as written, or None when the condition (that `owner` holds the claim) refused it."""
        params = codec.update_params(self._table, key, update, condition, values, names)
        return await update_returning(self._dynamodb, operation, **params)

    def _stamp(self) -> str:
        return utc_iso(self._clock())
