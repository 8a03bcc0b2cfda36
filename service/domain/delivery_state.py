"""Delivery states from Twilio status callbacks, forward-only (SPEC §5, §7).

    queued → sent → delivered → read          ordered: a state may only be replaced by a later one
    queued | sent → undelivered | failed      terminal: nothing replaces them

Callbacks arrive out of order and more than once; applying one is allowed only from the
states returned by `may_follow`, so an old callback never moves a message backwards.

A callback can also arrive before the final update that records its message (Twilio reports at once and
never retries; a crash-recovered send is recorded only after a redelivery reconciles it). Such a callback is
kept on the conversation(s) awaiting that update (`ConversationRecord.awaits_final_update`) and applied by it
(`early_delivery`).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from service.domain.conversation import ConversationRecord


class DeliveryStatus(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    UNDELIVERED = "undelivered"
    FAILED = "failed"


ORDERED = (DeliveryStatus.QUEUED, DeliveryStatus.SENT, DeliveryStatus.DELIVERED, DeliveryStatus.READ)
TERMINAL_FAILURES = frozenset({DeliveryStatus.UNDELIVERED, DeliveryStatus.FAILED})
# Twilio's other intermediate values map onto the ordered ones.
ALIASES = {"accepted": DeliveryStatus.QUEUED, "scheduled": DeliveryStatus.QUEUED, "sending": DeliveryStatus.QUEUED}


def parse_delivery_status(raw: str) -> DeliveryStatus | None:
    value = raw.strip().lower()
    if value in ALIASES:
        return ALIASES[value]
    try:
        return DeliveryStatus(value)
    except ValueError:
        return None


def may_follow(new: DeliveryStatus) -> frozenset[DeliveryStatus]:
    """The stored states that `new` may replace (a message with no state yet always accepts)."""
    if new in TERMINAL_FAILURES:
        return frozenset({DeliveryStatus.QUEUED, DeliveryStatus.SENT})
    return frozenset(ORDERED[: ORDERED.index(new)])


def is_forward(current: DeliveryStatus | None, new: DeliveryStatus) -> bool:
    return current is None or current in may_follow(new)


HELD_ON_AT_MOST = 3  # conversations a kept callback is written to (each keeps a bounded map)


def conversations_to_hold(conversations: Sequence[ConversationRecord]) -> list[ConversationRecord]:
    """Where a callback for a SID no record shows yet is kept: the conversations between the pair that await a
    final update (newest first), else the newest one; none when there is no conversation at all."""
    newest_first = sorted(conversations, key=lambda c: c.created_at, reverse=True)
    awaiting = [c for c in newest_first if c.awaits_final_update]
    return (awaiting or newest_first[:1])[:HELD_ON_AT_MOST]
