"""Every claim of the service as a pure decision over one leased-record shape (`Lease`).

Each claim is a conditional write in its adapter whose condition is the "take" rows below (the template claim:
a create, then a takeover only when the record exists); a refused write returns the record that refused it, and
the same function here says what the refusal means. So the state machine lives once, here, tested row by row
(tests/unit/test_claim_rules.py); adapters only mirror the condition.

Request idempotency (idempotency table, one record per company#project#request_id; "same body" compares the
SHA-256 `body_fingerprint` a claim stores; a record without one matches any body):

    record                                       decide_request            the caller
    -------------------------------------------  ------------------------  ----------------------------------------
    absent                                       TAKE                      writes IN_PROGRESS (lease), queues
    IN_PROGRESS, lease lapsed, same body         TAKE                      takes the crashed attempt over
    IN_PROGRESS, lease live,   same body         HELD                      waits (polling, `duplicate_wait_s`), then
                                                                           follows the record or answers 409
    COMPLETED,                 same body         DONE                      answers with the stored queue result
    any state,                 other body        REFUSED                   422 IDEMPOTENCY_KEY_REUSED
    IN_PROGRESS --complete--> COMPLETED (kept until TTL);  IN_PROGRESS --release--> absent (queueing failed)

Conversation claim (template sender; the lease is `ConversationRecord.claim`):

    record                                       decide_conversation       the caller
    -------------------------------------------  ------------------------  ----------------------------------------
    absent                                       TAKE                      creates it PROCESSING (one PutItem)
    PROCESSING, lease lapsed                     TAKE                      takes it over, keeping ledger + content
    PROCESSING, lease live                       HELD                      retries after the lease
    initial_message_sent or later, any failed_*  DONE                      acknowledges and drops the message

Reply claim (reply sender; the lease is `ConversationRecord.reply_claim`):

    record                                       decide_reply              the caller
    -------------------------------------------  ------------------------  ----------------------------------------
    initial_message_sent | reply_sent            TAKE                      -> processing_reply (status kept to
                                                                           return to)
    processing_reply, lease lapsed               TAKE                      takes it over
    processing_reply, lease live                 HELD                      retries after the lease
    processing (first message still sending)     WAIT                      retries shortly
    absent, handed_off, opted_out, failed_*      REFUSED                   not answerable: drops the trigger

Trigger lock (one per conversation: the fragment that takes it queues the delayed reply trigger):

    lock                                         decide_trigger_lock       the caller
    -------------------------------------------  ------------------------  ----------------------------------------
    absent, or lapsed (TTL deletes lazily)       TAKE                      queues the trigger; marks it queued only
                                                                           when the request was cut (answered 503)
    held by the same holder, trigger not queued  TAKE                      (a webhook retry after a cut, or a repeat
                                                                           of a delivery answered 200) queues it; a
                                                                           second trigger for a window answers nothing
    live, another holder or trigger queued       HELD                      only stages: the queued trigger answers

Template send ledger (`ConversationRecord.ledger`, on a claimed conversation), `next_step`:

    NOT_SENT, nothing generated                  GENERATE (AI), record ATTEMPTING, SEND
    NOT_SENT, content generated                  SEND the stored content (no second AI call)
    ATTEMPTING                                   RECONCILE with the provider: found -> FINALISE with its id;
                                                 not found -> SEND; provider cannot tell -> fail for review
    SENT (provider id known, final update lost)  FINALISE only

Failures. A permanent one ends the conversation in its failed_* status for good. A transient one is retried by
redelivery; on the last receive the queue allows it ends in the failed_* status of its step marked exhausted
(`Failure.exhausted`), and only `comms dlq redrive` reopens it (`may_reopen`): back to PROCESSING with a lapsed
lease, the ledger untouched, so a send that may have happened is reconciled, never repeated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from service.domain.conversation import ConversationRecord, ConversationStatus, Lease, SendState

RETRIES_EXHAUSTED = "retries_exhausted"  # the failure kind of a failure `comms dlq redrive` may reopen


class Claim(StrEnum):
    """What a claimant may do, given the record (or the record that refused its write)."""

    TAKE = "take"  # free: write the claim (or, after a refusal that raced a lapse, try again)
    HELD = "held"  # a live lease elsewhere: come back when it lapses
    DONE = "done"  # the work is finished: nothing to do
    WAIT = "wait"  # not yet claimable, but will be (a reply while the first message is still being sent)
    REFUSED = "refused"  # never claimable in this state


EXHAUSTIBLE_STATUSES = frozenset(
    {
        ConversationStatus.FAILED_SECRETS_FETCH,
        ConversationStatus.FAILED_TO_PROCESS_AI,
        ConversationStatus.FAILED_TO_SEND_MESSAGE,
    }
)
REPLYABLE_STATUSES = frozenset({ConversationStatus.INITIAL_MESSAGE_SENT, ConversationStatus.REPLY_SENT})


# ---- request idempotency -----------------------------------------------------------------------


class RequestState(StrEnum):
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    key: str
    state: RequestState
    conversation_id: str
    lease: Lease = field(default_factory=Lease)
    queue_timestamp: str | None = None
    body_hash: str | None = None  # None only on records written before hashes were stored


def request_key(company_id: str, project_id: str, request_id: str) -> str:
    return f"{company_id}#{project_id}#{request_id}"


def body_fingerprint(body: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON (keys sorted at every level) of a normalised request body."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def decide_request(record: RequestRecord | None, *, now: float, body_hash: str | None) -> Claim:
    if record is None:
        return Claim.TAKE
    if record.body_hash is not None and body_hash is not None and record.body_hash != body_hash:
        return Claim.REFUSED
    if record.state is RequestState.COMPLETED:
        return Claim.DONE
    return Claim.HELD if record.lease.is_live(now) else Claim.TAKE


# ---- conversation claim (template sender) -------------------------------------------------------


def decide_conversation(record: ConversationRecord | None, now: float) -> Claim:
    if record is None:
        return Claim.TAKE
    if record.status is not ConversationStatus.PROCESSING:
        return Claim.DONE
    return Claim.HELD if record.claim.is_live(now) else Claim.TAKE


def may_reopen(record: ConversationRecord) -> bool:
    """A conversation whose retries ran out on a transient failure: a redriven message may take it up again."""
    failure = record.failure
    return failure is not None and failure.exhausted and record.status in EXHAUSTIBLE_STATUSES


class NextStep(StrEnum):
    GENERATE = "generate"
    SEND = "send"
    RECONCILE = "reconcile"
    FINALISE = "finalise"


def next_step(record: ConversationRecord) -> NextStep:
    ledger = record.ledger
    if ledger.state is SendState.SENT and ledger.provider_message_id:
        return NextStep.FINALISE
    if ledger.state is SendState.ATTEMPTING:
        return NextStep.RECONCILE
    if ledger.generated:
        return NextStep.SEND
    return NextStep.GENERATE


# ---- reply claim --------------------------------------------------------------------------------


def decide_reply(record: ConversationRecord | None, now: float) -> Claim:
    if record is None:
        return Claim.REFUSED
    if record.status in REPLYABLE_STATUSES:
        return Claim.TAKE
    if record.status is ConversationStatus.PROCESSING_REPLY:
        return Claim.HELD if record.reply_claim.is_live(now) else Claim.TAKE
    if record.status is ConversationStatus.PROCESSING:
        return Claim.WAIT
    return Claim.REFUSED


# ---- trigger lock -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TriggerLock:
    conversation_id: str
    lease: Lease  # owner: the MessageSid (or retrigger tag) that took it
    trigger_queued: bool = False


def decide_trigger_lock(lock: TriggerLock | None, holder: str, now: float) -> Claim:
    if lock is None or not lock.lease.is_live(now):
        return Claim.TAKE
    if lock.lease.owner == holder and not lock.trigger_queued:
        return Claim.TAKE
    return Claim.HELD
