"""The skeleton both senders share (SPEC §6, §7): claim the conversation, keep the claim alive, write with the AI,
record the attempt, send once under protection, final update with retries, release the claim on a retry or a
cancellation. `TemplateSender` and `ReplySender` supply only their own steps (the hooks of `ClaimedWork`).

Retries exhausted: on the last receive the queue allows (ApproximateReceiveCount >= the RedrivePolicy's
maxReceiveCount) a retry would only let SQS move the message to the DLQ and leave the claim to lapse. Instead a
transient failure at a step that has a failed status of its own ends in that status (`Failure.exhausted`, a reason
saying retries ran out and what failed last) and the message goes to the DLQ at once; the store's `fail` says what
that means for each sender, and `comms dlq redrive` sends the message again.

Not now is not a failure: a send pace or an AI key's pace with no turn within the wait a slot may spend
(`ProviderPaced`), or a project at its `concurrent_conversations` cap (`ConcurrencyCap`), ends in a deferral
(`Outcome.defer`): the runtime re-queues a copy with a delay, so the wait burns no receive. The cap's in-flight
lease is taken before the claim when the job names its project (`tenant`), else right after the claim; it is
refreshed with the claim and released however the message ends.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, Self, TypeVar

import structlog
from structlog.contextvars import bound_contextvars

from consumers.contracts import Disposition, Lease, Outcome, QueueMessage
from consumers.metrics import ConsumerMetrics
from consumers.sqs_messages import RedrivePolicy
from service.domain.claims import RETRIES_EXHAUSTED
from service.domain.concurrency_cap import ConcurrencyCap, Slot
from service.domain.conversation import ConversationKey, ConversationRecord, ConversationStatus, Failure, Message
from service.domain.errors import DependencyUnavailable
from service.domain.pacing import SendPacing
from service.domain.ports import AiWriter, ClaimedWorkStore, MessageSender, SecretStore
from service.domain.provider_ports import (
    AiRequest,
    AiResult,
    OutboundMessage,
    PermanentProviderError,
    ProviderPaced,
    ProviderRateLimited,
    SendOutcomeUnknown,
    SentMessage,
    TransientProviderError,
)

log = structlog.get_logger(__name__)

RECONCILE_LOOKBACK_S = 120  # an attempt's send may be stamped a little before its attempted_at (clock skew)
MIN_REFRESH_MARGIN_S = 5.0  # a claim is refreshed once less than this (or an eighth of the lease) is left


def refresh_margin_s(lease_s: float) -> float:
    """How much of a claim's lease may be left when the keep-alive refreshes it: enough for a slow DynamoDB answer
    (and a retry), at most half the lease. Work shorter than lease - margin (most: an AI call of up to ~40 s under
    the default 48 s lease, issue 13's growth run) costs no refresh at all."""
    return min(lease_s / 2, max(MIN_REFRESH_MARGIN_S, lease_s / 8))


# ---- what a retry becomes ------------------------------------------------------------------------

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


def failure_detail(exc: Exception) -> str:
    """A provider failure as a failure_reason: `<code>: <reason>`, or the reason alone."""
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    code = getattr(exc, "code", None)
    return f"{code}: {reason}" if code else str(reason)


def transient_retry(step: str, exc: TransientProviderError) -> Outcome:
    """Retry later, after the provider's Retry-After when it gave one; a pace's "not yet" (`ProviderPaced`) is
    deferred instead (`<step>_paced`): it was not attempted, so it must not cost a receive."""
    if isinstance(exc, ProviderPaced):
        log.info("provider_paced", step=step, retry_after_s=exc.retry_after_s)
        return Outcome.defer(f"{step}_paced", math.ceil(exc.retry_after_s or 1))
    log.warning("transient_failure", step=step, reason=exc.reason)
    delay = math.ceil(exc.retry_after_s) if exc.retry_after_s else None
    return Outcome.retry(f"{step}_transient", delay, detail=failure_detail(exc))


def exhausted(outcome: Outcome, message: QueueMessage, redrive: RedrivePolicy) -> Failure | None:
    """The failure `outcome` ends in when the queue allows no further receive; None when it stays as it is."""
    if outcome.disposition is not Disposition.RETRY or not redrive.is_last_receive(message.receive_count):
        return None
    status = EXHAUSTED_STATUS.get(outcome.reason)
    if status is None:
        return None
    last = f"{outcome.reason} ({outcome.detail})" if outcome.detail else outcome.reason
    reason = f"{RETRIES_EXHAUSTED}: gave up after {message.receive_count} receives; last failure: {last}"
    log.warning("retries_exhausted", status=status.value, reason=reason)
    return Failure(status, reason, exhausted=True)


# ---- the skeleton --------------------------------------------------------------------------------


class Job(Protocol):
    """A parsed queue message: it names the conversation to claim."""

    @property
    def key(self) -> ConversationKey: ...


class Draft(Protocol):
    """A ledger entry (`TemplateDraft`, `ReplyAttempt`): what is about to be sent, written before sending."""

    @property
    def thread_id(self) -> str: ...
    @property
    def attempted_at(self) -> float: ...
    def attempted_again(self, at: float) -> Self: ...


class WorkConfig(Protocol):
    """What the skeleton reads of a sender's config."""

    @property
    def queue(self) -> str: ...  # metric/log label
    @property
    def claim_lease_s(self) -> float: ...  # below the queue visibility timeout, so a crashed claim expires first
    @property
    def ai_timeout_s(self) -> float: ...
    @property
    def final_update_attempts(self) -> int: ...
    @property
    def redrive(self) -> RedrivePolicy: ...  # the queue's: which receive is the last (none known: never)


class WorkPorts(Protocol):
    """What the skeleton uses of a sender's ports (`TemplatePorts`, `ReplyPorts`)."""

    @property
    def claims(self) -> ClaimedWorkStore[Any]: ...  # the store of the subclass's DraftT
    @property
    def secrets(self) -> SecretStore: ...
    @property
    def ai(self) -> AiWriter: ...
    @property
    def senders(self) -> Mapping[str, MessageSender]: ...


JobT = TypeVar("JobT", bound=Job)
DraftT = TypeVar("DraftT", bound=Draft)
ConfigT = TypeVar("ConfigT", bound=WorkConfig)
PortsT = TypeVar("PortsT", bound=WorkPorts)
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Claimed(Generic[JobT]):
    """One conversation this process holds while it works on a message."""

    job: JobT
    owner: str
    record: ConversationRecord  # as claimed
    lease: Lease
    started: float  # time.monotonic() when the message arrived

    @property
    def key(self) -> ConversationKey:
        return self.job.key

    @property
    def elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)


