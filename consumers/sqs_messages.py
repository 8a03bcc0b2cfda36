"""SQS wire shapes and the contract's: a received message as a `QueueMessage`, its attributes for resending (and
for a deferred copy), and a queue's RedrivePolicy."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import structlog
from botocore.exceptions import BotoCoreError, ClientError

from consumers.contracts import QueueMessage
from service.aws_failures import AWS_FAILURES, MISSING_QUEUE_CODES, error_code
from service.config import ConfigurationError

if TYPE_CHECKING:
    from types_aiobotocore_sqs import SQSClient
    from types_aiobotocore_sqs.type_defs import MessageAttributeValueTypeDef, MessageTypeDef

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A deferred copy starts at ApproximateReceiveCount 1; this attribute carries the receives its original had used
# before the one that deferred it, so retries still run out (a retry, a deferral, a retry... is not endless).
PRIOR_RECEIVES = "priorReceives"
DEFERRALS = "deferrals"  # how many times the message was deferred before (logged with its end)
RUNTIME_ATTRIBUTES = frozenset({PRIOR_RECEIVES, DEFERRALS})  # the runtime's own: not shown to processors
SYSTEM_ATTRIBUTES = ["ApproximateReceiveCount", "SentTimestamp", "MessageGroupId"]


def _count(message_attributes: Mapping[str, Any], name: str) -> int:
    try:
        return max(0, int(message_attributes.get(name, {}).get("StringValue", "0")))
    except (TypeError, ValueError):
        return 0


def to_queue_message(raw: MessageTypeDef) -> QueueMessage:
    system = raw.get("Attributes", {})
    message_attributes = raw.get("MessageAttributes", {})
    return QueueMessage(
        message_id=raw.get("MessageId", ""),
        receipt_handle=raw.get("ReceiptHandle", ""),
        body=raw.get("Body", ""),
        attributes={
            name: value["StringValue"]
            for name, value in message_attributes.items()
            if "StringValue" in value and name not in RUNTIME_ATTRIBUTES
        },
        receive_count=int(system.get("ApproximateReceiveCount", "1")) + _count(message_attributes, PRIOR_RECEIVES),
        sent_at=int(system.get("SentTimestamp", "0")) / 1000,
        group=system.get("MessageGroupId"),
        deferrals=_count(message_attributes, DEFERRALS),
    )


def resendable_attributes(raw: MessageTypeDef) -> dict[str, MessageAttributeValueTypeDef]:
    """The message attributes as SendMessage accepts them (type and string or binary value)."""
    attributes: dict[str, MessageAttributeValueTypeDef] = {}
    for name, value in raw.get("MessageAttributes", {}).items():
        copy: MessageAttributeValueTypeDef = {"DataType": value["DataType"]}
        if "StringValue" in value:
            copy["StringValue"] = value["StringValue"]
        if "BinaryValue" in value:
            copy["BinaryValue"] = value["BinaryValue"]
        attributes[name] = copy
    return attributes


def deferred_copy_attributes(
    message: QueueMessage, attributes: Mapping[str, MessageAttributeValueTypeDef]
) -> dict[str, MessageAttributeValueTypeDef]:
    """The attributes of `message`'s deferred copy: the same (traceparent included), with the receives that
    counted before this one (the deferring receive itself does not count) and one deferral more."""
    copy = {name: value for name, value in attributes.items() if name not in RUNTIME_ATTRIBUTES}
    prior = message.receive_count - 1
    if prior > 0:
        copy[PRIOR_RECEIVES] = {"DataType": "Number", "StringValue": str(prior)}
    copy[DEFERRALS] = {"DataType": "Number", "StringValue": str(message.deferrals + 1)}
    return copy


@dataclass(frozen=True, slots=True)
class RedrivePolicy:
    """Where SQS moves a message, and after how many receives (None for either: the queue has no policy)."""

    dead_letter_url: str | None = None
    max_receive_count: int | None = None

    def is_last_receive(self, receive_count: int) -> bool:
        """True when a retry now would send the message to the DLQ instead of back to a consumer."""
        return self.max_receive_count is not None and receive_count >= self.max_receive_count


NO_REDRIVE_POLICY = RedrivePolicy()


async def find_redrive_policy(sqs: SQSClient, queue_url: str) -> RedrivePolicy:
    """The queue's RedrivePolicy: its DLQ URL (deadLetterTargetArn) and maxReceiveCount; empty without one."""
    answer = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["RedrivePolicy"])
    policy = answer.get("Attributes", {}).get("RedrivePolicy")
    if not policy:
        return NO_REDRIVE_POLICY
    try:  # a policy that cannot be read is no policy (callers fall back to `<name>-dlq`), never a crash
        parsed = orjson.loads(policy)
        count = parsed.get("maxReceiveCount")
        max_receives = int(count) if count is not None else None
        _, _, _, _, account, name = str(parsed["deadLetterTargetArn"]).split(":", 5)  # arn:aws:sqs:<r>:<acct>:<n>
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return NO_REDRIVE_POLICY
    url = (await sqs.get_queue_url(QueueName=name, QueueOwnerAWSAccountId=account))["QueueUrl"]
    return RedrivePolicy(url, max_receives)


