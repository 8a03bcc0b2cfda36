"""The generic SQS consumer: one long-poll loop per queue feeding a bounded pool of worker slots.

Stopping never costs a message a receive it did not use. SQS cannot take back a ReceiveMessage: cancelling
the call only closes our end, the long poll stays open at SQS until its WaitTimeSeconds and takes whatever
becomes visible meanwhile (another replica's retry whose visibility lapsed, a new message), hiding it for the
full visibility timeout with one more receive counted; two rollouts during a slow AI call used to dead-letter
healthy messages. So on stop:

- No new poll starts. A poller waiting for a slot or resting after a failed poll has nothing open at SQS and
  is cancelled at once. An open receive is left to end by itself (within `wait_time_s`), even when nothing is
  in flight; what it brings is handed back at once (visibility 0, never started). Meanwhile in-flight work
  drains within `grace_s`.
- Work interrupted at stop (reason `shutdown`, visibility 0), and any retry due before the open receive could
  end, is made visible only once no receive is outstanding (`_no_receive` set); until then the heartbeat keeps
  it invisible.
- The wait is bounded: `wait_time_s + receive_margin_s` from the start of the receive (25 s by default, the AWS
  read timeout). A receive still open then (a hung connection; a failing one with botocore's retries) is
  cancelled as a last resort (`receive_abandoned`); a receive that fails ends the poller without the usual
  rest, so an unreachable SQS never holds stop up beyond that bound.
- `abandon()` (an operator's second signal) cancels the open receive and all in-flight work at once and makes
  nothing visible; interrupted messages reappear when their visibility lapses.

A deferral (`Outcome.defer`: a pace or a concurrency cap said "not now") is settled as a copy queued with
DelaySeconds (SendMessageBatch: the copies of one receive together) and the original deleted, so it burns no
receive; the receives that did count travel with the copy (`sqs_messages.PRIOR_RECEIVES`). See `defer`.

Not ours to avoid: a message made visible while the final receive is open is taken by it (one receive, handed
back at once), and hidden for a visibility timeout only if that receive is abandoned. Stop takes up to
`wait_time_s + receive_margin_s` even when idle, longer than a short `grace_s`: the process' termination grace
must allow for it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

from consumers.backoff import MAX_VISIBILITY_S, PollBackoff, retry_delay_s
from consumers.batching import DeleteBatcher, SendBatcher, change_visibility_batch
from consumers.contracts import Disposition, Lease, Outcome, Processor
from consumers.heartbeat import InFlight, VisibilityHeartbeat
from consumers.metrics import ConsumerMetrics
from consumers.sqs_messages import (
    SYSTEM_ATTRIBUTES,
    deferred_copy_attributes,
    find_redrive_policy,
    resendable_attributes,
    to_queue_message,
)
from service import tracing
from service.aws_failures import AWS_FAILURES, error_code

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import MessageTypeDef, SendMessageBatchRequestEntryTypeDef

log = structlog.get_logger(__name__)

UNHANDLED_ERROR = "unhandled_error"  # the processor raised
LEASE_LOST = "lease_lost"  # visibility could not be kept; the work was cancelled (or finished protected)
SHUTDOWN = "shutdown"  # cancelled by stop() after the grace period; made visible again at once
ABANDONED = "abandoned"  # cancelled by abandon(); left to reappear when its visibility lapses
CANCELLED = "cancelled"  # cancelled by something else; made visible again at once
MAX_DELAY_S = 900  # SQS's DelaySeconds limit: a longer deferral comes back after it and is deferred again


class ConsumerConfig(BaseModel):
    """How one consumer polls, keeps leases, finishes and drains."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    concurrency: int = Field(64, ge=1, le=2000, description="Worker slots: messages processed at once")
    wait_time_s: int = Field(20, ge=0, le=20, description="ReceiveMessage WaitTimeSeconds (long poll)")
    max_messages: int = Field(10, ge=1, le=10, description="Upper bound for MaxNumberOfMessages")
    visibility_timeout_s: int = Field(
        60, ge=2, le=MAX_VISIBILITY_S, description="Visibility asked for on receive and added by each extension"
    )
    max_lease_s: int = Field(MAX_VISIBILITY_S, ge=1, le=MAX_VISIBILITY_S, description="Visibility cap from receive")
    # 0.5 s: about a third of the DeleteMessageBatch calls of 0.05 s at tens of messages a second; the wait is
    # after the slot is freed and the heartbeat has left the message at least half a visibility timeout.
    delete_flush_interval_s: float = Field(0.5, ge=0, description="Longest a finished delete waits for its batch")
    copy_flush_interval_s: float = Field(
        0.01, ge=0, description="Longest a deferred copy waits for others to share its SendMessageBatch"
    )
    retry_base_s: float = Field(5.0, gt=0, description="Retry backoff: base * 2^(receive_count-1), jittered")
    retry_cap_s: float = Field(300.0, gt=0, le=MAX_VISIBILITY_S)
    poll_backoff_base_s: float = Field(0.5, gt=0, description="Rest after a failed poll, doubling per failure")
    poll_backoff_cap_s: float = Field(30.0, gt=0)
    receive_margin_s: float = Field(
        5.0, ge=0, description="How long past WaitTimeSeconds stop() waits for an open receive before cancelling it"
    )
    protected_grace_s: float = Field(10.0, ge=0, description="Extra wait at stop for work inside lease.protected()")
    finish_timeout_s: float = Field(30.0, gt=0, description="Longest stop() waits for finishing SQS calls")
    dead_letter_queue_url: str | None = Field(None, description="Default: the queue's RedrivePolicy target")

    @property
    def heartbeat_tick_s(self) -> float:
        return min(1.0, self.visibility_timeout_s / 4)  # at least two beats before half the visibility lapses