@dataclass(slots=True)
class CapHold:
    """The project's in-flight lease one message holds (none: uncapped, not taken yet, or failed open)."""

    slot: Slot | None = None
    checked: bool = False  # the cap was looked at (before the claim): not again after it
    wait_s: int = 0  # refused: when to come back (the project's next slot in the cap's backlog)


@dataclass(frozen=True, slots=True)
class Prompt(Generic[DraftT]):
    """What the AI is asked to write, and how its answer becomes the ledger entry: `draft(result)` (which keeps
    `result.thread_id`, the continuation the final update stores)."""

    api_key_reference: str | None  # the secret holding `ai_api_key`
    model: str
    instructions: str
    input_text: str
    output_keys: tuple[str, ...]
    background: bool
    draft: Callable[[AiResult], DraftT]
    metadata: dict[str, str] = field(default_factory=dict)
    thread_id: str | None = None  # the conversation's stored continuation; None starts a new one
    history: tuple[Message, ...] = ()  # the conversation as recorded, for a continuation OpenAI no longer holds
    requests_per_second: float | None = None  # the project's AI pace for this key (None: the default)


class ClaimedWork(ABC, Generic[JobT, DraftT, ConfigT, PortsT]):
    """`process` for a message that names a conversation; subclasses supply the steps below `# ---- hooks`."""

    def __init__(
        self,
        config: ConfigT,
        ports: PortsT,
        metrics: ConsumerMetrics,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,  # the final update's backoff
        pacing: SendPacing | None = None,  # per-sender pace across the fleet (None: send as slots allow)
        cap: ConcurrencyCap | None = None,  # per-project concurrent_conversations across the fleet (None: none)
        monotonic: Callable[[], float] = time.monotonic,  # the keep-alive's clock
        keep_alive_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,  # ... and its waits
    ) -> None:
        self._monotonic = monotonic
        self._keep_alive_sleep = keep_alive_sleep
        self._config = config
        self._pacing = pacing
        self._cap = cap
        self._ports = ports
        self._claims: ClaimedWorkStore[DraftT] = ports.claims
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep

    # ---- hooks -----------------------------------------------------------------------------------

    @abstractmethod
    async def parse(self, message: QueueMessage) -> JobT | Outcome:
        """The job, or the outcome of a message that cannot be one."""

    def log_context(self, job: JobT) -> dict[str, str]:
        """Bound to every log line of the message, besides conversation_id."""
        return {}

    def tenant(self, job: JobT) -> tuple[str, str] | None:
        """(company_id, project_id) when the job names them: the cap's lease is then taken before the claim
        (a refused message costs no claim); None: right after the claim, from the claimed record."""
        return None

    @abstractmethod
    async def claim(self, job: JobT, owner: str, message: QueueMessage) -> ConversationRecord | Outcome:
        """Claim the conversation for `owner` until now + claim_lease_s: the record as claimed, or the outcome."""

    @abstractmethod
    async def work(self, claimed: Claimed[JobT]) -> Outcome:
        """The steps on the claimed conversation; most end in `deliver`."""

    @abstractmethod
    def outbound(self, claimed: Claimed[JobT], credentials: dict[str, str], draft: DraftT) -> OutboundMessage:
        """The message that sends `draft`."""

    @abstractmethod
    async def finalise(self, claimed: Claimed[JobT], draft: DraftT, sent: SentMessage) -> Outcome:
        """Record the send (through `final_update`) and what follows it."""

    async def credentials_unusable(self, claimed: Claimed[JobT], exc: PermanentProviderError) -> Outcome:
        return await self.fail(claimed, ConversationStatus.FAILED_SECRETS_FETCH, exc)

    async def after_fail(self, claimed: Claimed[JobT]) -> None:
        """What follows a recorded failure (permanent, or retries exhausted)."""

    # ---- the message -----------------------------------------------------------------------------

    async def process(self, message: QueueMessage, lease: Lease) -> Outcome:
        started = time.monotonic()
        job = await self.parse(message)
        if isinstance(job, Outcome):
            return job
        owner = f"{message.message_id}/{uuid.uuid4().hex[:12]}"
        hold = CapHold()
        with bound_contextvars(conversation_id=job.key.conversation_id, **self.log_context(job)):
            try:
                tenant = self.tenant(job)
                if tenant is not None and not await self._admitted(hold, *tenant):
                    return self._capped(hold)
                return await self._claimed(job, owner, message, lease, started, hold)
            except DependencyUnavailable as exc:
                log.warning("dependency_unavailable", detail=str(exc))
                return Outcome.retry(f"{exc.service}_unavailable")
            finally:
                if hold.slot is not None and self._cap is not None:  # done, retry, defer, dead letter or cancelled
                    await asyncio.shield(self._cap.leave(hold.slot))

    async def _admitted(self, hold: CapHold, company_id: str, project_id: str) -> bool:
        """Under the project's cap (holding a lease in `hold` when it has one), or no cap to keep."""
        if self._cap is None or hold.checked:
            return True
        hold.checked = True
        admission = await self._cap.enter(company_id, project_id)
        hold.slot, hold.wait_s = admission.slot, admission.wait_s
        return admission.admitted

    @staticmethod
    def _capped(hold: CapHold) -> Outcome:
        return Outcome.defer("concurrency_capped", hold.wait_s)

    async def _claimed(
        self, job: JobT, owner: str, message: QueueMessage, lease: Lease, started: float, hold: CapHold
    ) -> Outcome:
        # No later than the claim's lease starts (the cap's, when taken before the claim, a call earlier: the margin
        # covers that).
        claiming_at = self._monotonic()
        record = await self.claim(job, owner, message)
        if isinstance(record, Outcome):
            return record
        claimed = Claimed(job, owner, record, lease, started)
        if not await self._admitted(hold, record.company_id, record.project_id):
            await self._release(claimed)
            return self._capped(hold)
        try:
            async with self._kept_alive(claimed, hold, claiming_at):
                outcome = await self.work(claimed)
        except DependencyUnavailable as exc:  # a retry like any other: the claim is released below
            log.warning("dependency_unavailable", detail=str(exc))
            outcome = Outcome.retry(f"{exc.service}_unavailable")
        except asyncio.CancelledError:  # stopped (shutdown, lost lease): the message comes back, so must the claim
            await asyncio.shield(self._release(claimed))
            raise
        if outcome.disposition is Disposition.RETRY:
            failure = exhausted(outcome, message, self._config.redrive)
            if failure is not None and await self._give_up(claimed, failure):
                return Outcome.dead_letter(RETRIES_EXHAUSTED)
            await self._release(claimed)
        elif outcome.disposition is Disposition.DEFER:
            await self._release(claimed)
        return outcome

    @asynccontextmanager
    async def _kept_alive(self, claimed: Claimed[JobT], hold: CapHold, claimed_at: float) -> AsyncIterator[None]:
        """Refresh the claim (and the cap's in-flight lease) while the body runs, each time less than the margin of
        its lease is left (rare: an AI call outliving most of the lease). A failed refresh is tried again at
        once-a-quarter-margin until it lands or the lease lapses, so the claim never lapses while work runs
        unless DynamoDB stays unreachable for the whole margin."""
        lease_s = self._config.claim_lease_s
        margin_s = refresh_margin_s(lease_s)

        async def keep() -> None:
            expires = claimed_at + lease_s  # monotonic, conservative: taken before the claim was written
            while True:
                await self._keep_alive_sleep(max(0.0, expires - margin_s - self._monotonic()))
                refreshing_at = self._monotonic()
                try:
                    await self._claims.refresh(claimed.key, claimed.owner, self._clock() + lease_s)
                    expires = refreshing_at + lease_s
                except DependencyUnavailable as exc:
                    log.warning("claim_refresh_failed", detail=str(exc))
                    await self._keep_alive_sleep(margin_s / 4)
                    continue
                if hold.slot is not None and self._cap is not None:
                    await self._cap.refresh(hold.slot)

        task = asyncio.create_task(keep())
        try:
            yield
        finally:
            task.cancel()

    async def _release(self, claimed: Claimed[JobT]) -> None:
        """Let the retry find the conversation claimable: a claim left to lapse turns the redelivery into a held
        claim's receive, which the queue's redrive counts like a real attempt."""
        try:
            await self._claims.release(claimed.key, claimed.owner)
        except DependencyUnavailable as exc:
            log.warning("claim_release_failed", detail=str(exc))

    async def _give_up(self, claimed: Claimed[JobT], failure: Failure) -> bool:
        """Record the exhausted retries (the ledger kept); False if the claim was lost or DynamoDB failed (then the
        retry stands and SQS's redrive moves the message; the conversation stays claimable)."""
        try:
            given_up = await self._claims.fail(claimed.key, claimed.owner, failure)
        except DependencyUnavailable as exc:
            log.warning("exhausted_not_recorded", detail=str(exc))
            return False
        if given_up:
            await self.after_fail(claimed)
        return given_up

    # ---- steps for the hooks ---------------------------------------------------------------------

    def step(self, name: str) -> AbstractContextManager[None]:
        """A step's duration metric: claim | gather | secrets | ai | reconcile | send | final_update."""
        return self._metrics.step(self._config.queue, name)

    async def fail(self, claimed: Claimed[JobT], status: ConversationStatus, exc: Exception) -> Outcome:
        """End the conversation's work in `status` for good (a KeyError: the AI secret has no ai_api_key)."""
        if isinstance(exc, KeyError):
            exc = PermanentProviderError("ai_api_key_missing")
        reason = failure_detail(exc)
        log.warning("conversation_failed", status=status.value, reason=reason)
        await self._claims.fail(claimed.key, claimed.owner, Failure(status, reason))
        await self.after_fail(claimed)
        return Outcome.done(status.value)

    async def deliver(
        self,
        claimed: Claimed[JobT],
        credentials_id: str | None,
        pending: DraftT | Prompt[DraftT],
        *,
        reconcile: bool,
        unsent: Callable[[], Awaitable[Outcome]] | None = None,
    ) -> Outcome:
        """Credentials, then: a prompt is written and sent; a stored draft is sent, after asking the provider
        whether an earlier attempt already sent it when `reconcile` (and, given `unsent`, a draft the provider has
        no record of is not sent: `unsent()` says what happens instead)."""
        try:
            credentials = await self._secret(credentials_id)
        except PermanentProviderError as exc:
            return await self.credentials_unusable(claimed, exc)
        except TransientProviderError as exc:
            return transient_retry("secrets", exc)
        if isinstance(pending, Prompt):
            draft = await self._write(claimed, pending)
            if isinstance(draft, Outcome):
                return draft
            return await self._send(claimed, self.outbound(claimed, credentials, draft), draft)
        outbound = self.outbound(claimed, credentials, pending)
        if reconcile:
            found = await self._reconcile(claimed, outbound, pending)
            if isinstance(found, Outcome):
                return found
            if found is not None:
                return await self.finalise(claimed, pending, found)
            if unsent is not None:
                return await unsent()
            # Never sent: a new attempt, so a later reconcile looks back from it, not from a first one days ago.
            pending = pending.attempted_again(self._clock())
        return await self._send(claimed, outbound, pending)

    async def final_update(
        self, claimed: Claimed[JobT], sent: SentMessage, write: Callable[[int], Awaitable[R]], **repair: object
    ) -> R | Outcome:
        """`write(processing_time_ms)` after a send, retried; still failing: a CRITICAL log with `repair` (how to fix
        the record by hand; a redelivery reconciles with the provider and repairs it by itself) and the metric."""
        processing_ms = claimed.elapsed_ms
        for attempt in range(1, self._config.final_update_attempts + 1):
            try:
                with self.step("final_update"):
                    return await write(processing_ms)
            except DependencyUnavailable as exc:
                log.warning("final_update_retry", attempt=attempt, detail=str(exc))
                if attempt < self._config.final_update_attempts:
                    await self._sleep(min(2.0, 0.2 * 2**attempt))
        self._metrics.final_update_failures.labels(queue=self._config.queue).inc()
        log.critical(
            "final_update_failed_after_send",
            primary_channel=claimed.key.primary_channel,
            conversation_id=claimed.key.conversation_id,
            provider_message_id=sent.provider_message_id,
            processing_time_ms=processing_ms,
            **repair,
        )
        return Outcome.retry("final_update_failed")

    # ---- the common steps ------------------------------------------------------------------------

    async def _secret(self, secret_id: str | None) -> dict[str, str]:
        if not secret_id:
            raise PermanentProviderError("secret_id_missing")
        with self.step("secrets"):
            return await self._ports.secrets.get_json(secret_id)

    async def _write(self, claimed: Claimed[JobT], prompt: Prompt[DraftT]) -> DraftT | Outcome:
        try:
            api_key = (await self._secret(prompt.api_key_reference))["ai_api_key"]
        except (PermanentProviderError, KeyError) as exc:
            return await self.fail(claimed, ConversationStatus.FAILED_SECRETS_FETCH, exc)
        except TransientProviderError as exc:
            return transient_retry("secrets", exc)
        try:
            with self.step("ai"):
                result = await self._ports.ai.write(
                    AiRequest(
                        api_key=api_key,
                        model=prompt.model,
                        instructions=prompt.instructions,
                        input_text=prompt.input_text,
                        output_keys=prompt.output_keys,
                        thread_id=prompt.thread_id,
                        history=prompt.history,
                        background=prompt.background,
                        timeout_s=self._config.ai_timeout_s,
                        metadata={"conversation_id": claimed.key.conversation_id[:512], **prompt.metadata},
                        requests_per_second=prompt.requests_per_second,
                    )
                )
        except PermanentProviderError as exc:
            return await self.fail(claimed, ConversationStatus.FAILED_TO_PROCESS_AI, exc)
        except TransientProviderError as exc:
            return transient_retry("ai", exc)
        return prompt.draft(result)

    async def _reconcile(
        self, claimed: Claimed[JobT], outbound: OutboundMessage, draft: DraftT
    ) -> SentMessage | Outcome | None:
        """An earlier attempt may have sent: ask the provider before sending anything."""
        try:
            with self.step("reconcile"):
                found = await self._ports.senders[outbound.channel].find_sent(
                    outbound, draft.attempted_at - RECONCILE_LOOKBACK_S
                )
        except PermanentProviderError as exc:
            log.error("send_outcome_unknown_needs_review", reason=exc.reason)
            failure = PermanentProviderError(f"send_outcome_unknown_needs_review: {exc.reason}")
            return await self.fail(claimed, ConversationStatus.FAILED_TO_SEND_MESSAGE, failure)
        except TransientProviderError as exc:
            return transient_retry("reconcile", exc)
        log.info("send_reconciled", found=found is not None)
        return found

    async def _send(self, claimed: Claimed[JobT], outbound: OutboundMessage, draft: DraftT) -> Outcome:
        if claimed.lease.lost.is_set():
            return Outcome.retry("lease_lost")
        if self._pacing is not None and (wait := await self._pacing.wait_turn(outbound)):
            return Outcome.defer("paced", math.ceil(wait))  # this sender's queue of sends is too long to wait in
        with claimed.lease.protected():  # from the ledger entry on, the runtime never cancels this task
            if not await self._claims.record_attempt(claimed.key, claimed.owner, draft):
                return Outcome.retry("claim_lost", 1)
            try:
                with self.step("send"):
                    sent = await self._ports.senders[outbound.channel].send(outbound)
            except PermanentProviderError as exc:
                return await self.fail(claimed, ConversationStatus.FAILED_TO_SEND_MESSAGE, exc)
            except SendOutcomeUnknown as exc:
                log.warning("send_outcome_unknown", reason=exc.reason)
                return Outcome.retry("send_outcome_unknown", detail=failure_detail(exc))
            except TransientProviderError as exc:
                await self._claims.clear_attempt(claimed.key, claimed.owner)
                if isinstance(exc, ProviderRateLimited) and self._pacing is not None:
                    await self._pacing.rate_limited(outbound, exc.retry_after_s)
                return transient_retry("send", exc)
            return await self.finalise(claimed, draft, sent)
