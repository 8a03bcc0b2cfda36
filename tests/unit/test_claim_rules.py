"""Every claim state machine of `service.domain.claims`, one test per row of its table (module docstring)."""

from __future__ import annotations

from typing import Any

import pytest

from service.domain.claims import (
    EXHAUSTIBLE_STATUSES,
    REPLYABLE_STATUSES,
    Claim,
    NextStep,
    RequestRecord,
    RequestState,
    TriggerLock,
    body_fingerprint,
    decide_conversation,
    decide_reply,
    decide_request,
    decide_trigger_lock,
    may_reopen,
    next_step,
    request_key,
)
from service.domain.conversation import (
    ConversationKey,
    ConversationRecord,
    ConversationStatus,
    Failure,
    Lease,
    SendLedger,
    SendState,
)

NOW = 1_000.0
LIVE = Lease("holder", NOW + 30)
LAPSED = Lease("holder", NOW - 1)
BODY = "a" * 64
OTHER_BODY = "b" * 64

FINISHED_OR_FAILED = [
    s for s in ConversationStatus if s not in (ConversationStatus.PROCESSING, ConversationStatus.INITIATED)
]
FAILED = [s for s in ConversationStatus if s.value.startswith("failed_")]


def request(
    state: RequestState = RequestState.IN_PROGRESS, lease: Lease = LIVE, body_hash: str | None = BODY
) -> RequestRecord:
    return RequestRecord("c#p#r", state, "c#p#r#447700900001", lease, body_hash=body_hash)


def conversation(status: ConversationStatus, **fields: Any) -> ConversationRecord:
    return ConversationRecord(
        key=ConversationKey("+447700900123", "c#p#r#447700900001"),
        status=status,
        channel="whatsapp",
        company_id="c",
        project_id="p",
        **fields,
    )


# ---- request idempotency ---------------------------------------------------------------------------


def test_a_request_never_seen_is_taken() -> None:
    assert decide_request(None, now=NOW, body_hash=BODY) is Claim.TAKE


def test_a_lapsed_claim_on_the_same_body_is_taken_over() -> None:
    assert decide_request(request(lease=LAPSED), now=NOW, body_hash=BODY) is Claim.TAKE


def test_a_live_claim_on_the_same_body_is_held() -> None:
    assert decide_request(request(lease=LIVE), now=NOW, body_hash=BODY) is Claim.HELD


@pytest.mark.parametrize("lease", [LIVE, LAPSED], ids=["lease_live", "lease_lapsed"])
def test_a_completed_request_with_the_same_body_is_done(lease: Lease) -> None:
    assert decide_request(request(RequestState.COMPLETED, lease), now=NOW, body_hash=BODY) is Claim.DONE


@pytest.mark.parametrize(
    ("state", "lease"),
    [
        (RequestState.IN_PROGRESS, LIVE),
        (RequestState.IN_PROGRESS, LAPSED),
        (RequestState.COMPLETED, LIVE),
        (RequestState.COMPLETED, LAPSED),
    ],
    ids=["in_progress_live", "in_progress_lapsed", "completed_live", "completed_lapsed"],
)
def test_another_body_under_the_same_request_id_is_refused_in_every_state(state: RequestState, lease: Lease) -> None:
    assert decide_request(request(state, lease), now=NOW, body_hash=OTHER_BODY) is Claim.REFUSED


@pytest.mark.parametrize(
    ("state", "lease", "expected"),
    [
        (RequestState.IN_PROGRESS, LIVE, Claim.HELD),
        (RequestState.IN_PROGRESS, LAPSED, Claim.TAKE),
        (RequestState.COMPLETED, LIVE, Claim.DONE),
    ],
    ids=["in_progress_live", "in_progress_lapsed", "completed"],
)
def test_a_record_written_without_a_body_hash_matches_any_body(
    state: RequestState, lease: Lease, expected: Claim
) -> None:
    assert decide_request(request(state, lease, body_hash=None), now=NOW, body_hash=OTHER_BODY) is expected


def test_a_claim_without_a_body_hash_matches_the_stored_one() -> None:
    assert decide_request(request(lease=LIVE), now=NOW, body_hash=None) is Claim.HELD


def test_a_request_lease_ending_exactly_now_has_lapsed() -> None:
    assert decide_request(request(lease=Lease("holder", NOW)), now=NOW, body_hash=BODY) is Claim.TAKE


def test_the_request_key_names_company_project_and_request() -> None:
    assert request_key("ci-1", "pi-1", "req-1") == "ci-1#pi-1#req-1"


def test_the_body_fingerprint_ignores_key_order_at_every_level() -> None:
    first = {"a": 1, "b": {"x": [1, 2], "y": "z"}}
    second = {"b": {"y": "z", "x": [1, 2]}, "a": 1}
    assert body_fingerprint(first) == body_fingerprint(second)
    assert len(body_fingerprint(first)) == 64


