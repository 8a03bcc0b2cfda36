"""The reply sender: one trigger on the replies queue answers every fragment staged in its window.

Steps (SPEC §7, reply consumer): claim with a lease, gather unanswered fragments in order, AI in
the stored OpenAI conversation, record the attempt, send a free-form reply, final update (which
also marks the fragments answered), then delete them and the lock and look again.

Never twice, never lost: the final update adds the answered MessageSids to the conversation in the
same write that appends the reply, so a later trigger skips them even if their stage items remain;
an attempt recorded before sending is reconciled with Twilio on redelivery, never re-sent blindly;
a trigger that meets a live claim is retried after the lease, and fragments that arrive while a
reply is being made are picked up by the look-again step (or by their own trigger).

Retries exhausted (a transient failure on the last receive the replies queue allows): unlike the template
sender, the conversation does not move to a failed_* status, because a failed conversation can never be
answered again and the recipient may well write again. The claim is released to the status the conversation
had (`initial_message_sent` / `reply_sent`), the failure is recorded in `last_reply_failure` (failed_* status,
reason, `failure_kind` retries_exhausted), the ledger entry `reply_attempt` is kept (a reply that may have gone
out is reconciled by the next trigger), the trigger lock is released (the next inbound message takes it and its
trigger answers the unanswered staged fragments too) and the trigger goes to the DLQ, from which `comms dlq
redrive` may send it again: the conversation is answerable, so it needs no reopening.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any

import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from consumers.claim_lease import Exhausted, exhausted, failure_detail, kept_alive, transient_retry
from consumers.contracts import Disposition, Lease, Outcome, QueueMessage
from consumers.metrics import ConsumerMetrics
from consumers.sqs_messages import NO_REDRIVE_POLICY, RedrivePolicy
from service.adapters.aws.reply_store import DynamoReplyStore, ReplyClaimVerdict
from service.adapters.aws.stage_store import DynamoStageStore
from service.domain.conversation import ConversationKey, ConversationStatus
from service.domain.delivery_state import parse_delivery_status
from service.domain.errors import DependencyUnavailable
from service.domain.inbound import Batch, Fragment, batch_of
from service.domain.inbound_intake import LOCK_MARGIN_S, Suppressions
from service.domain.ports import MessagePublisher
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

REPLY_CHANNELS = ("whatsapp", "sms")  # email replies are not handled (README)
SENDER_ATTRIBUTE = {"whatsapp": "gsi_company_whatsapp_number", "sms": "gsi_company_sms_number"}
FIRST_MESSAGE_IN_FLIGHT_RETRY_S = 5


class ReplyTrigger(BaseModel):
    model_config = ConfigDict(extra="ignore")

    conversation_id: str = Field(min_length=1)
    primary_channel: str = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class ReplySenderConfig:
    queue_url: str  # the replies queue, for the look-again trigger
    claim_lease_s: float
    ai_timeout_s: float
    batching_window_s: int
    status_callback_url: str | None
    queue: str = "replies"
    final_update_attempts: int = 3
    redrive: RedrivePolicy = NO_REDRIVE_POLICY  # the replies queue's: which receive is the last (none known: never)


@dataclass(frozen=True, slots=True)
class ReplyPorts:
    conversations: DynamoReplyStore
    stage: DynamoStageStore
    secrets: SecretStore
    ai: AiWriter
    senders: dict[str, MessageSender]
    suppressions: Suppressions
    publisher: MessagePublisher


@dataclass(frozen=True, slots=True)
class Attempt:
    """The reply ledger entry (`reply_attempt`): what was about to be sent, for which fragments."""

    message_sids: list[str]
    text: str
    first_received_at: str
    content: str
    usage: dict[str, int]
    thread_id: str
    attempted_at: float

    @classmethod
    def from_record(cls, raw: dict[str, Any]) -> Attempt:
        return cls(
            message_sids=[str(s) for s in raw.get("message_sids", [])],
            text=str(raw.get("text", "")),
            first_received_at=str(raw.get("first_received_at", "")),
            content=str(raw.get("content", "")),
            usage={k: int(v) for k, v in (raw.get("usage") or {}).items()},
            thread_id=str(raw.get("thread_id", "")),
            attempted_at=float(raw.get("attempted_at", 0)),
        )

    def as_record(self) -> dict[str, Any]:
        return {
            "message_sids": self.message_sids,
            "text": self.text,
            "first_received_at": self.first_received_at,
            "content": self.content,
            "usage": self.usage,
            "thread_id": self.thread_id,
            "attempted_at": self.attempted_at,
        }


class ReplySender:
    def __init__(
        self,
        config: ReplySenderConfig,
        ports: ReplyPorts,
        metrics: ConsumerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._ports = ports
        self._metrics = metrics
        self._clock = clock

    async def process(self, message: QueueMessage, lease: Lease) -> Outcome:
        started = time.monotonic()
        try:
            trigger = ReplyTrigger.model_validate(orjson.loads(message.body))
        except (orjson.JSONDecodeError, ValidationError):
            log.error("invalid_reply_trigger", message_id=message.message_id)
            return Outcome.dead_letter("invalid_trigger")
        key = ConversationKey(trigger.primary_channel, trigger.conversation_id)
        owner = f"{message.message_id}/{uuid.uuid4().hex[:12]}"
        structlog.contextvars.bind_contextvars(conversation_id=key.conversation_id)
        try:
            return await self._claimed(key, owner, lease, started, message)
        except DependencyUnavailable as exc:
            log.warning("dependency_unavailable", detail=str(exc))
            return Outcome.retry(f"{exc.service}_unavailable")
        finally:
            structlog.contextvars.unbind_contextvars("conversation_id")

    async def _claimed(
        self, key: ConversationKey, owner: str, lease: Lease, started: float, message: QueueMessage
    ) -> Outcome:
        now = self._clock()
        with self._metrics.step(self._config.queue, "claim"):
            claim = await self._ports.conversations.claim(
                key, owner, now + self._config.claim_lease_s, now, utc_iso(now)
            )
        if claim.verdict is ReplyClaimVerdict.HELD_ELSEWHERE:
            if self._config.redrive.is_last_receive(message.receive_count):
                # The redrive would dead-letter this trigger on its next failure. The holder looks again
                # after it finishes (and its own trigger comes back if it crashed), so nothing is orphaned.
                log.info("reply_trigger_left_to_claim_holder")
                return Outcome.done("left_to_claim_holder")
            wait = max(1, math.ceil(float(claim.record.get("reply_lease_expires", now)) - now))
            return Outcome.retry("reply_claim_held", wait)
        if claim.verdict is ReplyClaimVerdict.NOT_ANSWERABLE:
            status = claim.record.get("conversation_status")
            if status == ConversationStatus.PROCESSING.value:  # the first message is still being sent
                return Outcome.retry("first_message_in_flight", FIRST_MESSAGE_IN_FLIGHT_RETRY_S)
            log.info("reply_not_answerable", status=status)
            await self._ports.stage.release_lock(key.conversation_id)
            return Outcome.done("not_answerable")
        try:
            async with self._keep_claim(key, owner):
                outcome = await self._answer(claim.record, key, owner, lease, started)
        except asyncio.CancelledError:  # stopped (shutdown, lost lease): the trigger comes back, so must the claim
            await asyncio.shield(self._release_lease(key, owner))
            raise
        if outcome.disposition is Disposition.RETRY:
            exhaustion = exhausted(outcome, message, self._config.redrive)
            if exhaustion is not None and await self._give_up(key, owner, exhaustion):
                return exhaustion.outcome()
            await self._release_lease(key, owner)
        return outcome

    async def _answer(
        self, record: dict[str, Any], key: ConversationKey, owner: str, lease: Lease, started: float
    ) -> Outcome:
        answered = [str(s) for s in record.get("replied_message_sids") or []]
        pending = record.get("reply_attempt")
        attempt = Attempt.from_record(pending) if isinstance(pending, dict) else None
        channel = str(record.get("channel_method", ""))
        if attempt is None:
            with self._metrics.step(self._config.queue, "gather"):
                batch = batch_of(await self._ports.stage.staged(key.conversation_id), answered)
            if not batch.fragments or channel not in REPLY_CHANNELS:
                if batch.fragments:
                    log.warning("reply_channel_not_supported", channel=channel)
                await self._ports.conversations.release(key, owner, self._stamp())
                return await self._tidy(key, [], answered + batch.message_sids, "nothing_to_answer")
        else:
            fragments = [Fragment(s, "", attempt.first_received_at) for s in attempt.message_sids]
            batch = Batch(tuple(fragments))
        company_id, project_id = str(record.get("company_id")), str(record.get("project_id"))
        if await self._ports.suppressions.is_opted_out(company_id, project_id, channel, key.primary_channel):
            log.info("reply_suppressed")
            await self._ports.conversations.release(key, owner, self._stamp())
            return await self._tidy(key, batch.message_sids, answered, "suppressed")
        outbound = await self._outbound(record, channel, key)
        if isinstance(outbound, Outcome):
            return outbound
        if attempt is not None:
            found = await self._reconcile(key, owner, attempt, outbound)
            if isinstance(found, Outcome):
                return found
            if found is not None:
                return await self._finalise(key, owner, attempt, found, answered, started)
        else:
            written = await self._write(record, key, owner, batch)
            if isinstance(written, Outcome):
                return written
            attempt = written
        return await self._send(key, owner, attempt, outbound, answered, lease, started)

    # ---- steps -----------------------------------------------------------------------------------

    async def _outbound(self, record: dict[str, Any], channel: str, key: ConversationKey) -> OutboundMessage | Outcome:
        credentials_id = (record.get("channel_config") or {}).get(f"{channel}_credentials_id")
        try:
            with self._metrics.step(self._config.queue, "secrets"):
                credentials = await self._ports.secrets.get_json(str(credentials_id))
        except TransientProviderError as exc:
            return transient_retry("secrets", exc)
        except PermanentProviderError as exc:
            log.error("reply_credentials_unusable", reason=exc.reason)
            # an operator fixes the secret; the batch waits
            return Outcome.retry("secrets_permanent", 60, detail=failure_detail(exc))
        return OutboundMessage(
            channel=channel,
            credentials=credentials,
            sender=str(record.get(SENDER_ATTRIBUTE[channel], "")),
            recipient=key.primary_channel,
            status_callback_url=self._config.status_callback_url,
            reference=key.conversation_id,
        )

    async def _write(self, record: dict[str, Any], key: ConversationKey, owner: str, batch: Batch) -> Attempt | Outcome:
        ai_config = record.get("ai_config") or {}
        try:
            with self._metrics.step(self._config.queue, "secrets"):
                api_key = (await self._ports.secrets.get_json(str(ai_config.get("api_key_reference"))))["ai_api_key"]
        except TransientProviderError as exc:
            return transient_retry("secrets", exc)
        except (PermanentProviderError, KeyError) as exc:
            return await self._fail(key, owner, ConversationStatus.FAILED_SECRETS_FETCH, exc)
        instructions = str((ai_config.get("replies") or {}).get("instructions") or "")
        try:
            with self._metrics.step(self._config.queue, "ai"):
                thread_id = str(record.get("thread_id") or "") or await self._ports.ai.start_thread(
                    api_key, {"conversation_id": key.conversation_id[:512]}
                )
                result = await self._ports.ai.write(
                    AiRequest(
                        api_key=api_key,
                        model=str(ai_config.get("model") or "gpt-4.1-mini"),
                        instructions=instructions,
                        input_text=batch.text,
                        output_keys=("content",),
                        thread_id=thread_id,
                        background=ai_config.get("mode") == "background",
                        timeout_s=self._config.ai_timeout_s,
                    )
                )
        except TransientProviderError as exc:
            return transient_retry("ai", exc)
        except PermanentProviderError as exc:
            return await self._fail(key, owner, ConversationStatus.FAILED_TO_PROCESS_AI, exc)
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.total_tokens,
        }
        return Attempt(
            message_sids=batch.message_sids,
            text=batch.text,
            first_received_at=batch.fragments[0].received_at,
            content=result.output["content"],
            usage=usage,
            thread_id=thread_id,
            attempted_at=self._clock(),
        )

    async def _reconcile(
        self, key: ConversationKey, owner: str, attempt: Attempt, outbound: OutboundMessage
    ) -> SentMessage | Outcome | None:
        """A reply may have gone out before a crash: ask Twilio before sending anything."""
        message = _with_body(outbound, attempt.content)
        try:
            with self._metrics.step(self._config.queue, "reconcile"):
                found = await self._ports.senders[outbound.channel].find_sent(message, attempt.attempted_at - 120)
        except TransientProviderError as exc:
            return transient_retry("reconcile", exc)
        except PermanentProviderError as exc:
            log.error("reply_outcome_unknown_needs_review", reason=exc.reason)
            failure = PermanentProviderError(f"reply_outcome_unknown_needs_review: {exc.reason}")
            return await self._fail(key, owner, ConversationStatus.FAILED_TO_SEND_MESSAGE, failure)
        log.info("reply_reconciled", found=found is not None)
        return found

    async def _send(
        self,
        key: ConversationKey,
        owner: str,
        attempt: Attempt,
        outbound: OutboundMessage,
        answered: list[str],
        lease: Lease,
        started: float,
    ) -> Outcome:
        if lease.lost.is_set():
            return Outcome.retry("lease_lost")
        with lease.protected():  # from the ledger entry on, the runtime never cancels this task
            if not await self._ports.conversations.record_attempt(key, owner, attempt.as_record(), self._stamp()):
                return Outcome.retry("claim_lost", 1)
            try:
                with self._metrics.step(self._config.queue, "send"):
                    sent = await self._ports.senders[outbound.channel].send(_with_body(outbound, attempt.content))
            except PermanentProviderError as exc:
                return await self._fail(key, owner, ConversationStatus.FAILED_TO_SEND_MESSAGE, exc)
            except SendOutcomeUnknown as exc:
                log.warning("reply_outcome_unknown", reason=exc.reason)
                return Outcome.retry("send_outcome_unknown", detail=failure_detail(exc))
            except TransientProviderError as exc:
                await self._ports.conversations.clear_attempt(key, owner)
                return transient_retry("send", exc)
            return await self._finalise(key, owner, attempt, sent, answered, started)

    async def _finalise(
        self,
        key: ConversationKey,
        owner: str,
        attempt: Attempt,
        sent: SentMessage,
        answered: list[str],
        started: float,
    ) -> Outcome:
        stamp = self._stamp()
        messages: list[dict[str, Any]] = [
            {
                "message_id": attempt.message_sids[0],
                "timestamp": attempt.first_received_at,
                "role": "user",
                "content": attempt.text,
            },
            {
                "message_id": sent.provider_message_id,
                "timestamp": stamp,
                "role": "assistant",
                "content": attempt.content,
                **attempt.usage,
            },
        ]
        known = parse_delivery_status(sent.status or "")
        if known is not None:  # what Twilio says now (a reconciled send may already be delivered)
            messages[1]["delivery_status"] = known.value
        processing_ms = int((time.monotonic() - started) * 1000)
        for number in range(1, self._config.final_update_attempts + 1):
            try:
                with self._metrics.step(self._config.queue, "final_update"):
                    applied = await self._ports.conversations.finalise(
                        key,
                        owner,
                        messages=messages,
                        answered_sids=attempt.message_sids,
                        processing_time_ms=processing_ms,
                        stamp=stamp,
                    )
                break
            except DependencyUnavailable as exc:
                log.warning("final_update_retry", attempt=number, detail=str(exc))
                await asyncio.sleep(min(2.0, 0.2 * 2**number))
        else:
            self._metrics.final_update_failures.labels(queue=self._config.queue).inc()
            log.critical(
                "reply_final_update_failed_after_send",
                primary_channel=key.primary_channel,
                conversation_id=key.conversation_id,
                provider_message_id=sent.provider_message_id,
                messages=messages,
                answered_sids=attempt.message_sids,
                repair="a redelivery reconciles with Twilio and finalises; else append both messages, add the "
                "sids to replied_message_sids, set conversation_status=reply_sent and remove reply_attempt/owner",
            )
            return Outcome.retry("final_update_failed")
        if applied is None:  # STOP or a hand-off landed while sending: record the reply, keep that status
            applied = await self._ports.conversations.finalise(
                key,
                owner,
                messages=messages,
                answered_sids=attempt.message_sids,
                processing_time_ms=processing_ms,
                stamp=stamp,
                stopped=True,
            )
        if applied is None:  # our lease lapsed and another trigger took over: it reconciles and finalises
            log.warning("reply_claim_lost_after_send", provider_message_id=sent.provider_message_id)
            return Outcome.done("claim_lost_after_send")
        log.info("reply_sent", provider_message_id=sent.provider_message_id, fragments=len(attempt.message_sids))
        return await self._tidy(key, attempt.message_sids, answered + attempt.message_sids, "reply_sent")

    async def _tidy(self, key: ConversationKey, done_sids: list[str], answered: list[str], reason: str) -> Outcome:
        """Delete answered fragments and the lock, then look again so no late fragment is orphaned."""
        stage = self._ports.stage
        try:
            staged = await stage.staged(key.conversation_id)
            answered_set = set(answered) | set(done_sids)
            await stage.delete_staged(
                key.conversation_id, [f.message_sid for f in staged if f.message_sid in answered_set]
            )
            await stage.release_lock(key.conversation_id)
            remaining = batch_of(await stage.staged(key.conversation_id), list(answered_set))
            if remaining.fragments:
                await self._retrigger(key, remaining)
        except DependencyUnavailable as exc:
            # The reply is recorded; coming back re-runs only this tidy-up (answered fragments are skipped).
            log.warning("reply_tidy_failed", detail=str(exc))
            return Outcome.retry("tidy_pending")
        return Outcome.done(reason)

    async def _retrigger(self, key: ConversationKey, remaining: Batch) -> None:
        now = self._clock()
        window = self._config.batching_window_s
        holder = f"retrigger:{remaining.first_sid}"
        if await self._ports.stage.take_lock(key.conversation_id, holder, now, int(now + window + LOCK_MARGIN_S)):
            body = orjson.dumps({"conversation_id": key.conversation_id, "primary_channel": key.primary_channel})
            try:
                await self._ports.publisher.publish(
                    self._config.queue_url, body.decode(), {"conversationId": key.conversation_id}, delay_s=window
                )
            except DependencyUnavailable:
                await self._ports.stage.release_lock(key.conversation_id, holder)
                raise
            log.info("reply_retriggered", fragments=len(remaining.fragments))

    # ---- helpers ---------------------------------------------------------------------------------

    async def _fail(self, key: ConversationKey, owner: str, status: ConversationStatus, exc: Exception) -> Outcome:
        if isinstance(exc, KeyError):  # the AI secret has no ai_api_key (as the template sender words it)
            exc = PermanentProviderError("ai_api_key_missing")
        detail = failure_detail(exc)
        log.warning("reply_failed", status=status.value, reason=detail)
        await self._ports.conversations.fail(key, owner, status, detail, self._stamp())
        await self._ports.stage.release_lock(key.conversation_id)
        return Outcome.done(status.value)

    async def _give_up(self, key: ConversationKey, owner: str, exhaustion: Exhausted) -> bool:
        """Release the claim with the failure noted (module docstring) and free the trigger lock; False if the
        claim was lost or DynamoDB failed (then the retry stands and SQS's redrive moves the trigger)."""
        try:
            released = await self._ports.conversations.release_exhausted(
                key, owner, exhaustion.status, exhaustion.reason, self._stamp()
            )
        except DependencyUnavailable as exc:
            log.warning("exhausted_not_recorded", detail=str(exc))
            return False
        if released:
            try:
                await self._ports.stage.release_lock(key.conversation_id)
            except DependencyUnavailable as exc:  # it lapses by itself (expires_at), then a new inbound takes it
                log.warning("trigger_lock_release_failed", detail=str(exc))
        return released

    async def _release_lease(self, key: ConversationKey, owner: str) -> None:
        """A retried trigger must find the claim open to takeover, not held until its lease lapses."""
        try:
            await self._ports.conversations.refresh(key, owner, 0)
        except DependencyUnavailable as exc:
            log.warning("reply_lease_release_failed", detail=str(exc))

    def _keep_claim(self, key: ConversationKey, owner: str) -> AbstractAsyncContextManager[None]:
        return kept_alive(
            lambda: self._ports.conversations.refresh(key, owner, self._clock() + self._config.claim_lease_s),
            self._config.claim_lease_s / 2,
        )

    def _stamp(self) -> str:
        return utc_iso(self._clock())


def _with_body(outbound: OutboundMessage, body: str) -> OutboundMessage:
    return replace(outbound, body=body)
