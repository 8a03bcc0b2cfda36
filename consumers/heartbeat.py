"""Keeping in-flight messages invisible: the per-message lease record and the visibility heartbeat."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from consumers.batching import change_visibility_batch
from consumers.contracts import Lease, QueueMessage
from consumers.metrics import ConsumerMetrics

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import MessageAttributeValueTypeDef

log = structlog.get_logger(__name__)


@dataclass(eq=False, slots=True)
class InFlight:
    """One received message from dispatch until it is finished; identity-hashed."""

    message: QueueMessage
    message_attributes: dict[str, MessageAttributeValueTypeDef]  # as received, for the DLQ copy
    lease: Lease
    received_at: float  # monotonic, taken before the ReceiveMessage call: the 12 h cap counts from here
    visible_until: float  # monotonic, conservative (taken before each call that set it)
    task: asyncio.Task[None] | None = None
    finishing: asyncio.Task[None] | None = None
    cancel_requested: bool = False

    def cancel(self) -> None:
        if self.task is not None and not self.cancel_requested:
            self.cancel_requested = True
            self.task.cancel()


def next_visibility_s(now: float, received_at: float, extension_s: int, max_lease_s: int) -> int:
    """Visibility to ask for at `now`: the extension, or what is left before the lease cap (0 at the cap)."""
    return max(0, min(extension_s, int(received_at + max_lease_s - now)))


class VisibilityHeartbeat:
    """Extends each tracked message once less than half the extension is left (never past the lease cap), in
    ChangeMessageVisibilityBatch calls; cancels unprotected work on a lost lease.

    An entry SQS rejects (`SenderFault`: receipt invalid or expired) loses its lease at once. A call that
    fails as a whole, or an SQS-side entry failure, is retried on the next tick while at least two ticks
    of visibility remain; after that the lease is lost too.
    """

    def __init__(
        self,
        sqs: SQSClient,
        queue_url: str,
        queue_name: str,
        metrics: ConsumerMetrics,
        *,
        extension_s: int,
        tick_s: float,
        max_lease_s: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._queue_name = queue_name
        self._metrics = metrics
        self._extension_s = extension_s
        self._tick_s = tick_s
        self._max_lease_s = max_lease_s
        self._clock = clock
        self._tracked: set[InFlight] = set()
        self._extending: set[InFlight] = set()
        self._round_done = asyncio.Event()
        self._round_done.set()

    def track(self, item: InFlight) -> None:
        self._tracked.add(item)

    async def forget(self, item: InFlight) -> None:
        """Stop extending `item`; returns once no extension of it is still on the wire."""
        self._tracked.discard(item)
        while item in self._extending:
            await self._round_done.wait()

    async def run(self) -> None:
        """Beat every tick until cancelled; a failing beat is logged and never stops the heartbeat."""
        while True:
            await asyncio.sleep(self._tick_s)
            try:
                await self.beat()
            except Exception:
                log.error("heartbeat_failed", queue=self._queue_name, exc_info=True)

    async def beat(self) -> None:
        """One tick: extend what is due, give up leases at the cap, cancel unprotected work on lost leases."""
        now = self._clock()
        due: list[tuple[InFlight, int]] = []
        for item in list(self._tracked):
            if item.lease.lost.is_set():
                continue
            remaining = item.visible_until - now
            if remaining >= self._extension_s / 2:
                continue
            timeout = next_visibility_s(now, item.received_at, self._extension_s, self._max_lease_s)
            if timeout > remaining:
                due.append((item, timeout))
            elif remaining < self._tick_s:
                self.lose(item, "max_lease")
        if due:
            await self.extend(due)
        for item in list(self._tracked):
            if item.lease.lost.is_set():
                self.cancel_unprotected(item)

    async def extend(self, due: list[tuple[InFlight, int]]) -> None:
        requested_at = self._clock()
        self._extending.update(item for item, _ in due)
        self._round_done.clear()
        try:
            results = await change_visibility_batch(
                self._sqs, self._queue_url, [(item.message.receipt_handle, timeout) for item, timeout in due]
            )
        finally:
            self._extending.difference_update(item for item, _ in due)
            self._round_done.set()
        for (item, timeout), failure in zip(due, results, strict=True):
            if item not in self._tracked:
                continue
            result = "ok" if failure is None else "failed"
            self._metrics.visibility_extensions.labels(queue=self._queue_name, result=result).inc()
            if failure is None:
                item.visible_until = requested_at + timeout
                continue
            remaining = item.visible_until - self._clock()
            if failure.sender_fault or remaining < 2 * self._tick_s:
                self.lose(item, failure.code)
            else:
                log.warning(
                    "visibility_extension_failed",
                    queue=self._queue_name,
                    message_id=item.message.message_id,
                    code=failure.code,
                    remaining_s=round(remaining, 1),
                )

    def lose(self, item: InFlight, why: str) -> None:
        """The message may now reach another consumer: tell the processor, and cancel it unless protected."""
        item.lease.lost.set()
        log.warning(
            "lease_lost",
            queue=self._queue_name,
            message_id=item.message.message_id,
            reason=why,
            protected=item.lease.is_protected,
        )
        self.cancel_unprotected(item)

    def cancel_unprotected(self, item: InFlight) -> None:
        if item.task is not None and not item.task.done() and item.finishing is None and not item.lease.is_protected:
            item.cancel()
