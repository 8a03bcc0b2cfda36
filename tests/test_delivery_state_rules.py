"""Delivery states move forward only: queued < sent < delivered < read; failed/undelivered are terminal."""

from __future__ import annotations

import pytest

from service.domain.delivery_state import DeliveryStatus, is_forward, parse_delivery_status

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
