"""What the consumer runtime and a processor promise each other: the runtime receives, heartbeats, deletes and
drains; a processor turns one message into an `Outcome`. A processor never touches SQS; the runtime never reads a body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True, slots=True)
class QueueMessage:
    message_id: str
    receipt_handle: str
    body: str
    attributes: dict[str, str]  # SQS message attributes (string values)
    # Receives that counted: ApproximateReceiveCount (1 on first delivery) plus the receives a deferred copy's
    # original had used before it was deferred (`sqs_messages.PRIOR_RECEIVES`), so deferring never resets retries.
    receive_count: int
    sent_at: float  # SentTimestamp, epoch seconds
    group: str | None = None  # MessageGroupId (the tenant), kept on a deferred copy
    deferrals: int = 0  # times this message was deferred before (`Outcome.defer`)


class Disposition(StrEnum):
    DONE = "done"  # work finished or permanently failed and recorded: delete the message
    RETRY = "retry"  # transient failure: leave it to reappear (after `retry_delay_s` when given)
    DEAD_LETTER = "dead_letter"  # unprocessable (malformed): move to the DLQ now, no retry loop
    # Not now, and not a failure (a pace, a concurrency cap): a copy is queued with DelaySeconds=`retry_delay_s`
    # and the original deleted, so the wait costs no receive toward the DLQ's maxReceiveCount.
    DEFER = "defer"


@dataclass(frozen=True, slots=True)
class Outcome:
    disposition: Disposition
    reason: str  # metric label: "sent", "already_done", "ai_transient", "invalid_context:context_not_json", ...
    retry_delay_s: int | None = None
    detail: str | None = None  # what failed, for the record (never a metric label): "500: server_error"

    @classmethod
    def done(cls, reason: str) -> Outcome:
        return cls(Disposition.DONE, reason)

    @classmethod
    def retry(cls, reason: str, delay_s: int | None = None, *, detail: str | None = None) -> Outcome:
        return cls(Disposition.RETRY, reason, delay_s, detail)

    @classmethod
    def defer(cls, reason: str, delay_s: int) -> Outcome:
        """Try again in `delay_s` (at most 900 s a time: SQS's DelaySeconds) without burning a receive."""
        return cls(Disposition.DEFER, reason, max(0, delay_s))

    @classmethod
    def dead_letter(cls, reason: str) -> Outcome:
        return cls(Disposition.DEAD_LETTER, reason)


@dataclass(slots=True)
class Lease:
    """The message's visibility, as the processor sees it. `lost` is set when the runtime could not extend it:
    another consumer may now receive the message. Until the processor enters `protected()`, the runtime cancels
    its task on a lost lease; inside it (sending, final update) it never does."""

    lost: asyncio.Event = field(default_factory=asyncio.Event)
    _protected_depth: int = 0

    @property
    def is_protected(self) -> bool:
        return self._protected_depth > 0

    @contextmanager
    def protected(self) -> Iterator[None]:
        self._protected_depth += 1
        try:
            yield
        finally:
            self._protected_depth -= 1


class Processor(Protocol):
    async def process(self, message: QueueMessage, lease: Lease) -> Outcome:
        """Handle one message. Raising is treated as a transient failure (RETRY, reason `unhandled_error`)."""
        ...
