"""The template sender (SPEC §6): one channel-queue message becomes one AI-written first message, sent once.

Its own steps on the claimed-work skeleton (`consumers.claimed_work`): parse the context (an invalid one is
recorded and dead-lettered), claim or create the conversation, follow the send ledger (`claims.next_step`), compose
the template, SMS or email, and the final update. A transient failure on the last receive ends the conversation in
its failed_* status, marked exhausted, which `comms dlq redrive` reopens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import orjson
import structlog

from consumers.claimed_work import Claimed, ClaimedWork, Prompt
from consumers.contracts import Outcome, QueueMessage
from consumers.sqs_messages import NO_REDRIVE_POLICY, RedrivePolicy
from consumers.template_job import InvalidContext, TemplateJob, new_conversation, parse_template_job
from service.domain.claims import Claim, NextStep, next_step
from service.domain.conversation import (
    ConversationKey,
    ConversationRecord,
    ConversationStatus,
    Message,
    TemplateDraft,
    content_text,
)
from service.domain.errors import DependencyUnavailable
from service.domain.ports import AiWriter, ConversationClaims, MessageSender, SecretStore
from service.domain.provider_ports import AiResult, OutboundMessage, SentMessage
from service.domain.timefmt import utc_iso

log = structlog.get_logger(__name__)

REPAIR = (
    "a redelivery reconciles with the provider and repairs this by itself; by hand: what the final update writes "
    f"(status {ConversationStatus.INITIAL_MESSAGE_SENT}, send ledger sent with the provider id, first_message_at set"
    " and message_count 1: the ledger is the message)"
)


@dataclass(frozen=True, slots=True)
class TemplateSenderConfig:
    queue: str  # metric/log label: whatsapp | sms | email
    claim_lease_s: float  # below the queue visibility timeout, so a crashed claim expires first
    ai_timeout_s: float
    status_callback_url: str | None
    final_update_attempts: int = 3
    redrive: RedrivePolicy = NO_REDRIVE_POLICY  # the queue's: which receive is the last (none known: never)


@dataclass(frozen=True, slots=True)
class TemplatePorts:
    claims: ConversationClaims
    secrets: SecretStore
    ai: AiWriter
    senders: Mapping[str, MessageSender]


class TemplateSender(ClaimedWork[TemplateJob, TemplateDraft, TemplateSenderConfig, TemplatePorts]):
    async def parse(self, message: QueueMessage) -> TemplateJob | Outcome:
        try:
            return parse_template_job(message.body)
        except InvalidContext as exc:
            log.error("invalid_context", reason=exc.reason, message_id=message.message_id)
            if exc.primary_channel and exc.conversation_id:
                try:
                    key = ConversationKey(exc.primary_channel, exc.conversation_id)
                    await self._ports.claims.record_invalid(key, exc.reason)
                except DependencyUnavailable as failure:
                    log.warning("invalid_context_not_recorded", detail=str(failure))
            return Outcome.dead_letter(f"invalid_context:{exc.reason.split(':')[0]}")

    def log_context(self, job: TemplateJob) -> dict[str, str]:
        return {"trace_id": job.trace_id}

    def tenant(self, job: TemplateJob) -> tuple[str, str]:
        return job.company.company_id, job.company.project_id  # the cap is checked before the claim

    async def claim(self, job: TemplateJob, owner: str, message: QueueMessage) -> ConversationRecord | Outcome:
        now = self._clock()
        with self.step("claim"):
            answer = await self._ports.claims.claim(new_conversation(job), owner, now + self._config.claim_lease_s, now)
        record = answer.record
        if answer.verdict is Claim.HELD and record is not None:
            return Outcome.retry("claim_held_elsewhere", record.claim.wait_s(now))
        if answer.verdict is not Claim.TAKE:
            log.info("conversation_already_done", status=record.status if record else None)
            return Outcome.done("already_done")
        if record is None or record.claim.owner != owner:
            return Outcome.retry("claim_raced", 1)
        return record

    async def work(self, claimed: Claimed[TemplateJob]) -> Outcome:
        record, job = claimed.record, claimed.job
        step, ledger = next_step(record), record.ledger
        attempted_at = (ledger.attempted_at if step is NextStep.RECONCILE else None) or self._clock()
        stored = TemplateDraft(record.thread_id or "", dict(ledger.generated or {}), ledger.usage, attempted_at)
        if step is NextStep.FINALISE and ledger.provider_message_id:
            return await self.finalise(claimed, stored, SentMessage(ledger.provider_message_id))
        pending = self._prompt(job) if step is NextStep.GENERATE else stored
        return await self.deliver(claimed, job.credentials_id, pending, reconcile=step is NextStep.RECONCILE)

    def outbound(
        self, claimed: Claimed[TemplateJob], credentials: dict[str, str], draft: TemplateDraft
    ) -> OutboundMessage:
        job, content = claimed.job, dict(draft.content)
        email = job.company.channel_config.email
        message = OutboundMessage(
            channel=job.channel,
            credentials=credentials,
            sender=job.sender,
            recipient=job.recipient,
            status_callback_url=self._config.status_callback_url if job.channel in ("whatsapp", "sms") else None,
            reference=job.conversation_id,
            sender_name=email.from_name if email else None,
            sends_per_second=job.company.channel_config.sends_per_second(job.channel),
        )
        if job.channel == "whatsapp":
            template = job.content_sid or credentials.get("twilio_template_sid")
            return replace(message, content_sid=template, content_variables=content)
        if job.channel == "sms":
            return replace(message, body=content["body"])
        return replace(message, subject=content["subject"], body=content["body"])

    async def finalise(self, claimed: Claimed[TemplateJob], draft: TemplateDraft, sent: SentMessage) -> Outcome:
        content = content_text(claimed.job.channel, draft.content)
        message = Message(sent.provider_message_id, "assistant", content, utc_iso(self._clock()), draft.usage)
        applied = await self.final_update(
            claimed,
            sent,
            lambda ms: self._ports.claims.finalise(claimed.key, message, draft.thread_id, ms),
            thread_id=draft.thread_id,
            message=asdict(message),
            repair=REPAIR,
        )
        if isinstance(applied, Outcome):
            return applied
        return Outcome.done("sent" if applied else "already_finalised")

    def _prompt(self, job: TemplateJob) -> Prompt[TemplateDraft]:
        """The first exchange of a conversation: no continuation (an AI call that was never sent leaves nothing
        the template should follow), its response the one a reply chains from."""

        def draft(result: AiResult) -> TemplateDraft:
            return TemplateDraft(result.thread_id, result.output, result.usage, self._clock())

        return Prompt(
            api_key_reference=job.ai.api_key_reference,
            model=job.ai.model,
            instructions=job.ai.instructions,
            input_text=ai_input(job),
            output_keys=job.ai.output_keys,
            background=job.ai.background,
            draft=draft,
            metadata={"request_id": job.request_id},
            requests_per_second=job.ai.requests_per_second,
        )


def ai_input(job: TemplateJob) -> str:
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