def test_the_body_fingerprint_tells_different_bodies_apart() -> None:
    assert body_fingerprint({"a": 1}) != body_fingerprint({"a": 2})


# ---- conversation claim (template sender) -------------------------------------------------------------


def test_a_conversation_never_seen_is_taken() -> None:
    assert decide_conversation(None, NOW) is Claim.TAKE


def test_a_processing_conversation_whose_claim_lapsed_is_taken_over() -> None:
    assert decide_conversation(conversation(ConversationStatus.PROCESSING, claim=LAPSED), NOW) is Claim.TAKE


def test_a_processing_conversation_with_a_live_claim_is_held() -> None:
    assert decide_conversation(conversation(ConversationStatus.PROCESSING, claim=LIVE), NOW) is Claim.HELD


def test_a_conversation_claim_ending_exactly_now_has_lapsed() -> None:
    record = conversation(ConversationStatus.PROCESSING, claim=Lease("holder", NOW))
    assert decide_conversation(record, NOW) is Claim.TAKE


@pytest.mark.parametrize("status", FINISHED_OR_FAILED, ids=str)
def test_a_finished_or_failed_conversation_is_done_whatever_its_lease(status: ConversationStatus) -> None:
    assert decide_conversation(conversation(status, claim=LIVE), NOW) is Claim.DONE
    assert decide_conversation(conversation(status, claim=LAPSED), NOW) is Claim.DONE


# ---- the send ledger (next_step) ------------------------------------------------------------------------


def test_a_fresh_conversation_generates_first() -> None:
    assert next_step(conversation(ConversationStatus.PROCESSING)) is NextStep.GENERATE


def test_generated_but_unsent_content_is_sent_without_a_second_ai_call() -> None:
    ledger = SendLedger(SendState.NOT_SENT, generated={"1": "Hi"})
    assert next_step(conversation(ConversationStatus.PROCESSING, ledger=ledger)) is NextStep.SEND


@pytest.mark.parametrize("generated", [{"1": "Hi"}, None], ids=["generated", "nothing_generated"])
def test_an_attempt_with_unknown_outcome_is_reconciled_before_anything_is_sent(
    generated: dict[str, str] | None,
) -> None:
    ledger = SendLedger(SendState.ATTEMPTING, generated=generated, attempted_at=NOW - 5)
    assert next_step(conversation(ConversationStatus.PROCESSING, ledger=ledger)) is NextStep.RECONCILE


def test_a_send_with_a_known_provider_id_only_needs_the_final_update() -> None:
    ledger = SendLedger(SendState.SENT, generated={"1": "Hi"}, provider_message_id="SM1")
    assert next_step(conversation(ConversationStatus.PROCESSING, ledger=ledger)) is NextStep.FINALISE


# ---- reopening by `comms dlq redrive` (may_reopen) --------------------------------------------------------


@pytest.mark.parametrize("status", sorted(EXHAUSTIBLE_STATUSES), ids=str)
def test_a_failure_by_exhausted_retries_may_be_reopened_by_a_redrive(status: ConversationStatus) -> None:
    assert may_reopen(conversation(status, failure=Failure(status, "ai_unavailable", exhausted=True)))


@pytest.mark.parametrize("status", sorted(EXHAUSTIBLE_STATUSES), ids=str)
def test_a_permanent_failure_is_never_reopened(status: ConversationStatus) -> None:
    assert not may_reopen(conversation(status, failure=Failure(status, "invalid_recipient")))


@pytest.mark.parametrize(
    "status", [ConversationStatus.FAILED_INVALID_CONTEXT, ConversationStatus.FAILED_UNKNOWN], ids=str
)
def test_a_failure_no_retry_can_fix_is_never_reopened_even_marked_exhausted(status: ConversationStatus) -> None:
    assert not may_reopen(conversation(status, failure=Failure(status, "bad", exhausted=True)))


@pytest.mark.parametrize(
    "status",
    [ConversationStatus.PROCESSING, ConversationStatus.INITIAL_MESSAGE_SENT, ConversationStatus.REPLY_SENT],
    ids=str,
)
def test_a_live_or_finished_conversation_is_never_reopened(status: ConversationStatus) -> None:
    failure = Failure(ConversationStatus.FAILED_TO_PROCESS_AI, "old", exhausted=True)
    assert not may_reopen(conversation(status, failure=failure))


def test_a_failed_status_without_a_recorded_failure_is_never_reopened() -> None:
    assert not may_reopen(conversation(ConversationStatus.FAILED_TO_SEND_MESSAGE))


# ---- reply claim -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(REPLYABLE_STATUSES), ids=str)
def test_a_conversation_waiting_for_an_answer_is_taken_for_a_reply(status: ConversationStatus) -> None:
    assert decide_reply(conversation(status), NOW) is Claim.TAKE


