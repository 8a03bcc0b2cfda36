"""The reply sender's side of the conversations table (`ports.ReplyClaims`): the reply claim (a lease, so a
crashed replier never locks a conversation for ever), the reply ledger and the final update.

The claim follows the reply-claim table of `service.domain.claims`: one conditional UpdateItem whose refusal
returns the refusing record, judged by `claims.decide_reply`. Its transitions:

    initial_message_sent | reply_sent  --claim-->              processing_reply (the status before kept)
    processing_reply, lease lapsed     --claim-->              processing_reply (a takeover)
    processing_reply  --finalise-->           reply_sent
    processing_reply  --finish_unanswered-->  the status before the claim
    processing_reply  --fail-->               failed_* (permanent), or the status before the claim with the
                                              failure noted (retries exhausted: still answerable)
    opted_out | handed_off (landed while sending)  --finalise-->  unchanged, the reply recorded
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from service.adapters.aws import conversation_codec as codec
from service.adapters.aws.dynamo_calls import refusing_item, update_returning
from service.adapters.aws.dynamo_codec import from_item
from service.adapters.aws.early_delivery import apply_pending_safely
from service.adapters.aws.errors import AWS_FAILURES, is_conditional_check_failure, unavailable
from service.domain.claims import Claim, decide_reply
from service.domain.conversation import ConversationKey, ConversationRecord, Failure, Message, ReplyAttempt
from service.domain.ports import ClaimAnswer
from service.domain.timefmt import utc_iso

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


class DynamoReplyClaims:
    def __init__(self, dynamodb: DynamoDBClient, table: str, clock: Callable[[], float] = time.time) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._clock = clock

    async def claim(self, key: ConversationKey, owner: str, lease_until: float, now: float) -> ClaimAnswer:
        write = codec.claim_reply(owner, lease_until, now, self._stamp())
        try:
            answer = await self._dynamodb.update_item(
                **write.params(self._table, key), ReturnValues="ALL_NEW", ReturnValuesOnConditionCheckFailure="ALL_OLD"
            )
        except AWS_FAILURES as exc:
            if not is_conditional_check_failure(exc):
                raise unavailable("dynamodb", "UpdateItem", exc) from exc
            old = codec.record_or_none(refusing_item(exc))
            return ClaimAnswer(decide_reply(old, now), old)
        return ClaimAnswer(Claim.TAKE, codec.record_from_item(from_item(answer["Attributes"])))

    # ---- what the claimant does (each only while it holds the claim) ---------------------------------

    async def refresh(self, key: ConversationKey, owner: str, lease_until: float) -> bool:
        return await self._owned(key, codec.refresh_reply(owner, lease_until), "refresh") is not None

    async def release(self, key: ConversationKey, owner: str) -> bool:
        """The lease lapses at once: a retried trigger finds the claim open to takeover, not held until then."""
        return await self._owned(key, codec.refresh_reply(owner, 0), "refresh") is not None

    async def record_attempt(self, key: ConversationKey, owner: str, draft: ReplyAttempt) -> bool:
        write = codec.record_reply_attempt(owner, draft, self._stamp())
        return await self._owned(key, write, "record_attempt") is not None

    async def clear_attempt(self, key: ConversationKey, owner: str) -> bool:
        return await self._owned(key, codec.clear_reply_attempt(owner), "clear_attempt") is not None

    async def fail(self, key: ConversationKey, owner: str, failure: Failure) -> bool:
        operation = "release_exhausted" if failure.exhausted else "fail"
        return await self._owned(key, codec.fail_reply(owner, failure, self._stamp()), operation) is not None

    async def finish_unanswered(self, key: ConversationKey, owner: str) -> bool:
        return await self._owned(key, codec.finish_unanswered(owner, self._stamp()), "release") is not None

    async def finalise(
        self,
        key: ConversationKey,
        owner: str,
        messages: Sequence[Message],
        answered_sids: Sequence[str],
        processing_time_ms: int,
    ) -> ConversationRecord | None:
        stamp = self._stamp()
        parts = (owner, messages, answered_sids, processing_time_ms, stamp)
        item = await self._owned(key, codec.finalise_reply(*parts), "finalise")
        if item is None:  # STOP or a hand-off replaced processing_reply while sending: record it, keep that status
            item = await self._owned(key, codec.finalise_stopped_reply(*parts), "finalise")
        if item is None:  # the lease lapsed and another trigger took over: it reconciles and finalises
            return None
        # Status callbacks that came before this write (kept in early_delivery): onto the messages it appended.
        await apply_pending_safely(self._dynamodb, self._table, codec.item_key(key), item, codec.message_ids(messages))
        return codec.record_from_item(item)

    async def _owned(self, key: ConversationKey, write: codec.Write, operation: str) -> dict[str, Any] | None:
        """The record as written, or None when `owner` no longer holds the claim."""
        return await update_returning(self._dynamodb, operation, **write.params(self._table, key))

    def _stamp(self) -> str:
        return utc_iso(self._clock())
