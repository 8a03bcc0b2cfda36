"""Delivery states from Twilio status callbacks, forward-only (SPEC §5, §7).

    queued → sent → delivered → read          ordered: a state may only be replaced by a later one
    queued | sent → undelivered | failed      terminal: nothing replaces them

Callbacks arrive out of order and more than once; applying one is allowed only from the
states returned by `may_follow`, so an old callback never moves a message backwards.
"""

from __future__ import annotations

from enum import StrEnum


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
