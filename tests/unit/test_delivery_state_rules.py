"""Delivery states move forward only: queued < sent < delivered < read; failed/undelivered are terminal."""

from __future__ import annotations

import pytest

from service.domain.conversation import (
    ConversationKey,
    ConversationRecord,
    ConversationStatus,
    ReplyAttempt,
    SendLedger,
    SendState,
    TokenUsage,
)
from service.domain.delivery_state import DeliveryStatus, conversations_to_hold, is_forward, parse_delivery_status

S = DeliveryStatus


@pytest.mark.parametrize(
    ("current", "new"),
    [(None, S.SENT), (S.QUEUED, S.SENT), (S.SENT, S.DELIVERED), (S.DELIVERED, S.READ), (S.QUEUED, S.READ)],
)
def test_a_later_state_replaces_an_earlier_one(current: DeliveryStatus | None, new: DeliveryStatus) -> None:
    assert is_forward(current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [(S.DELIVERED, S.SENT), (S.READ, S.DELIVERED), (S.SENT, S.SENT), (S.READ, S.QUEUED)],
)
def test_an_earlier_or_equal_state_never_replaces_a_later_one(current: DeliveryStatus, new: DeliveryStatus) -> None:
    assert not is_forward(current, new)


@pytest.mark.parametrize("terminal", [S.FAILED, S.UNDELIVERED])
def test_failures_follow_queued_or_sent_and_nothing_follows_them(terminal: DeliveryStatus) -> None:
    assert is_forward(S.SENT, terminal)
    assert not is_forward(S.DELIVERED, terminal)
    assert not is_forward(terminal, S.READ)
    assert not is_forward(terminal, S.FAILED)


def test_twilio_intermediate_statuses_count_as_queued_and_unknown_ones_are_ignored() -> None:
    assert parse_delivery_status("sending") is S.QUEUED
    assert parse_delivery_status("Delivered") is S.DELIVERED
    assert parse_delivery_status("receiving") is None


def conversation(
    conversation_id: str, created_at: str, send_state: SendState = SendState.SENT, *, replying: bool = False
) -> ConversationRecord:
    attempt = ReplyAttempt(("SMa",), "hi", created_at, "hello", TokenUsage(), "thread", 0.0) if replying else None
    return ConversationRecord(
        key=ConversationKey("+447700900123", conversation_id),
        status=ConversationStatus.INITIAL_MESSAGE_SENT,
        channel="sms",
        company_id="c",
        project_id="p",
        created_at=created_at,
        ledger=SendLedger(state=send_state),
        reply_attempt=attempt,
    )


def ids(conversations: list[ConversationRecord]) -> list[str]:
    return [c.key.conversation_id for c in conversations]


def test_a_callback_before_its_message_is_kept_on_the_conversations_awaiting_a_final_update_newest_first() -> None:
    sending = conversation("a", "2026-01-01T10:00:00.000Z", SendState.ATTEMPTING)
    replying = conversation("b", "2026-01-01T09:00:00.000Z", replying=True)
    newest_done = conversation("c", "2026-01-01T11:00:00.000Z")

    assert ids(conversations_to_hold([replying, newest_done, sending])) == ["a", "b"]


def test_a_callback_is_kept_on_at_most_three_awaiting_conversations() -> None:
    awaiting = [conversation(str(n), f"2026-01-01T1{n}:00:00.000Z", SendState.ATTEMPTING) for n in range(5)]

    assert ids(conversations_to_hold(awaiting)) == ["4", "3", "2"]


def test_with_no_conversation_awaiting_a_final_update_the_newest_keeps_it() -> None:
    older = conversation("a", "2026-01-01T10:00:00.000Z")
    newest = conversation("c", "2026-01-01T11:00:00.000Z")

    assert ids(conversations_to_hold([older, newest])) == ["c"]


def test_with_no_conversation_a_callback_is_kept_nowhere() -> None:
    assert conversations_to_hold([]) == []
