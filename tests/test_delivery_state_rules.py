"""Delivery states move forward only: queued < sent < delivered < read; failed/undelivered are terminal."""

from __future__ import annotations

import pytest

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


def test_a_callback_before_its_message_is_kept_on_the_conversations_awaiting_a_final_update() -> None:
    older_sending = {"conversation_id": "a", "created_at": "2026-01-01T10:00:00.000Z", "send_state": "attempting"}
    replying = {"conversation_id": "b", "created_at": "2026-01-01T09:00:00.000Z", "reply_attempt": {"batch": "k"}}
    newest_done = {"conversation_id": "c", "created_at": "2026-01-01T11:00:00.000Z", "send_state": "sent"}

    held_on = conversations_to_hold([replying, newest_done, older_sending])

    assert [c["conversation_id"] for c in held_on] == ["a", "b"]


def test_with_no_conversation_awaiting_a_final_update_the_newest_keeps_it() -> None:
    older = {"conversation_id": "a", "created_at": "2026-01-01T10:00:00.000Z", "send_state": "sent"}
    newest = {"conversation_id": "c", "created_at": "2026-01-01T11:00:00.000Z", "send_state": "sent"}

    assert [c["conversation_id"] for c in conversations_to_hold([newest, older])] == ["c"]
    assert conversations_to_hold([]) == []
