"""The conversation claim and send-ledger transitions of `service.domain.conversation_claim`, one per row."""

from __future__ import annotations

import pytest

from service.domain.conversation import ConversationStatus
from service.domain.conversation_claim import (
    RETRIES_EXHAUSTED,
    ClaimVerdict,
    ConversationSnapshot,
    NextStep,
    SendState,
    may_reopen,
    next_step,
    verdict_for_refusal,
)


def snapshot(status: str = "processing", expires: float = 0.0, **fields) -> ConversationSnapshot:
    return ConversationSnapshot(status=status, claim_owner="other", claim_expires_at=expires, **fields)


@pytest.mark.parametrize(
    "status",
    [s for s in ConversationStatus if s not in (ConversationStatus.PROCESSING, ConversationStatus.INITIATED)],
)
def test_a_finished_or_failed_conversation_is_already_done(status):
    assert verdict_for_refusal(snapshot(status.value, expires=1e12), now=100) is ClaimVerdict.ALREADY_DONE


def test_a_live_claim_is_held_elsewhere():
    assert verdict_for_refusal(snapshot(expires=200), now=100) is ClaimVerdict.HELD_ELSEWHERE


def test_an_expired_claim_refused_by_a_race_may_be_claimed_again():
    assert verdict_for_refusal(snapshot(expires=50), now=100) is ClaimVerdict.CLAIMED


def test_a_fresh_conversation_generates_first():
    assert next_step(snapshot()) is NextStep.GENERATE


def test_generated_but_unsent_content_is_sent_without_a_second_ai_call():
    assert next_step(snapshot(generated={"1": "Hi"})) is NextStep.SEND


def test_an_attempt_with_unknown_outcome_is_reconciled_before_anything_is_sent():
    assert next_step(snapshot(send_state=SendState.ATTEMPTING, generated={"1": "Hi"})) is NextStep.RECONCILE


def test_a_send_with_a_known_provider_id_only_needs_the_final_update():
    assert next_step(snapshot(send_state=SendState.SENT, provider_message_id="SM1")) is NextStep.FINALISE


def test_snapshot_reads_a_stored_record():
    record = {
        "conversation_status": "processing",
        "claim_owner": "m/1",
        "claim_expires_at": 12,
        "send_state": "attempting",
        "thread_id": "conv_1",
        "generated_content": {"1": "Hi"},
        "ai_usage": {"total_tokens": 3},
        "send_attempted_at": 10.5,
    }
    read = ConversationSnapshot.from_record(record)
    assert (read.send_state, read.thread_id, read.generated, read.usage) == (
        SendState.ATTEMPTING,
        "conv_1",
        {"1": "Hi"},
        {"total_tokens": 3},
    )


@pytest.mark.parametrize("status", ["failed_secrets_fetch", "failed_to_process_ai", "failed_to_send_message"])
def test_a_failure_by_exhausted_retries_may_be_reopened_by_a_redrive(status):
    assert may_reopen({"conversation_status": status, "failure_kind": RETRIES_EXHAUSTED})


@pytest.mark.parametrize(
    "record",
    [
        {"conversation_status": "failed_to_send_message"},  # permanent: no failure_kind
        {"conversation_status": "failed_invalid_context", "failure_kind": RETRIES_EXHAUSTED},
        {"conversation_status": "initial_message_sent", "failure_kind": RETRIES_EXHAUSTED},
        {"conversation_status": "processing"},
    ],
)
def test_permanent_failures_and_live_conversations_are_never_reopened(record):
    assert not may_reopen(record)
