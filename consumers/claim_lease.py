"""What both processors do with a conversation claim while they work: keep it alive, the retry outcome, and
what a retry becomes when the queue allows no further receive (`exhausted`).

On the last receive the queue allows (ApproximateReceiveCount >= the RedrivePolicy's maxReceiveCount), a retry
would only let SQS move the message to the DLQ and leave the conversation `processing` for ever. Instead a
transient failure at a step that has a failed status of its own ends in that status, with a failure_reason that
says retries ran out and what failed last, and the message goes to the DLQ at once (`Outcome.dead_letter`).
`comms dlq redrive` reopens such a conversation (see `service.domain.conversation_claim`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

from consumers.contracts import Disposition, Outcome, QueueMessage
from consumers.sqs_messages import RedrivePolicy
from service.domain.conversation import ConversationStatus
from service.domain.conversation_claim import RETRIES_EXHAUSTED
from service.domain.errors import DependencyUnavailable
from service.domain.provider_ports import TransientProviderError

log = structlog.get_logger(__name__)


@asynccontextmanager
async def kept_alive(refresh: Callable[[], Awaitable[object]], interval_s: float) -> AsyncIterator[None]:
    """Call `refresh` every `interval_s` while the body runs (rare: a slow AI call outliving half the lease)."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await refresh()
            except DependencyUnavailable as exc:
                log.warning("claim_refresh_failed", detail=str(exc))

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()


def failure_detail(exc: Exception) -> str:
    """A provider failure as a failure_reason: `<code>: <reason>`, or the reason alone."""
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    code = getattr(exc, "code", None)
    return f"{code}: {reason}" if code else str(reason)


def transient_retry(step: str, exc: TransientProviderError) -> Outcome:
    """Retry later, after the provider's Retry-After when it gave one."""
    log.warning("transient_failure", step=step, reason=exc.reason)
    delay = math.ceil(exc.retry_after_s) if exc.retry_after_s else None
    return Outcome.retry(f"{step}_transient", delay, detail=failure_detail(exc))


# The failed status a retry ends in once retries are exhausted, by the retry's reason. Other retries (claim lost
# or held, lease lost, final update failing after a send, AWS unavailable) are not the conversation's failure:
# they stay retries, and SQS's redrive dead-letters the message (the conversation stays claimable or is
# finished by whoever holds it).
EXHAUSTED_STATUS: dict[str, ConversationStatus] = {
    "secrets_transient": ConversationStatus.FAILED_SECRETS_FETCH,
    "secrets_permanent": ConversationStatus.FAILED_SECRETS_FETCH,  # replies wait for an operator to fix a secret
    "ai_transient": ConversationStatus.FAILED_TO_PROCESS_AI,
    "reconcile_transient": ConversationStatus.FAILED_TO_SEND_MESSAGE,
    "send_transient": ConversationStatus.FAILED_TO_SEND_MESSAGE,
    "send_outcome_unknown": ConversationStatus.FAILED_TO_SEND_MESSAGE,
}


@dataclass(frozen=True, slots=True)
class Exhausted:
    """A retry on the last allowed receive: the failed status it ends in and the failure_reason to record."""

    status: ConversationStatus
    reason: str

    def outcome(self) -> Outcome:
        return Outcome.dead_letter(RETRIES_EXHAUSTED)


def exhausted(outcome: Outcome, message: QueueMessage, redrive: RedrivePolicy) -> Exhausted | None:
    """What `outcome` becomes when the queue allows no further receive; None when it stays as it is."""
    if outcome.disposition is not Disposition.RETRY or not redrive.is_last_receive(message.receive_count):
        return None
    status = EXHAUSTED_STATUS.get(outcome.reason)
    if status is None:
        return None
    last = f"{outcome.reason} ({outcome.detail})" if outcome.detail else outcome.reason
    reason = f"{RETRIES_EXHAUSTED}: gave up after {message.receive_count} receives; last failure: {last}"
    log.warning("retries_exhausted", status=status.value, reason=reason)
    return Exhausted(status, reason)