@pytest.mark.parametrize("status", sorted(REPLYABLE_STATUSES), ids=str)
def test_a_left_over_reply_lease_does_not_hold_a_replyable_conversation(status: ConversationStatus) -> None:
    assert decide_reply(conversation(status, reply_claim=LIVE), NOW) is Claim.TAKE


def test_a_reply_claim_that_lapsed_is_taken_over() -> None:
    record = conversation(ConversationStatus.PROCESSING_REPLY, reply_claim=LAPSED)
    assert decide_reply(record, NOW) is Claim.TAKE


def test_a_live_reply_claim_is_held() -> None:
    record = conversation(ConversationStatus.PROCESSING_REPLY, reply_claim=LIVE)
    assert decide_reply(record, NOW) is Claim.HELD


def test_a_reply_claim_ending_exactly_now_has_lapsed() -> None:
    record = conversation(ConversationStatus.PROCESSING_REPLY, reply_claim=Lease("holder", NOW))
    assert decide_reply(record, NOW) is Claim.TAKE


def test_the_reply_claim_ignores_the_template_claim() -> None:
    record = conversation(ConversationStatus.PROCESSING_REPLY, claim=LIVE, reply_claim=LAPSED)
    assert decide_reply(record, NOW) is Claim.TAKE


def test_a_reply_to_a_conversation_whose_first_message_is_still_sending_waits() -> None:
    assert decide_reply(conversation(ConversationStatus.PROCESSING, claim=LIVE), NOW) is Claim.WAIT


def test_a_reply_to_no_conversation_is_refused() -> None:
    assert decide_reply(None, NOW) is Claim.REFUSED


@pytest.mark.parametrize("status", [ConversationStatus.HANDED_OFF, ConversationStatus.OPTED_OUT, *FAILED], ids=str)
def test_a_conversation_handed_off_opted_out_or_failed_is_never_answered(status: ConversationStatus) -> None:
    assert decide_reply(conversation(status), NOW) is Claim.REFUSED


# ---- trigger lock --------------------------------------------------------------------------------------


def test_an_absent_trigger_lock_is_taken() -> None:
    assert decide_trigger_lock(None, "SM1", NOW) is Claim.TAKE


@pytest.mark.parametrize("queued", [False, True], ids=["unqueued", "queued"])
def test_a_lapsed_trigger_lock_is_taken_by_anyone(queued: bool) -> None:
    lock = TriggerLock("c#p#r#1", Lease("SM1", NOW - 1), trigger_queued=queued)
    assert decide_trigger_lock(lock, "SM2", NOW) is Claim.TAKE


def test_a_trigger_lock_ending_exactly_now_has_lapsed() -> None:
    lock = TriggerLock("c#p#r#1", Lease("SM1", NOW), trigger_queued=True)
    assert decide_trigger_lock(lock, "SM2", NOW) is Claim.TAKE


def test_a_webhook_retry_retakes_its_own_lock_while_its_trigger_is_not_queued() -> None:
    lock = TriggerLock("c#p#r#1", Lease("SM1", NOW + 60), trigger_queued=False)
    assert decide_trigger_lock(lock, "SM1", NOW) is Claim.TAKE


def test_a_webhook_retry_does_not_retake_its_lock_once_its_trigger_is_queued() -> None:
    lock = TriggerLock("c#p#r#1", Lease("SM1", NOW + 60), trigger_queued=True)
    assert decide_trigger_lock(lock, "SM1", NOW) is Claim.HELD


@pytest.mark.parametrize("queued", [False, True], ids=["unqueued", "queued"])
def test_a_live_trigger_lock_of_another_holder_is_held(queued: bool) -> None:
    lock = TriggerLock("c#p#r#1", Lease("SM1", NOW + 60), trigger_queued=queued)
    assert decide_trigger_lock(lock, "SM2", NOW) is Claim.HELD


# ---- the lease -----------------------------------------------------------------------------------------


def test_a_lease_is_live_until_its_expiry() -> None:
    assert Lease("holder", NOW + 0.001).is_live(NOW)


@pytest.mark.parametrize("expires_at", [NOW, NOW - 0.001], ids=["exactly_now", "before_now"])
def test_a_lease_is_lapsed_from_its_expiry_on(expires_at: float) -> None:
    assert not Lease("holder", expires_at).is_live(NOW)


def test_an_empty_lease_is_never_live() -> None:
    assert not Lease().is_live(NOW)


@pytest.mark.parametrize(
    ("expires_at", "wait_s"),
    [(NOW + 0.2, 1), (NOW + 2.5, 3), (NOW + 5, 5), (NOW, 1), (NOW - 100, 1)],
    ids=["fraction", "rounded_up", "whole", "exactly_now", "lapsed"],
)
def test_the_wait_is_whole_seconds_until_the_lease_lapses_and_at_least_one(expires_at: float, wait_s: int) -> None:
    assert Lease("holder", expires_at).wait_s(NOW) == wait_s
