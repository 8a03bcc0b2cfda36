"""SQS batch calls for the consumer runtime: visibility changes, deletes and deferred copies, at most ten entries
per call."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import structlog

from consumers.metrics import ConsumerMetrics
from service.aws_failures import AWS_FAILURES, error_code

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import (
        BatchResultErrorEntryTypeDef,
        ChangeMessageVisibilityBatchRequestEntryTypeDef,
        DeleteMessageBatchRequestEntryTypeDef,
        SendMessageBatchRequestEntryTypeDef,
    )

SQS_BATCH_LIMIT = 10
log = structlog.get_logger(__name__)
T = TypeVar("T")
P = TypeVar("P")  # a pending entry of a timed batch


@dataclass(frozen=True, slots=True)
class EntryFailure:
    """Why SQS did not apply one batch entry. `sender_fault`: the entry itself is wrong (receipt handle invalid or
    expired, timeout out of range) and repeating it cannot help; else SQS or the network failed."""

    code: str
    sender_fault: bool


def chunks(items: Sequence[T]) -> Iterator[tuple[int, Sequence[T]]]:
    """`(offset, slice)` pairs covering `items` in slices of at most ten."""
    for offset in range(0, len(items), SQS_BATCH_LIMIT):
        yield offset, items[offset : offset + SQS_BATCH_LIMIT]


def _failures_by_entry(failed: Sequence[BatchResultErrorEntryTypeDef], offset: int) -> dict[int, EntryFailure]:
    """Failed entries keyed by their position in the call (entry ids are `offset + position`)."""
    return {int(entry["Id"]) - offset: EntryFailure(entry["Code"], entry["SenderFault"]) for entry in failed}


def _call_failure(exc: BaseException) -> EntryFailure:
    return EntryFailure(error_code(exc) or type(exc).__name__, sender_fault=False)


async def change_visibility_batch(
    sqs: SQSClient, queue_url: str, changes: Sequence[tuple[str, int]]
) -> list[EntryFailure | None]:
    """Set each `(receipt_handle, visibility_timeout_s)`; one result per change, in order (None = applied)."""
    results: list[EntryFailure | None] = [None] * len(changes)

    async def send(offset: int, chunk: Sequence[tuple[str, int]]) -> None:
        entries: list[ChangeMessageVisibilityBatchRequestEntryTypeDef] = [
            {"Id": str(offset + i), "ReceiptHandle": receipt, "VisibilityTimeout": timeout}
            for i, (receipt, timeout) in enumerate(chunk)
        ]
        failures: dict[int, EntryFailure]
        try:
            answer = await sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)
            failures = _failures_by_entry(answer.get("Failed", []), offset)
        except AWS_FAILURES as exc:
            failures = dict.fromkeys(range(len(chunk)), _call_failure(exc))
        for i, failure in failures.items():
            results[offset + i] = failure

    await asyncio.gather(*(send(offset, chunk) for offset, chunk in chunks(changes)))
    return results


class _TimedBatches(Generic[P]):
    """Entries wait for their batch: a call goes out at ten entries, or `flush_interval_s` after the first of a
    batch; each call runs as its own task (`_send`, the subclass's)."""

    def __init__(self, queue_name: str, flush_interval_s: float, task_name: str) -> None:
        self._queue_name = queue_name
        self._flush_interval_s = flush_interval_s
        self._task_name = f"{task_name}:{queue_name}"
        self._pending: list[P] = []
        self._timer: asyncio.TimerHandle | None = None
        self._calls: set[asyncio.Task[None]] = set()

    def _add(self, pending: P) -> None:
        self._pending.append(pending)
        if len(self._pending) >= SQS_BATCH_LIMIT:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_interval_s, self.flush)

    def flush(self) -> None:
        """Send everything pending now, in calls of at most ten."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        for _, batch in chunks(pending):
            call = asyncio.create_task(self._send(list(batch)), name=self._task_name)
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _send(self, batch: list[P]) -> None:
        raise NotImplementedError


@dataclass(slots=True)
class _PendingDelete:
    message_id: str
    receipt_handle: str
    deleted: asyncio.Future[bool]


class DeleteBatcher(_TimedBatches[_PendingDelete]):
    """Deletes finished messages with DeleteMessageBatch: ten per call, or fewer after `flush_interval_s`.

    A delete SQS reports as Failed (or a call that fails after botocore's own retries) is logged and
    counted, never retried here: the message comes back and the processor's idempotency handles it.
    """

    def __init__(
        self, sqs: SQSClient, queue_url: str, queue_name: str, metrics: ConsumerMetrics, flush_interval_s: float
    ) -> None:
        super().__init__(queue_name, flush_interval_s, "delete-batch")
        self._sqs = sqs
        self._queue_url = queue_url
        self._metrics = metrics

    async def delete(self, message_id: str, receipt_handle: str) -> bool:
        """Queue one delete and wait for its batch; True when SQS deleted the message."""
        return await self.delete_soon(message_id, receipt_handle)

    def delete_soon(self, message_id: str, receipt_handle: str) -> asyncio.Future[bool]:
        """Queue one delete now; the future says (once its batch answered) whether SQS deleted the message."""
        deleted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._add(_PendingDelete(message_id, receipt_handle, deleted))
        return deleted

    def hurry(self) -> None:
        """Flush now, and from now on send each delete at the next loop turn (with those of the same turn): a
        stopping consumer does not wait out the interval for the deletes of its last finished messages."""
        self._flush_interval_s = 0.0
        self.flush()

    async def close(self) -> None:
        """Flush and wait for every call in progress."""
        self.flush()
        if self._calls:
            await asyncio.wait(set(self._calls))

    async def _send(self, batch: list[_PendingDelete]) -> None:
        entries: list[DeleteMessageBatchRequestEntryTypeDef] = [
            {"Id": str(i), "ReceiptHandle": item.receipt_handle} for i, item in enumerate(batch)
        ]
        failures: dict[int, EntryFailure]
        try:
            answer = await self._sqs.delete_message_batch(QueueUrl=self._queue_url, Entries=entries)
            failures = _failures_by_entry(answer.get("Failed", []), 0)
        except AWS_FAILURES as exc:
            failures = dict.fromkeys(range(len(batch)), _call_failure(exc))
        except BaseException:
            for item in batch:
                if not item.deleted.done():
                    item.deleted.set_result(False)
            raise
        for i, item in enumerate(batch):
            failure = failures.get(i)
            if failure is not None:
                self._metrics.delete_failures.labels(queue=self._queue_name).inc()
                log.warning(
                    "delete_failed",
                    queue=self._queue_name,
                    message_id=item.message_id,
                    code=failure.code,
                    sender_fault=failure.sender_fault,
                )
            if not item.deleted.done():
                item.deleted.set_result(failure is None)


@dataclass(slots=True)
class _PendingSend:
    entry: SendMessageBatchRequestEntryTypeDef
    sent: asyncio.Future[str | None]


class SendBatcher(_TimedBatches[_PendingSend]):
    """Queues messages with SendMessageBatch: ten per call, or fewer after `flush_interval_s` (deferred copies of
    one receive go out together). `send` answers the new message id, or None when SQS did not take it."""

    def __init__(self, sqs: SQSClient, queue_url: str, queue_name: str, flush_interval_s: float) -> None:
        super().__init__(queue_name, flush_interval_s, "send-batch")
        self._sqs = sqs
        self._queue_url = queue_url

    async def send(self, entry: SendMessageBatchRequestEntryTypeDef) -> str | None:
        sent: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._add(_PendingSend(entry, sent))
        return await sent

    async def _send(self, batch: list[_PendingSend]) -> None:
        entries = [{**item.entry, "Id": str(i)} for i, item in enumerate(batch)]
        ids: dict[int, str] = {}
        try:
            answer = await self._sqs.send_message_batch(QueueUrl=self._queue_url, Entries=entries)  # type: ignore[arg-type]
            ids = {int(ok["Id"]): ok["MessageId"] for ok in answer.get("Successful", [])}
            for failed in answer.get("Failed", []):
                code, sender_fault = failed["Code"], failed["SenderFault"]
                log.warning("send_failed", queue=self._queue_name, code=code, sender_fault=sender_fault)
        except AWS_FAILURES as exc:
            log.warning("send_batch_failed", queue=self._queue_name, code=error_code(exc) or type(exc).__name__)
        finally:
            for i, item in enumerate(batch):
                if not item.sent.done():
                    item.sent.set_result(ids.get(i))