@dataclass(slots=True)
class ConsumerCounts:
    """Since start: what arq calls complete / failed / retried, plus dead letters, lost leases and returns."""

    received: int = 0
    complete: int = 0  # DONE
    retried: int = 0  # RETRY, including processor errors, lost leases and work cancelled at stop
    deferred: int = 0  # DEFER (a copy re-queued with a delay, the original deleted; no receive burnt)
    dead_lettered: int = 0  # DEAD_LETTER
    failed: int = 0  # the processor raised (also counted in retried)
    leases_lost: int = 0
    returned: int = 0  # made visible again at once at stop (received after stop began, or cancelled)


class QueueConsumer:
    """Receives from one queue and runs `processor` on each message, at most `config.concurrency` at once.

    `clock` (monotonic seconds) times receives, visibility and the lease cap, here and in the heartbeat; `sleep`
    is the poller's rest after a failed poll. Stop's bounded waits always run on real time.
    """

    def __init__(
        self,
        sqs: SQSClient,
        queue_url: str,
        queue_name: str,
        processor: Processor,
        metrics: ConsumerMetrics,
        config: ConsumerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._sqs = sqs
        self._queue_url = queue_url
        self._queue_name = queue_name
        self._processor = processor
        self._metrics = metrics
        self._config = config = config or ConsumerConfig()
        self._dead_letter_url = config.dead_letter_queue_url
        self._clock = clock
        self._sleep = sleep
        self._slots = asyncio.Semaphore(config.concurrency)
        self._heartbeat = VisibilityHeartbeat(
            sqs,
            queue_url,
            queue_name,
            metrics,
            extension_s=config.visibility_timeout_s,
            tick_s=config.heartbeat_tick_s,
            max_lease_s=config.max_lease_s,
            clock=clock,
        )
        self._deletes = DeleteBatcher(sqs, queue_url, queue_name, metrics, config.delete_flush_interval_s)
        self._copies = SendBatcher(sqs, queue_url, queue_name, config.copy_flush_interval_s)
        self._in_flight: dict[asyncio.Task[None], InFlight] = {}
        self._finishing: set[asyncio.Task[None]] = set()
        self._stop_deadline: float | None = None  # monotonic; set when stop() begins
        self._returns: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._no_receive = asyncio.Event()  # set while no ReceiveMessage of ours is open at SQS
        self._no_receive.set()
        self._receive_deadline = 0.0  # monotonic: when the open receive should have ended, margin included
        self._after_poll_end: set[InFlight] = set()  # finishes waiting for `_no_receive` to make their message visible
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._abandoned = False
        self._stopped = asyncio.Event()
        self.counts = ConsumerCounts()

    @property
    def queue_name(self) -> str:
        return self._queue_name

    @property
    def running(self) -> bool:
        """Ready: started, not stopping, poller and heartbeat alive."""
        tasks = (self._poller, self._heartbeat_task)
        return not self._stopping and all(task is not None and not task.done() for task in tasks)

    @property
    def ongoing(self) -> int:
        return len(self._in_flight)

    @property
    def dead_letter_queue_url(self) -> str | None:
        return self._dead_letter_url

    async def start(self) -> None:
        """Find the DLQ (unless configured), then start the heartbeat and the poller. Starts once."""
        if self._poller is not None:
            raise RuntimeError(f"consumer for {self._queue_name} already started")
        if self._dead_letter_url is None:
            self._dead_letter_url = (await find_redrive_policy(self._sqs, self._queue_url)).dead_letter_url
        if self._dead_letter_url is None:
            log.warning("no_dead_letter_queue", queue=self._queue_name)
        self._heartbeat_task = asyncio.create_task(self._heartbeat.run(), name=f"heartbeat:{self._queue_name}")
        self._poller = asyncio.create_task(self.poll(), name=f"poller:{self._queue_name}")
        self._poller.add_done_callback(self._poller_ended)
        log.info(
            "consumer_started",
            queue=self._queue_name,
            concurrency=self._config.concurrency,
            visibility_timeout_s=self._config.visibility_timeout_s,
            dead_letter_queue=self._dead_letter_url is not None,
        )

    async def stop(self, grace_s: float) -> None:
        """Stop polling, drain in-flight work within `grace_s`, return the rest once no receive is open, flush."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._deletes.hurry()  # the last deletes go out at once instead of after the flush interval
        log.info("consumer_stopping", queue=self._queue_name, ongoing=self.ongoing, grace_s=grace_s)
        config = self._config
        # The whole stop ends by this (Settings.stop_budget_s counts it): what finishes after the drain (cancelled
        # work's SQS calls, returns, the last deletes) has what the drain left, at most finish_timeout_s. Cut, a
        # message only reappears later (after its visibility timeout) and the claims acknowledge a repeat.
        self._stop_deadline = time.monotonic() + max(
            grace_s + config.protected_grace_s, config.wait_time_s + config.receive_margin_s
        )
        try:
            polling = asyncio.create_task(self.stop_polling(), name=f"stop-polling:{self._queue_name}")
            try:
                await self.drain(grace_s)
            finally:
                await polling
            pending = self._finishing | self._returns  # shielded finishing steps and returns
            if pending:
                _, late = await asyncio.wait(pending, timeout=self._finish_window())
                if late:
                    log.error("finishing_timed_out", queue=self._queue_name, pending=len(late))
            try:
                async with asyncio.timeout(self._finish_window()):
                    await self._deletes.close()
            except TimeoutError:
                log.error("last_deletes_timed_out", queue=self._queue_name)
        finally:
            if self._heartbeat_task is not None:
                self._heartbeat_task.cancel()
                await asyncio.wait({self._heartbeat_task})
            self._stopped.set()
            log.info("consumer_stopped", queue=self._queue_name, ongoing=self.ongoing, **asdict(self.counts))

    async def stop_polling(self) -> None:
        """Cancel the poller at once unless a receive is open; an open one may end by itself until
        `wait_time_s + receive_margin_s` from its start, and is cancelled only as a last resort."""
        poller = self._poller
        if poller is None or poller.done():
            return
        if not self._no_receive.is_set():
            await asyncio.wait({poller}, timeout=max(0.0, self._receive_deadline - time.monotonic()))
            if not poller.done():
                log.warning(
                    "receive_abandoned",
                    queue=self._queue_name,
                    wait_time_s=self._config.wait_time_s,
                    margin_s=self._config.receive_margin_s,
                    waiting_to_return=len(self._after_poll_end),
                )
        poller.cancel()
        await asyncio.wait({poller})

    def abandon(self) -> None:
        """Stop at once, making nothing visible: the cancelled receive stays open at SQS and would take it."""
        if self._abandoned:
            return
        self._abandoned = True
        log.warning("consumer_abandoned", queue=self._queue_name, ongoing=self.ongoing)
        if self._poller is not None and not self._poller.done():
            if not self._no_receive.is_set():
                log.warning("receive_abandoned", queue=self._queue_name, reason="abandon")
            self._poller.cancel()
        for item in list(self._in_flight.values()):
            item.cancel()

    async def drain(self, grace_s: float) -> None:
        """Wait for in-flight work up to `grace_s`, then cancel what is outside `lease.protected()` (again each
        tick as protection ends); protected work gets `protected_grace_s` before it is cancelled too."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=grace_s)
        deadline = time.monotonic() + self._config.protected_grace_s
        while self._in_flight:
            for item in list(self._in_flight.values()):
                if not item.lease.is_protected:
                    item.cancel()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait(set(self._in_flight), timeout=min(left, self._config.heartbeat_tick_s))
        protected = [item for item in self._in_flight.values() if not item.cancel_requested]
        if protected:
            log.warning("cancelling_protected_work", queue=self._queue_name, count=len(protected))
        for item in protected:
            item.cancel()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=self._finish_window())

    def _finish_window(self) -> float:
        """How long a finishing stage of stop() may still wait: what is left before the stop deadline, at most
        finish_timeout_s (the whole of it before a stop began)."""
        left = self._stop_deadline - time.monotonic() if self._stop_deadline is not None else math.inf
        return max(0.0, min(self._config.finish_timeout_s, left))

    def _poller_ended(self, poller: asyncio.Task[None]) -> None:
        if not poller.cancelled() and poller.exception() is not None:
            log.error("poller_died", queue=self._queue_name, exc_info=poller.exception())

    async def poll(self) -> None:
        """Long-poll while running, asking for no more messages than there are free worker slots."""
        backoff = PollBackoff(self._config.poll_backoff_base_s, self._config.poll_backoff_cap_s)
        while not self._stopping:
            reserved = await self.reserve_slots()
            if self._stopping:
                self.release_slots(reserved)
                return
            received_at = self._clock()
            try:
                messages = await self.receive(reserved)
            except asyncio.CancelledError:
                self.release_slots(reserved)
                raise
            except Exception as exc:
                self.release_slots(reserved)
                code = error_code(exc) or type(exc).__name__
                if self._stopping:
                    log.warning("poll_failed", queue=self._queue_name, code=code)
                    return
                delay = backoff.next_delay_s()
                exc_info = not isinstance(exc, AWS_FAILURES)
                log.warning(
                    "poll_failed", queue=self._queue_name, code=code, retry_in_s=round(delay, 2), exc_info=exc_info
                )
                await self._sleep(delay)
                continue
            backoff.reset()
            if self._stopping:
                self.release_slots(reserved)
                self.return_unstarted(messages)
                return
            self.release_slots(reserved - len(messages))
            for raw in messages:
                self.dispatch(raw, received_at)

    async def reserve_slots(self) -> int:
        """Wait for one free worker slot, then take every other free one (up to `max_messages`)."""
        await self._slots.acquire()
        reserved = 1
        while reserved < self._config.max_messages and not self._slots.locked():
            await self._slots.acquire()  # free: returns without suspending
            reserved += 1
        return reserved

    def release_slots(self, count: int) -> None:
        for _ in range(max(0, count)):
            self._slots.release()

    async def receive(self, count: int) -> list[MessageTypeDef]:
        """One long poll for up to `count` messages; if cancelled after SQS answered, the answer goes back.
        `_no_receive` is clear while the call is open, so stop() can hold back visibility changes until it ends."""
        self._no_receive.clear()
        self._receive_deadline = time.monotonic() + self._config.wait_time_s + self._config.receive_margin_s
        request = asyncio.create_task(
            self._sqs.receive_message(
                QueueUrl=self._queue_url,
                MaxNumberOfMessages=count,
                WaitTimeSeconds=self._config.wait_time_s,
                VisibilityTimeout=self._config.visibility_timeout_s,
                MessageSystemAttributeNames=SYSTEM_ATTRIBUTES,  # type: ignore[arg-type]
                MessageAttributeNames=["All"],
            )
        )
        try:
            answer = await request
        except asyncio.CancelledError:
            if request.done() and not request.cancelled() and request.exception() is None:
                self.return_unstarted(request.result().get("Messages", []))
            raise
        finally:
            self._no_receive.set()
        return answer.get("Messages", [])

    def dispatch(self, raw: MessageTypeDef, received_at: float) -> None:
        """Start one message in its own task, holding the slot reserved for it until the task ends."""
        message = to_queue_message(raw)
        item = InFlight(
            message=message,
            message_attributes=resendable_attributes(raw),
            lease=Lease(),
            received_at=received_at,
            visible_until=received_at + self._config.visibility_timeout_s,
        )
        task = asyncio.create_task(self.run_message(item), name=f"message:{self._queue_name}:{message.message_id}")
        item.task = task
        self._in_flight[task] = item
        task.add_done_callback(self._message_ended)
        self._heartbeat.track(item)
        self.counts.received += 1
        self._metrics.received.labels(queue=self._queue_name).inc()
        self._metrics.in_flight.labels(queue=self._queue_name).inc()

    def return_unstarted(self, messages: Sequence[MessageTypeDef]) -> None:
        """Make messages this consumer will not process visible again at once."""
        if not messages:
            return
        self.counts.returned += len(messages)
        returning = asyncio.create_task(self._make_visible_now(messages), name=f"return:{self._queue_name}")
        self._returns.add(returning)
        returning.add_done_callback(self._returns.discard)

    async def _make_visible_now(self, messages: Sequence[MessageTypeDef]) -> None:
        changes = [(raw.get("ReceiptHandle", ""), 0) for raw in messages]
        results = await change_visibility_batch(self._sqs, self._queue_url, changes)
        for raw, failure in zip(messages, results, strict=True):
            log.info(
                "message_returned",
                queue=self._queue_name,
                message_id=raw.get("MessageId", ""),
                result="visible" if failure is None else failure.code,
            )

    async def run_message(self, item: InFlight) -> None:
        """Process, then finish in a shielded step; the task (and its slot) lasts until the finish is done, except
        for one waiting for the open receive to end at stop: stop() waits for that one after the drain."""
        started = time.perf_counter()
        outcome: Outcome | None = None
        try:
            outcome = await self.process(item)
        except Exception:
            self.counts.failed += 1
            log.error("processor_raised", queue=self._queue_name, message_id=item.message.message_id, exc_info=True)
            outcome = Outcome.retry(UNHANDLED_ERROR)
        finally:
            if outcome is None:
                outcome = self.abandoned_outcome(item)
            finishing = self.finish_soon(item, outcome, time.perf_counter() - started)
            if item not in self._after_poll_end:
                await asyncio.shield(finishing)

    async def process(self, item: InFlight) -> Outcome:
        """The processor's outcome; while tracing is on, under a CONSUMER span in the trace the message carries.
        The span ends with the processing: settling on SQS (delete, retry, dead letter) is not part of it."""
        tracer = tracing.active_tracer()
        if tracer is None:
            return await self._processor.process(item.message, item.lease)
        message = item.message
        with tracing.consumer_span(
            tracer, self._queue_name, message.message_id, message.receive_count, message.attributes
        ) as span:
            try:
                outcome = await self._processor.process(message, item.lease)
            except Exception:
                tracing.record_outcome(span, Disposition.RETRY, UNHANDLED_ERROR)
                raise
            tracing.record_outcome(span, outcome.disposition, outcome.reason)
            return outcome

    def abandoned_outcome(self, item: InFlight) -> Outcome:
        """What a cancelled message's finish does: nothing after a lost lease, else visible again at once."""
        if item.lease.lost.is_set():
            return Outcome.retry(LEASE_LOST)
        if self._abandoned:
            return Outcome.retry(ABANDONED)
        return Outcome.retry(SHUTDOWN if self._stopping else CANCELLED, 0)

    def finish_soon(self, item: InFlight, outcome: Outcome, duration_s: float) -> asyncio.Task[None]:
        """The message's one finishing task (created on first call), tracked so stop() can wait for it."""
        if item.finishing is None:
            if self.would_be_taken_by_open_receive(item, outcome):
                self._after_poll_end.add(item)
            item.finishing = asyncio.create_task(
                self.finish(item, outcome, duration_s), name=f"finish:{self._queue_name}:{item.message.message_id}"
            )
            self._finishing.add(item.finishing)
            item.finishing.add_done_callback(self._finishing.discard)
        return item.finishing

    def would_be_taken_by_open_receive(self, item: InFlight, outcome: Outcome) -> bool:
        """Stopping, a receive is open, and this retry (a backoff one may be short) would be visible before it ends:
        that receive would take the message for nothing, and if abandoned hide it for a visibility timeout."""
        if self._abandoned or not self._stopping or self._no_receive.is_set():
            return False
        if outcome.disposition not in (Disposition.RETRY, Disposition.DEFER) or item.lease.lost.is_set():
            return False  # after a lost lease nothing is changed: the message reappears when its visibility lapses
        delay = outcome.retry_delay_s
        return delay is None or delay <= self._receive_deadline - time.monotonic()

    def _message_ended(self, task: asyncio.Task[None]) -> None:
        item = self._in_flight.pop(task)
        self._slots.release()
        self._metrics.in_flight.labels(queue=self._queue_name).dec()
        if item.finishing is None:  # cancelled before it ever ran
            self.finish_soon(item, self.abandoned_outcome(item), 0.0)

    async def finish(self, item: InFlight, outcome: Outcome, duration_s: float) -> None:
        """Stop the heartbeat for it, settle it on SQS by disposition, count and log one line."""
        settled: dict[str, Any]
        waited_for_poll_end = item in self._after_poll_end
        try:
            if waited_for_poll_end:
                try:
                    await self._no_receive.wait()  # the heartbeat keeps it invisible meanwhile
                finally:
                    self._after_poll_end.discard(item)
            await self._heartbeat.forget(item)
            if outcome.disposition is Disposition.DONE:
                deleted = await self._deletes.delete(item.message.message_id, item.message.receipt_handle)
                settled = {"sqs": "deleted" if deleted else "delete_failed"}
            elif outcome.disposition is Disposition.DEAD_LETTER:
                settled = await self.dead_letter(item)
            elif outcome.disposition is Disposition.DEFER:
                settled = await self.defer(item, outcome)
            else:
                settled = await self.retry_later(item, outcome)
        except Exception:
            log.error("finish_failed", queue=self._queue_name, message_id=item.message.message_id, exc_info=True)
            settled = {"sqs": "finish_failed"}
        if waited_for_poll_end:
            settled["after_poll_end"] = True
        self.record(item, outcome, duration_s, settled)

    async def retry_later(self, item: InFlight, outcome: Outcome) -> dict[str, Any]:
        """Make the message visible after the processor's delay, or a backoff from its receive count."""
        if item.lease.lost.is_set() or (self._abandoned and outcome.reason in (SHUTDOWN, ABANDONED)):
            return {"sqs": "left_to_reappear"}
        delay = outcome.retry_delay_s
        if delay is None:
            delay = retry_delay_s(item.message.receive_count, self._config.retry_base_s, self._config.retry_cap_s)
        left_in_lease = int(item.received_at + self._config.max_lease_s - self._clock())
        delay = max(0, min(delay, left_in_lease, MAX_VISIBILITY_S))
        try:
            await self._sqs.change_message_visibility(
                QueueUrl=self._queue_url, ReceiptHandle=item.message.receipt_handle, VisibilityTimeout=delay
            )
        except AWS_FAILURES as exc:
            log.warning(
                "retry_visibility_failed",
                queue=self._queue_name,
                message_id=item.message.message_id,
                code=error_code(exc) or type(exc).__name__,
            )
            return {"sqs": "visibility_change_failed"}
        return {"sqs": "visibility_set", "retry_in_s": delay}

    async def defer(self, item: InFlight, outcome: Outcome) -> dict[str, Any]:
        """Queue a copy (same body, attributes and group) visible after the delay, then delete the original: the
        copy starts again at receive count 1, so waiting costs no receive toward the DLQ. Part-way failures:
        - the copy is not sent: the original is retried after the same delay instead (one receive more, never lost);
        - the copy is sent but the delete fails: the original comes back after its visibility timeout too. Both
          name one conversation, and its claim lets only one of them send (the other ends `already_done`).
        The slot is freed once the copy is queued: the original's delete goes out with the next batch (it stays
        invisible meanwhile; stop() flushes and waits for the batches); a crash before it leaves that duplicate."""
        if item.lease.lost.is_set():
            return {"sqs": "left_to_reappear"}  # another consumer may hold it: a copy would only add a duplicate
        delay = max(0, min(outcome.retry_delay_s or 0, MAX_DELAY_S))
        entry: SendMessageBatchRequestEntryTypeDef = {
            "Id": "",  # numbered by the batch
            "MessageBody": item.message.body,
            "MessageAttributes": deferred_copy_attributes(item.message, item.message_attributes),
            "DelaySeconds": delay,
        }
        if item.message.group:
            entry["MessageGroupId"] = item.message.group
        copy_id = await self._copies.send(entry)
        if copy_id is None:
            log.warning("defer_copy_failed", queue=self._queue_name, message_id=item.message.message_id)
            self._metrics.deferrals.labels(queue=self._queue_name, reason=outcome.reason, result="copy_failed").inc()
            return {**await self.retry_later(item, outcome), "deferred": False}
        # Queued now (before the copy can come back and be deleted in the same batch), not waited for.
        deleted = self._deletes.delete_soon(item.message.message_id, item.message.receipt_handle)
        deleted.add_done_callback(partial(self._deferred_deleted, outcome.reason))
        return {"sqs": "copied", "retry_in_s": delay, "copy_message_id": copy_id}

    def _deferred_deleted(self, reason: str, deleted: asyncio.Future[bool]) -> None:
        ok = not deleted.cancelled() and deleted.result()
        result = "deferred" if ok else "copied_delete_failed"
        self._metrics.deferrals.labels(queue=self._queue_name, reason=reason, result=result).inc()

    async def dead_letter(self, item: InFlight) -> dict[str, Any]:
        """Copy body and attributes to the DLQ, then delete; if the copy fails, leave it for the redrive policy."""
        if self._dead_letter_url is None:
            log.error("dead_letter_queue_unknown", queue=self._queue_name, message_id=item.message.message_id)
            return {"sqs": "no_dead_letter_queue"}
        try:
            sent = await self._sqs.send_message(
                QueueUrl=self._dead_letter_url, MessageBody=item.message.body, MessageAttributes=item.message_attributes
            )
        except AWS_FAILURES as exc:
            log.error(
                "dead_letter_send_failed",
                queue=self._queue_name,
                message_id=item.message.message_id,
                code=error_code(exc) or type(exc).__name__,
            )
            return {"sqs": "dead_letter_send_failed"}
        deleted = await self._deletes.delete(item.message.message_id, item.message.receipt_handle)
        return {
            "sqs": "moved_to_dead_letter_queue" if deleted else "copied_to_dead_letter_queue_delete_failed",
            "dead_letter_message_id": sent.get("MessageId"),
        }

    def record(self, item: InFlight, outcome: Outcome, duration_s: float, settled: dict[str, Any]) -> None:
        disposition = outcome.disposition
        if disposition is Disposition.DONE:
            self.counts.complete += 1
        elif disposition is Disposition.DEAD_LETTER:
            self.counts.dead_lettered += 1
        elif disposition is Disposition.DEFER:
            self.counts.deferred += 1
        else:
            self.counts.retried += 1
        if item.lease.lost.is_set():
            self.counts.leases_lost += 1
        if outcome.reason in (SHUTDOWN, CANCELLED):
            self.counts.returned += 1
        self._metrics.finished.labels(queue=self._queue_name, disposition=disposition, reason=outcome.reason).inc()
        self._metrics.duration.labels(queue=self._queue_name).observe(duration_s)
        log.info(
            "message_finished",
            queue=self._queue_name,
            message_id=item.message.message_id,
            disposition=str(disposition),
            reason=outcome.reason,
            receive_count=item.message.receive_count,
            deferrals=item.message.deferrals,
            duration_ms=round(duration_s * 1000, 1),
            lease_lost=item.lease.lost.is_set(),
            **settled,
        )
