"""What a retry becomes on the last receive the queue allows (`consumers.claimed_work.exhausted`), pure."""

from __future__ import annotations

import pytest

from consumers.claimed_work import exhausted, failure_detail, transient_retry
from consumers.contracts import Outcome, QueueMessage
from consumers.sqs_messages import NO_REDRIVE_POLICY, RedrivePolicy
from service.domain.conversation import ConversationStatus
from service.domain.provider_ports import PermanentProviderError, TransientProviderError

POLICY = RedrivePolicy("https://sqs/q-dlq", 3)


def message(receive_count: int) -> QueueMessage:
    return QueueMessage("m1", "r1", "{}", {}, receive_count, 0.0)


def test_the_receive_at_max_receive_count_is_the_last():
    assert [POLICY.is_last_receive(n) for n in (1, 2, 3, 4)] == [False, False, True, True]


def test_without_a_redrive_policy_no_receive_is_the_last():
    assert not NO_REDRIVE_POLICY.is_last_receive(1000)


@pytest.mark.parametrize(
    ("step", "status"),
    [
        ("secrets", ConversationStatus.FAILED_SECRETS_FETCH),
        ("ai", ConversationStatus.FAILED_TO_PROCESS_AI),
        ("send", ConversationStatus.FAILED_TO_SEND_MESSAGE),
        ("reconcile", ConversationStatus.FAILED_TO_SEND_MESSAGE),
    ],
)
def test_a_transient_failure_on_the_last_receive_ends_in_its_steps_failed_status(step, status):
    retry = transient_retry(step, TransientProviderError("ai_unavailable", code="500"))

    ending = exhausted(retry, message(3), POLICY)

    assert ending is not None and ending.status is status and ending.exhausted
    assert ending.reason.startswith("retries_exhausted")
    assert f"{step}_transient" in ending.reason and "500: ai_unavailable" in ending.reason


def test_a_send_with_unknown_outcome_on_the_last_receive_fails_the_send():
    ending = exhausted(Outcome.retry("send_outcome_unknown", detail="504: twilio_outcome_unknown"), message(3), POLICY)

    assert ending is not None and ending.status is ConversationStatus.FAILED_TO_SEND_MESSAGE


def test_a_retry_with_receives_left_stays_a_retry():
    assert exhausted(Outcome.retry("ai_transient"), message(2), POLICY) is None


@pytest.mark.parametrize(
    "reason", ["claim_held_elsewhere", "claim_lost", "lease_lost", "final_update_failed", "dynamodb_unavailable"]
)
def test_retries_that_are_not_the_conversations_failure_stay_retries_even_on_the_last_receive(reason):
    assert exhausted(Outcome.retry(reason), message(3), POLICY) is None


def test_done_and_dead_letter_are_never_changed():
    assert exhausted(Outcome.done("sent"), message(3), POLICY) is None
    assert exhausted(Outcome.dead_letter("invalid_context"), message(3), POLICY) is None


def test_failure_detail_reads_code_and_reason_the_same_way_for_both_senders():
    assert failure_detail(PermanentProviderError("twilio_rejected", code="21211")) == "21211: twilio_rejected"
    assert failure_detail(PermanentProviderError("ai_api_key_missing")) == "ai_api_key_missing"
    assert failure_detail(KeyError("ai_api_key")) == "'ai_api_key'"
