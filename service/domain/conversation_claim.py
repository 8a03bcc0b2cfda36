"""The conversation claim and send ledger: who may work on a conversation, and what it already did.

One record per conversation in the conversations table, decided by conditional writes.
`conversation_status` says where the conversation is; `send_state` is the ledger of
the one template send, written before the provider is called and after it answered.

    record                                        claim by a consumer ->   next step
    ---------------------------------------------  ----------------------  ------------------------------
    absent                                        created, PROCESSING     generate, send
    PROCESSING, claim lease expired               taken over              by send_state (below)
    PROCESSING, claim lease live                  refused                 retry later (HELD_ELSEWHERE)
    INITIAL_MESSAGE_SENT or any later status      refused                 acknowledge, drop (ALREADY_DONE)
    any failed_* status                           refused                 acknowledge, drop (ALREADY_DONE)

    send_state on a claimed record                next step
    ---------------------------------------------  ------------------------------------------------------
    NOT_SENT, nothing generated                   GENERATE (AI), then record ATTEMPTING, then SEND
    NOT_SENT, content generated                   SEND the stored content (no second AI call)
    ATTEMPTING                                    RECONCILE: ask the provider; found -> FINALISE with its
                                                  id; not found -> SEND; provider cannot tell -> REVIEW
    SENT (provider id known, final update lost)   FINALISE only

Failures. A permanent one (or a send the provider cannot reconcile) ends the conversation in its failed_*
status for good. A transient one is retried by redelivery; on the last receive the queue allows
(ApproximateReceiveCount >= maxReceiveCount) it ends instead in the failed_* status of its step, marked
`failure_kind` = RETRIES_EXHAUSTED, and the message goes to the DLQ. Only `comms dlq redrive` reopens it:

    event                                         from                                    to
    ---------------------------------------------  --------------------------------------  -------------------------
    permanent failure                             PROCESSING (claim held)                 failed_*, failure_reason
    transient failure, receives left              PROCESSING (claim held)                 PROCESSING, claim lapsed
    transient failure, last receive               PROCESSING (claim held)                 failed_*, failure_reason,
                                                                                          failure_kind exhausted
    `comms dlq redrive` moves its message back    failed_*, failure_kind exhausted        PROCESSING, claim lapsed
                                                                                          (claim_expires_at 0)
    `comms dlq redrive`                           failed_* without failure_kind           unchanged (the message is
                                                                                          acknowledged and dropped)

The send ledger is never touched by a failure or a reopening: a conversation that failed with send_state
ATTEMPTING (the send may have happened) is reconciled by the redelivery, never sent blindly again.
The reopened record keeps the old reason as `last_failure_reason`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from service.domain.conversation import ConversationStatus

RETRIES_EXHAUSTED = "retries_exhausted"  # `failure_kind` of a failure `comms dlq redrive` may reopen

EXHAUSTIBLE_STATUSES = frozenset(
    {
        ConversationStatus.FAILED_SECRETS_FETCH,
        ConversationStatus.FAILED_TO_PROCESS_AI,
        ConversationStatus.FAILED_TO_SEND_MESSAGE,
    }
)

FINISHED_STATUSES = frozenset(
    {
        ConversationStatus.INITIAL_MESSAGE_SENT,
        ConversationStatus.PROCESSING_REPLY,
        ConversationStatus.REPLY_SENT,
        ConversationStatus.HANDED_OFF,
        ConversationStatus.OPTED_OUT,
        ConversationStatus.FAILED_SECRETS_FETCH,
        ConversationStatus.FAILED_TO_PROCESS_AI,
        ConversationStatus.FAILED_TO_SEND_MESSAGE,
        ConversationStatus.FAILED_INVALID_CONTEXT,
        ConversationStatus.FAILED_UNKNOWN,
    }
)


class SendState(StrEnum):
    NOT_SENT = "not_sent"
    ATTEMPTING = "attempting"
    SENT = "sent"


class ClaimVerdict(StrEnum):
    CLAIMED = "claimed"
    ALREADY_DONE = "already_done"
    HELD_ELSEWHERE = "held_elsewhere"


class NextStep(StrEnum):
    GENERATE = "generate"
    SEND = "send"
    RECONCILE = "reconcile"
    FINALISE = "finalise"


@dataclass(frozen=True, slots=True)
class ConversationSnapshot:
    """What a claim read back about the conversation."""

    status: str
    claim_owner: str | None
    claim_expires_at: float
    send_state: SendState = SendState.NOT_SENT
    thread_id: str | None = None
    generated: dict[str, str] | None = None
    usage: dict[str, int] = field(default_factory=dict)
    provider_message_id: str | None = None
    send_attempted_at: float | None = None
    created_at: str | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ConversationSnapshot:
        return cls(
            status=str(record.get("conversation_status", "")),
            claim_owner=record.get("claim_owner"),
            claim_expires_at=float(record.get("claim_expires_at", 0)),
            send_state=SendState(record.get("send_state", SendState.NOT_SENT.value)),
            thread_id=record.get("thread_id") or None,
            generated=record.get("generated_content"),
            usage=dict(record.get("ai_usage") or {}),
            provider_message_id=record.get("provider_message_id"),
            send_attempted_at=record.get("send_attempted_at"),
            created_at=record.get("created_at"),
        )


def verdict_for_refusal(snapshot: ConversationSnapshot, now: float) -> ClaimVerdict:
    """Why a claim was refused, from the record that refused it."""
    if snapshot.status in FINISHED_STATUSES:
        return ClaimVerdict.ALREADY_DONE
    if snapshot.status == ConversationStatus.PROCESSING and snapshot.claim_expires_at <= now:
        return ClaimVerdict.CLAIMED  # only if the conditional write raced the expiry: try again
    return ClaimVerdict.HELD_ELSEWHERE


def may_reopen(record: dict[str, Any]) -> bool:
    """A conversation whose retries ran out on a transient failure: a redriven message may take it up again."""
    return (
        record.get("failure_kind") == RETRIES_EXHAUSTED
        and str(record.get("conversation_status", "")) in EXHAUSTIBLE_STATUSES
    )


def next_step(snapshot: ConversationSnapshot) -> NextStep:
    if snapshot.send_state is SendState.SENT and snapshot.provider_message_id:
        return NextStep.FINALISE
    if snapshot.send_state is SendState.ATTEMPTING:
        return NextStep.RECONCILE
    if snapshot.generated:
        return NextStep.SEND
    return NextStep.GENERATE
