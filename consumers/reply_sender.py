"""The reply sender (SPEC §7, reply consumer): one trigger on the replies queue answers every fragment staged in
its window. Its own steps on the claimed-work skeleton (`consumers.claimed_work`): the reply claim
(`claims.decide_reply`), gather the unanswered fragments in order, skip a suppressed recipient, write in the stored
OpenAI conversation, a free-form reply, the final update (which marks the fragments answered), then delete them and
the trigger lock and look again, so a fragment that arrived meanwhile gets its own trigger.

Never twice: the final update records the answered MessageSids on the user message it records with the reply
(read back with the newest messages before the next batch is gathered), and an attempt recorded before sending
is reconciled with Twilio on redelivery. Never lost: a trigger that meets a live
claim is retried after the lease. Retries exhausted: the conversation stays answerable (the recipient may write
again): `ReplyClaims.fail` releases the claim to its previous status noting `last_reply_failure` and keeping the
ledger entry, the trigger lock is released and the trigger goes to the DLQ.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import structlog
from pydantic import ValidationError

from consumers.claimed_work import Claimed, ClaimedWork, Prompt, failure_detail
from consumers.contracts import Outcome, QueueMessage
from consumers.sqs_messages import NO_REDRIVE_POLICY, RedrivePolicy
from service.domain.claims import Claim
from service.domain.company import tenant_group
from service.domain.conversation import (
    ConversationRecord,
    ConversationStatus,
    Message,
    ReplyAttempt,
    answered_fragments,
)
from service.domain.delivery_state import parse_delivery_status
from service.domain.errors import DependencyUnavailable
from service.domain.inbound import Batch, batch_of
from service.domain.ports import (
    AiWriter,
    MessagePublisher,
    MessageSender,
    OptOutRegistry,
    ReplyClaims,
    ReplyStage,
    SecretStore,
)
from service.domain.provider_ports import AiResult, OutboundMessage, PermanentProviderError, SentMessage
from service.domain.reply_trigger import ReplyTrigger, queue_reply_trigger
from service.domain.timefmt import utc_iso

log = structlog.get_logger(__name__)

REPLY_CHANNELS = ("whatsapp", "sms")  # email replies are not handled (README)
FIRST_MESSAGE_IN_FLIGHT_RETRY_S = 5
CREDENTIALS_UNUSABLE_RETRY_S = 60
# The newest messages read for a reply: the AI's context when OpenAI no longer holds the conversation, and (their
# user messages' fragment SIDs) the fragments already answered. One bounded Query, whatever the conversation's length
# (none before its first reply: the template message is the record's own).
REPLY_HISTORY_KEPT = 40
REPLIED = ConversationStatus.REPLY_SENT.value  # the outcome reason and log event of a reply recorded
REPAIR = (
    "a redelivery reconciles with Twilio and finalises; by hand: what the final update writes (both messages "
    f"appended, the fragments' sids answered, status {ConversationStatus.REPLY_SENT}, the reply attempt and claim "
    "removed)"
)


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
    claims: ReplyClaims
    stage: ReplyStage
    secrets: SecretStore
    ai: AiWriter
    senders: Mapping[str, MessageSender]
    opt_outs: OptOutRegistry
    publisher: MessagePublisher


class ReplySender(ClaimedWork[ReplyTrigger, ReplyAttempt, ReplySenderConfig, ReplyPorts]):
    async def parse(self, message: QueueMessage) -> ReplyTrigger | Outcome:
        try:
            return ReplyTrigger.model_validate_json(message.body)
        except ValidationError:
            log.error("invalid_reply_trigger", message_id=message.message_id)
            return Outcome.dead_letter("invalid_trigger")

    async def claim(self, trigger: ReplyTrigger, owner: str, message: QueueMessage) -> ConversationRecord | Outcome:
        now = self._clock()
        with self.step("claim"):
            answer = await self._ports.claims.claim(trigger.key, owner, now + self._config.claim_lease_s, now)
        record = answer.record
        if answer.verdict is Claim.TAKE and record is not None:
            if record.reply_claim.owner != owner:  # refused as the lease lapsed this very moment: try again
                return Outcome.retry("reply_claim_raced", 1)
            return record
        if answer.verdict is Claim.HELD and record is not None:
            if self._config.redrive.is_last_receive(message.receive_count):
                # The redrive would dead-letter this trigger on its next failure. The holder looks again after it
                # finishes (and its own trigger comes back if it crashed), so nothing is orphaned.
                log.info("reply_trigger_left_to_claim_holder")
                return Outcome.done("left_to_claim_holder")
            return Outcome.retry("reply_claim_held", record.reply_claim.wait_s(now))
        if answer.verdict is Claim.WAIT:  # the first message is still being sent
            return Outcome.retry("first_message_in_flight", FIRST_MESSAGE_IN_FLIGHT_RETRY_S)
        log.info("reply_not_answerable", status=record.status if record else None)
        await self._ports.stage.release_lock(trigger.conversation_id)
        return Outcome.done("not_answerable")

    async def work(self, claimed: Claimed[ReplyTrigger]) -> Outcome:
        record = claimed.record
        pending: ReplyAttempt | Prompt[ReplyAttempt]
        if record.reply_attempt is not None:  # a reply that may have gone out: reconciled, never written again
            pending, sids = record.reply_attempt, list(record.reply_attempt.message_sids)
        else:
            with self.step("gather"):  # the fragments and the conversation's newest messages, side by side
                staged, history = await asyncio.gather(
                    self._ports.stage.staged(claimed.key.conversation_id),
                    self._ports.claims.recent_messages(record, REPLY_HISTORY_KEPT),
                )
                batch = batch_of(staged, list(answered_fragments(record, history)))
            if not batch.fragments or record.channel not in REPLY_CHANNELS:
                if batch.fragments:
                    log.warning("reply_channel_not_supported", channel=record.channel)
                return await self._unanswered(claimed, batch.message_sids, "nothing_to_answer")
            pending, sids = self._prompt(record, batch, history), batch.message_sids
        opted_out = await self._ports.opt_outs.is_opted_out(
            record.company_id, record.project_id, record.channel, record.key.primary_channel
        )
        if not opted_out:
            return await self.deliver(claimed, record.credentials_id, pending, reconcile=True)
        log.info("reply_suppressed")
        if isinstance(pending, Prompt):
            return await self._unanswered(claimed, sids, "suppressed")
        # A reply that went out before the opt-out is still recorded; one the provider never got is not sent.
        return await self.deliver(
            claimed, record.credentials_id, pending, reconcile=True, unsent=lambda: self._withdrawn(claimed, sids)
        )

    async def credentials_unusable(self, claimed: Claimed[ReplyTrigger], exc: PermanentProviderError) -> Outcome:
        log.error("reply_credentials_unusable", reason=exc.reason)  # an operator fixes the secret; the batch waits
        return Outcome.retry("secrets_permanent", CREDENTIALS_UNUSABLE_RETRY_S, detail=failure_detail(exc))

    def outbound(
        self, claimed: Claimed[ReplyTrigger], credentials: dict[str, str], draft: ReplyAttempt
    ) -> OutboundMessage:
        return OutboundMessage(
            channel=claimed.record.channel,
            credentials=credentials,
            sender=claimed.record.company_address or "",
            recipient=claimed.key.primary_channel,
            body=draft.content,
            status_callback_url=self._config.status_callback_url,
            reference=claimed.key.conversation_id,
            sends_per_second=claimed.record.sends_per_second,
        )

    async def finalise(self, claimed: Claimed[ReplyTrigger], draft: ReplyAttempt, sent: SentMessage) -> Outcome:
        known = parse_delivery_status(sent.status or "")  # what Twilio says now (a reconciled send may be delivered)
        stamp, status = utc_iso(self._clock()), known.value if known else None
        messages = (
            Message(draft.message_sids[0], "user", draft.text, draft.first_received_at),
            Message(sent.provider_message_id, "assistant", draft.content, stamp, draft.usage, status),
        )
        claims, key, owner, sids = self._ports.claims, claimed.key, claimed.owner, draft.message_sids
        finalised = await self.final_update(
            claimed,
            sent,
            lambda ms: claims.finalise(key, owner, messages, sids, draft.thread_id, ms, claimed=claimed.record),
            messages=[asdict(m) for m in messages],
            answered_sids=sids,
            repair=REPAIR,
        )
        if isinstance(finalised, Outcome):
            return finalised
        if finalised is None:  # our lease lapsed and another trigger took over: it reconciles and finalises
            log.warning("reply_claim_lost_after_send", provider_message_id=sent.provider_message_id)
            return Outcome.done("claim_lost_after_send")
        log.info(REPLIED, provider_message_id=sent.provider_message_id, fragments=len(sids))
        return await self._tidy(claimed, sids, REPLIED)

    async def after_fail(self, claimed: Claimed[ReplyTrigger]) -> None:
        try:
            await self._ports.stage.release_lock(claimed.key.conversation_id)
        except DependencyUnavailable as exc:  # it lapses by itself (expires_at), then a new inbound takes it
            log.warning("trigger_lock_release_failed", detail=str(exc))

    # ---- steps -----------------------------------------------------------------------------------

    def _prompt(self, record: ConversationRecord, batch: Batch, history: tuple[Message, ...]) -> Prompt[ReplyAttempt]:
        return Prompt(
            api_key_reference=record.ai.api_key_reference,
            model=record.ai.model,
            instructions=record.ai.reply_instructions,
            input_text=batch.text,
            output_keys=("content",),
            background=record.ai.background,
            draft=partial(self._attempt, batch),
            thread_id=record.thread_id,
            history=history,
            requests_per_second=record.ai.requests_per_second,
        )

    def _attempt(self, batch: Batch, result: AiResult) -> ReplyAttempt:
        first_received_at = batch.fragments[0].received_at
        content, thread_id = result.output["content"], result.thread_id
        return ReplyAttempt(
            tuple(batch.message_sids), batch.text, first_received_at, content, result.usage, thread_id, self._clock()
        )

    async def _withdrawn(self, claimed: Claimed[ReplyTrigger], sids: Sequence[str]) -> Outcome:
        """A pending reply the provider never got, to a recipient who has opted out since: dropped, not sent."""
        await self._ports.claims.clear_attempt(claimed.key, claimed.owner)
        return await self._unanswered(claimed, sids, "suppressed")

    async def _unanswered(self, claimed: Claimed[ReplyTrigger], sids: Sequence[str], reason: str) -> Outcome:
        """Nothing to answer (or not to be answered): the conversation back to its status, the fragments tidied."""
        await self._ports.claims.finish_unanswered(claimed.key, claimed.owner)
        return await self._tidy(claimed, sids, reason)

    async def _tidy(self, claimed: Claimed[ReplyTrigger], sids: Sequence[str], reason: str) -> Outcome:
        """Delete the fragments just dealt with and the lock (one request), then look again: a fragment that came
        meanwhile found the lock held and only staged, so it gets its trigger here; one answered before but still
        staged (an earlier tidy-up that failed, a webhook retry after it) is deleted then."""
        stage, key = self._ports.stage, claimed.key
        answered = claimed.record.replied_sids | set(sids)
        try:
            await stage.finish_window(key.conversation_id, sids)
            staged = await stage.staged(key.conversation_id)
            if any(f.message_sid not in answered for f in staged):  # answered by an earlier reply? (rarely asked)
                recent = await self._ports.claims.recent_messages(claimed.record, REPLY_HISTORY_KEPT)
                answered |= answered_fragments(claimed.record, recent)
            leftover = [f.message_sid for f in staged if f.message_sid in answered]
            if leftover:
                await stage.delete_staged(key.conversation_id, leftover)
            remaining = batch_of(staged, list(answered))
            if remaining.fragments and await queue_reply_trigger(
                stage,
                self._ports.publisher,
                self._config.queue_url,
                key,
                holder=f"retrigger:{remaining.first_sid}",
                now=self._clock(),
                window_s=self._config.batching_window_s,
                group=tenant_group(claimed.record.company_id, claimed.record.project_id),
            ):
                log.info("reply_retriggered", fragments=len(remaining.fragments))
        except DependencyUnavailable as exc:
            # The reply is recorded; coming back re-runs only this tidy-up (answered fragments are skipped).
            log.warning("reply_tidy_failed", detail=str(exc))
            return Outcome.retry("tidy_pending")
        return Outcome.done(reason)