# What a start-up attempt may end in while SQS is not answering (AWS failures are then judged one by one).
NO_ANSWER_YET: tuple[type[Exception], ...] = (*AWS_FAILURES, TimeoutError)


class StartupStopped(Exception):
    """The process was told to stop while it waited for SQS at start-up."""


def sqs_did_not_answer(exc: BaseException) -> bool:
    """No answer from SQS: unreachable, timed out, throttled or failing on its side (worth waiting for), as
    opposed to an answer such as AccessDenied or NonExistentQueue."""
    if isinstance(exc, BotoCoreError):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or "Throttl" in (error_code(exc) or "")
    return False


@dataclass(frozen=True, slots=True)
class StartupRetry:
    """Start-up waits for SQS rather than exit: a call SQS does not answer is retried after a capped,
    doubling delay (no jitter: one process, a few calls), until it answers or `stop` is set."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    base_s: float = 0.5
    cap_s: float = 30.0
    # One attempt's bound: an SQS that hangs would otherwise hold it for the client's read timeout times its
    # attempts (about 100 s) before the first warning says why the worker is not starting.
    attempt_timeout_s: float = 10.0

    async def call(self, what: str, queue: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()` until SQS answers; raises `StartupStopped` as soon as `stop` is set (mid-call included)."""
        delay = self.base_s
        failures = 0
        while True:
            try:
                return await self._unless_stopped(self._bounded(attempt))
            except NO_ANSWER_YET as exc:
                if not isinstance(exc, TimeoutError) and not sqs_did_not_answer(exc):
                    raise
                failures += 1
                log.warning(
                    "sqs_unavailable_at_startup",
                    call=what,
                    queue=queue,
                    failures=failures,
                    code=error_code(exc) or type(exc).__name__,
                    retry_in_s=delay,
                )
            await self._unless_stopped(self.sleep(delay))
            delay = min(self.cap_s, delay * 2)

    async def _bounded(self, attempt: Callable[[], Awaitable[T]]) -> T:
        async with asyncio.timeout(self.attempt_timeout_s):
            return await attempt()

    async def _unless_stopped(self, step: Awaitable[T]) -> T:
        if self.stop.is_set():
            if asyncio.iscoroutine(step):
                step.close()
            raise StartupStopped
        task: asyncio.Future[T] = asyncio.ensure_future(step)
        stopped: asyncio.Future[Any] = asyncio.ensure_future(self.stop.wait())
        either: set[asyncio.Future[Any]] = {task, stopped}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
            raise StartupStopped
        return task.result()


async def read_redrive_policy(
    sqs: SQSClient, queue_url: str, queue: str, retry: StartupRetry | None = None
) -> RedrivePolicy:
    """`find_redrive_policy`, read once when the consumers are built. While SQS does not answer, `retry` waits
    and asks again (without one: as unreadable). Unreadable (an error answer), none: no receive counts as the
    last (the processors keep retrying and SQS's own redrive still applies) and the runtime looks up the DLQ."""
    try:
        if retry is None:
            return await find_redrive_policy(sqs, queue_url)
        return await retry.call("read_redrive_policy", queue, lambda: find_redrive_policy(sqs, queue_url))
    except AWS_FAILURES as exc:
        if error_code(exc) in MISSING_QUEUE_CODES:  # a queue URL that names nothing: the process can never consume
            raise ConfigurationError(f"the {queue} queue does not exist: {queue_url} ({error_code(exc)})") from exc
        log.warning("redrive_policy_unreadable", queue=queue, code=error_code(exc) or type(exc).__name__)
        return NO_REDRIVE_POLICY
