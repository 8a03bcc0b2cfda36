"""The template sender: one channel-queue message becomes one AI-written first message, sent once.

Steps (SPEC §6): parse, claim, secrets, AI, record the attempt, send, final update.
Every step's failure maps to an `Outcome`; the send ledger makes redeliveries safe. A transient failure on the
last receive the queue allows ends the conversation in its failed_* status, reopenable by `comms dlq redrive`
(`consumers.claim_lease.exhausted`).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any

import orjson
import structlog

from consumers.claim_lease import Exhausted, exhausted, failure_detail, kept_alive, transient_retry
from consumers.contracts import Disposition, Lease, Outcome, QueueMessage
from consumers.metrics import ConsumerMetrics
from consumers.sqs_messages import NO_REDRIVE_POLICY, RedrivePolicy
from consumers.template_job import InvalidContext, TemplateJob, initial_record, parse_template_job
from service.adapters.aws.conversation_store import DynamoConversationStore
from service.domain.conversation import ConversationKey, ConversationStatus
from service.domain.conversation_claim import ClaimVerdict, ConversationSnapshot, NextStep, next_step
from service.domain.errors import DependencyUnavailable
from service.domain.provider_ports import (
    AiRequest,
    AiWriter,
    MessageSender,
    OutboundMessage,
    PermanentProviderError,
    SecretStore,
    SendOutcomeUnknown,
    SentMessage,
    TransientProviderError,
)
from service.domain.timefmt import utc_iso

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TemplateSenderConfig:
    queue: str  # metric/log label: whatsapp | sms | email
    processor_version: str
    claim_lease_s: float  # below the queue visibility timeout, so a crashed claim expires first
    ai_timeout_s: float
    status_callback_url: str | None
    final_update_attempts: int = 3
    redrive: RedrivePolicy = NO_REDRIVE_POLICY  # the queue's: which receive is the last (none known: never)


@dataclass(frozen=True, slots=True)
class Generated:
    thread_id: str
    output: dict[str, str]
    usage: dict[str, int]


class TemplateSender:
    def __init__(
        self,
        config: TemplateSenderConfig,
        store: DynamoConversationStore,
        secrets: SecretStore,
        ai: AiWriter,
        senders: Mapping[str, MessageSender],
        metrics: ConsumerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._store = store
        self._secrets = secrets
        self._ai = ai
        self._senders = senders
        self._metrics = metrics
        self._clock = clock

    async def process(self, message: QueueMessage, lease: Lease) -> Outcome:
        started = time.monotonic()
        try:
            job = parse_template_job(message.body)
        except InvalidContext as exc:
            return await self._reject(exc, message)
        key = ConversationKey(job.recipient, job.conversation_id)
        owner = f"{message.message_id}/{uuid.uuid4().hex[:12]}"
        structlog.contextvars.bind_contextvars(conversation_id=job.conversation_id, trace_id=job.trace_id)
        try:
            return await self._claimed_work(job, key, owner, message, lease, started)
        except DependencyUnavailable as exc:
            log.warning("dependency_unavailable", detail=str(exc))
            return Outcome.retry(f"{exc.service}_unavailable")
        finally:
            structlog.contextvars.unbind_contextvars("conversation_id", "trace_id")

    # ---- steps -----------------------------------------------------------------------------------

    async def _reject(self, exc: InvalidContext, message: QueueMessage) -> Outcome:
        log.error("invalid_context", reason=exc.reason, message_id=message.message_id)
        if exc.primary_channel and exc.conversation_id:
            key = ConversationKey(exc.primary_channel, exc.conversation_id)
            try:
                await self._store.record_invalid(key, {}, exc.reason, self._stamp())
            except DependencyUnavailable as failure:
                log.warning("invalid_context_not_recorded", detail=str(failure))
        return Outcome.dead_letter(f"invalid_context:{exc.reason.split(':')[0]}")

    async def _claimed_work(
        self, job: TemplateJob, key: ConversationKey, owner: str, message: QueueMessage, lease: Lease, started: float
    ) -> Outcome:
        now = self._clock()
        with self._metrics.step(self._config.queue, "claim"):
            claim = await self._store.claim(
                key,
                initial_record(job, processor_version=self._config.processor_version, stamp=self._stamp()),
                owner,
                now + self._config.claim_lease_s,
                now,
                self._stamp(),
            )
        if claim.verdict is ClaimVerdict.ALREADY_DONE:
            log.info("conversation_already_done", status=claim.snapshot.status)
            return Outcome.done("already_done")
        if claim.verdict is ClaimVerdict.HELD_ELSEWHERE:
            wait = max(1, math.ceil(claim.snapshot.claim_expires_at - now))
            return Outcome.retry("claim_held_elsewhere", wait)
        if claim.verdict is ClaimVerdict.CLAIMED and claim.snapshot.claim_owner != owner:
            return Outcome.retry("claim_raced", 1)
        try:
            async with self._keep_claim(key, owner):
                outcome = await self._work(job, key, owner, claim.snapshot, message, lease, started)
        except asyncio.CancelledError:  # stopped (shutdown, lost lease): the message comes back, so must the claim
            await asyncio.shield(self._release_claim(key, owner))
            raise
        if outcome.disposition is Disposition.RETRY:
            exhaustion = exhausted(outcome, message, self._config.redrive)
            if exhaustion is not None and await self._give_up(key, owner, exhaustion):
                return exhaustion.outcome()
            await self._release_claim(key, owner)
        return outcome

    async def _work(
        self,
        job: TemplateJob,
        key: ConversationKey,
        owner: str,
        snapshot: ConversationSnapshot,
        message: QueueMessage,
        lease: Lease,
        started: float,
    ) -> Outcome:
        step = next_step(snapshot)
        if step is NextStep.FINALISE and snapshot.provider_message_id:
            generated = self._stored_generation(snapshot)
            return await self._finalise(job, key, SentMessage(snapshot.provider_message_id), generated, started)
        try:
            with self._metrics.step(self._config.queue, "secrets"):
                credentials = await self._secrets.get_json(job.credentials_id)
        except PermanentProviderError as exc:
            return await self._fail(key, owner, ConversationStatus.FAILED_SECRETS_FETCH, exc)
        except TransientProviderError as exc:
            return transient_retry("secrets", exc)
        outbound_template = self._outbound(job, credentials)
        if step is NextStep.RECONCILE:
            found = await self._reconcile(job, key, owner, snapshot, outbound_template)
            if isinstance(found, Outcome):
                return found
            if found is not None:
                return await self._finalise(job, key, found, self._stored_generation(snapshot), started)
        if step is NextStep.GENERATE:
            generated_or_outcome = await self._generate(job, key, owner, snapshot)
            if isinstance(generated_or_outcome, Outcome):
                return generated_or_outcome
            generated = generated_or_outcome
        else:
            generated = self._stored_generation(snapshot)
        return await self._send(job, key, owner, generated, outbound_template, lease, started)

    async def _generate(
        self, job: TemplateJob, key: ConversationKey, owner: str, snapshot: ConversationSnapshot
    ) -> Generated | Outcome:
        try:
            with self._metrics.step(self._config.queue, "secrets"):
                ai_secret = await self._secrets.get_json(job.ai.api_key_reference)
            api_key = ai_secret["ai_api_key"]
        except (PermanentProviderError, KeyError) as exc:
            failure = exc if isinstance(exc, PermanentProviderError) else PermanentProviderError("ai_api_key_missing")
            return await self._fail(key, owner, ConversationStatus.FAILED_SECRETS_FETCH, failure)
        except TransientProviderError as exc:
            return transient_retry("secrets", exc)
        try:
            with self._metrics.step(self._config.queue, "ai"):
                thread_id = snapshot.thread_id or await self._ai.start_thread(
                    api_key, {"conversation_id": job.conversation_id[:512]}
                )
                result = await self._ai.write(
                    AiRequest(
                        api_key=api_key,
                        model=job.ai.model,
                        instructions=job.ai.instructions,
                        input_text=self._ai_input(job),
                        output_keys=job.ai.output_keys,
                        thread_id=thread_id,
                        background=job.ai.background,
                        timeout_s=self._config.ai_timeout_s,
                        metadata={"request_id": job.request_id},
                    )
                )
        except PermanentProviderError as exc:
            return await self._fail(key, owner, ConversationStatus.FAILED_TO_PROCESS_AI, exc)
        except TransientProviderError as exc:
            return transient_retry("ai", exc)
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.total_tokens,
        }
        return Generated(thread_id, result.output, usage)

    async def _reconcile(
        self,
        job: TemplateJob,
        key: ConversationKey,
        owner: str,
        snapshot: ConversationSnapshot,
        outbound: OutboundMessage,
    ) -> SentMessage | Outcome | None:
        """An earlier attempt may have sent: ask the provider before sending anything."""
        since = (snapshot.send_attempted_at or self._clock()) - 120
        try:
            with self._metrics.step(self._config.queue, "reconcile"):
                found = await self._senders[job.channel].find_sent(outbound, since)
        except PermanentProviderError as exc:
            log.error("send_outcome_unknown_needs_review", reason=exc.reason)
            reason = PermanentProviderError(f"send_outcome_unknown_needs_review: {exc.reason}")
            return await self._fail(key, owner, ConversationStatus.FAILED_TO_SEND_MESSAGE, reason)
        except TransientProviderError as exc:
            return transient_retry("reconcile", exc)
        log.info("send_reconciled", found=found is not None)
        return found

    async def _send(
        self,
        job: TemplateJob,
        key: ConversationKey,
        owner: str,
        generated: Generated,
        outbound_template: OutboundMessage,
        lease: Lease,
        started: float,
    ) -> Outcome:
        if lease.lost.is_set():
            return Outcome.retry("lease_lost")
        outbound = self._with_content(job, outbound_template, generated.output)
        with lease.protected():  # from the ledger entry on, the runtime never cancels this task
            recorded = await self._store.record_attempt(
                key,
                owner,
                thread_id=generated.thread_id,
                generated=generated.output,
                usage=generated.usage,
                attempted_at=self._clock(),
                stamp=self._stamp(),
            )
            if not recorded:
                return Outcome.retry("claim_lost", 1)
            try:
                with self._metrics.step(self._config.queue, "send"):
                    sent = await self._senders[job.channel].send(outbound)
            except PermanentProviderError as exc:
                return await self._fail(key, owner, ConversationStatus.FAILED_TO_SEND_MESSAGE, exc)
            except SendOutcomeUnknown as exc:
                log.warning("send_outcome_unknown", reason=exc.reason)
                return Outcome.retry("send_outcome_unknown", detail=failure_detail(exc))
            except TransientProviderError as exc:
                await self._store.clear_attempt(key, owner, self._stamp())
                return transient_retry("send", exc)
            return await self._finalise(job, key, sent, generated, started)

    async def _finalise(
        self, job: TemplateJob, key: ConversationKey, sent: SentMessage, generated: Generated, started: float
    ) -> Outcome:
        entry = {
            "message_id": sent.provider_message_id,
            "timestamp": self._stamp(),
            "role": "assistant",
            "content": self._content_text(job.channel, generated.output),
            **generated.usage,
        }
        processing_ms = int((time.monotonic() - started) * 1000)
        for attempt in range(1, self._config.final_update_attempts + 1):
            try:
                with self._metrics.step(self._config.queue, "final_update"):
                    applied = await self._store.finalise(
                        key,
                        message=entry,
                        provider_message_id=sent.provider_message_id,
                        thread_id=generated.thread_id,
                        processing_time_ms=processing_ms,
                        stamp=self._stamp(),
                    )
                return Outcome.done("sent" if applied else "already_finalised")
            except DependencyUnavailable as exc:
                log.warning("final_update_retry", attempt=attempt, detail=str(exc))
                await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
        self._metrics.final_update_failures.labels(queue=self._config.queue).inc()
        log.critical(
            "final_update_failed_after_send",
            primary_channel=key.primary_channel,
            conversation_id=key.conversation_id,
            provider_message_id=sent.provider_message_id,
            thread_id=generated.thread_id,
            message=entry,
            processing_time_ms=processing_ms,
            repair="set conversation_status=initial_message_sent, send_state=sent, provider_message_id, "
            "append message; a redelivery reconciles with the provider and repairs this automatically",
        )
        return Outcome.retry("final_update_failed")

    # ---- helpers ---------------------------------------------------------------------------------

    async def _fail(self, key: ConversationKey, owner: str, status: ConversationStatus, exc: Exception) -> Outcome:
        detail = failure_detail(exc)
        log.warning("conversation_failed", status=status.value, reason=detail)
        await self._store.mark_failed(key, owner, status, detail, self._stamp())
        return Outcome.done(status.value)

    async def _give_up(self, key: ConversationKey, owner: str, exhaustion: Exhausted) -> bool:
        """Record the exhausted retries (ledger kept); False if the claim was lost or DynamoDB failed (then the
        retry stands and SQS's redrive moves the message; the conversation stays claimable)."""
        try:
            return await self._store.mark_exhausted(key, owner, exhaustion.status, exhaustion.reason, self._stamp())
        except DependencyUnavailable as exc:
            log.warning("exhausted_not_recorded", detail=str(exc))
            return False

    async def _release_claim(self, key: ConversationKey, owner: str) -> None:
        """Let the retry find the conversation claimable: a claim left to lapse turns the redelivery into a
        `claim_held_elsewhere` receive, which the queue's redrive counts like a real attempt."""
        try:
            await self._store.refresh_claim(key, owner, 0)
        except DependencyUnavailable as exc:
            log.warning("claim_release_failed", detail=str(exc))

    def _keep_claim(self, key: ConversationKey, owner: str) -> AbstractAsyncContextManager[None]:
        return kept_alive(
            lambda: self._store.refresh_claim(key, owner, self._clock() + self._config.claim_lease_s),
            self._config.claim_lease_s / 2,
        )

    def _outbound(self, job: TemplateJob, credentials: dict[str, str]) -> OutboundMessage:
        is_twilio = job.channel in ("whatsapp", "sms")
        return OutboundMessage(
            channel=job.channel,
            credentials=credentials,
            sender=job.sender,
            recipient=job.recipient,
            content_sid=(job.content_sid or credentials.get("twilio_template_sid"))
            if job.channel == "whatsapp"
            else None,
            status_callback_url=self._config.status_callback_url if is_twilio else None,
            reference=job.conversation_id,
            sender_name=job.company.channel_config.email.from_name if job.company.channel_config.email else None,
        )

    @staticmethod
    def _with_content(job: TemplateJob, outbound: OutboundMessage, output: dict[str, str]) -> OutboundMessage:
        if job.channel == "whatsapp":
            return replace(outbound, content_variables=output)
        if job.channel == "sms":
            return replace(outbound, body=output["body"])
        return replace(outbound, subject=output["subject"], body=output["body"])

    @staticmethod
    def _content_text(channel: str, output: dict[str, str]) -> str:
        if channel == "sms":
            return output["body"]
        if channel == "email":
            return f"{output['subject']}\n\n{output['body']}"
        return orjson.dumps(output).decode()

    @staticmethod
    def _stored_generation(snapshot: ConversationSnapshot) -> Generated:
        return Generated(snapshot.thread_id or "", dict(snapshot.generated or {}), dict(snapshot.usage))

    @staticmethod
    def _ai_input(job: TemplateJob) -> str:
        recipient = job.recipient_data
        context: dict[str, Any] = {
            "channel": job.channel,
            "recipient_first_name": recipient.get("recipient_first_name"),
            "recipient_last_name": recipient.get("recipient_last_name"),
            "company_name": job.company.company_name,
            "project_name": job.company.project_name,
            "company_rep": job.company.company_rep,
            "project_data": job.project_data,
        }
        return orjson.dumps(context).decode()

    def _stamp(self) -> str:
        return utc_iso(self._clock())
