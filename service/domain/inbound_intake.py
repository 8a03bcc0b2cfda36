"""What the Twilio webhooks do (SPEC §7): authenticate against the tenant's token, apply the rules,
handle opt-out keywords, hand off, or stage the fragment and trigger one delayed reply per window.
Status callbacks move a sent message's delivery state forward (the message found by its SID among the pair's
conversations' messages, newest first); one that comes before the final update that records its message is kept
and applied by that update (`delivery_state.conversations_to_hold`).

Nothing about who talks to whom is revealed before the signature is verified: the tenant, and so the auth
token, follows from the business number alone (`To` of a message, `From` of a status callback); only a
request verified with that token gets as far as looking up the (sender, business number) pair, and the
conversation found must belong to a tenant whose token verifies it too (if not, it is answered as an unknown
pair: one tenant learns nothing of another's pairs). Anything unverifiable is FORBIDDEN, whatever the pair.

Once the request is verified and its conversation found, the state-changing rest (opt-out, hand-off, stage +
lock + trigger) runs under `asyncio.shield`: the request deadline may answer 503, but never cuts the work
between taking the trigger lock and queueing the trigger (a lock held with no trigger would never be answered).

Nothing here talks HTTP: the handler passes the URL Twilio signed, the form and the signature,
and turns the `IntakeResult` into a status code. AWS failures escape as `DependencyUnavailable`
(503, so Twilio retries); every step is idempotent, so a retry never double-stages, and a retry of a request that
was answered 503 never double-triggers (`reply_trigger.QueuedMark`: a request answered 200, which Twilio does not
retry, skips that mark's write).

AWS requests of an ordinary fragment: the pair's Query and the record's GetItem (the index holds only what never
changes), the stage PutItem, the lock PutItem, and for the first of a window the trigger's SendMessage (company
and secrets come from caches; the suppression list is read only where it changes what happens here,
`inbound.needs_suppression_list`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import orjson
import structlog

from service.domain.company import CompanyRecord, tenant_group
from service.domain.conversation import ConversationKey, ConversationRecord, Message, message_view
from service.domain.delivery_state import DeliveryStatus, conversations_to_hold, is_forward, parse_delivery_status
from service.domain.errors import DependencyUnavailable
from service.domain.inbound import (
    Fragment,
    InboundMessage,
    Keyword,
    bare_address,
    hand_off_reason,
    keyword_of,
    needs_suppression_list,
)
from service.domain.ports import (
    CompanyDirectory,
    ConversationLookup,
    MessagePublisher,
    OptOutRegistry,
    ReplyStage,
    SecretStore,
    SignatureVerifier,
)
from service.domain.provider_ports import PermanentProviderError, ProviderError
from service.domain.reply_trigger import QueuedMark, lock_expiry, queue_reply_trigger
from service.domain.timefmt import utc_iso

log = structlog.get_logger(__name__)

HANDOFF_MESSAGES_KEPT = 20  # the newest messages sent with a hand-off (SQS bodies are capped at 256 KiB)


class IntakeResult(StrEnum):
    STAGED = "staged"  # stored; this fragment took the lock and queued the delayed trigger, or joined a window
    DUPLICATE = "duplicate"  # a webhook retry of a fragment already staged
    UNKNOWN_CONVERSATION = "unknown_conversation"
    FORBIDDEN = "forbidden"  # missing or invalid signature, or a number no tenant owns: 403, nothing stored
    REFUSED_BY_RULES = "refused_by_rules"  # project inactive or channel not allowed
    OPTED_OUT = "opted_out"
    OPTED_IN = "opted_in"
    SUPPRESSED = "suppressed"  # an opted-out sender wrote something else: no AI reply
    HANDED_OFF = "handed_off"
    STATUS_APPLIED = "status_applied"
    STATUS_HELD = "status_held"  # its message is not recorded yet: kept until the final update records it
    STATUS_STALE = "status_stale"  # out of order or repeated: the stored state is already later
    STATUS_UNKNOWN = "status_unknown"  # no such message, or a status value we do not track


@dataclass(frozen=True, slots=True)
class IntakePorts:
    conversations: ConversationLookup
    companies: CompanyDirectory
    secrets: SecretStore
    opt_outs: OptOutRegistry
    stage: ReplyStage
    publisher: MessagePublisher
    signatures: SignatureVerifier


@dataclass(frozen=True, slots=True)
class IntakeConfig:
    replies_queue_url: str | None
    handoff_queue_url: str | None
    batching_window_s: int


@dataclass(frozen=True, slots=True)
class SignedRequest:
    url: str  # the public URL Twilio called
    params: Mapping[str, str]  # the POST form
    signature: str  # X-Twilio-Signature ('' when absent)


class InboundIntake:
    def __init__(self, ports: IntakePorts, config: IntakeConfig, clock: Callable[[], float] = time.time) -> None:
        self._ports = ports
        self._config = config
        self._clock = clock
        self._marking: set[asyncio.Future[None]] = set()  # marks owed by requests cut after queueing their trigger

    # ---- inbound messages ----------------------------------------------------------------------

    async def receive(self, message: InboundMessage, request: SignedRequest) -> IntakeResult:
        verified = await self._verified_for_number(message.channel, message.company_address, request)
        if verified is None:
            return IntakeResult.FORBIDDEN
        conversations = self._ports.conversations
        conversation = await conversations.find_open(message.channel, message.company_address, message.sender)
        if conversation is None:
            log.info("inbound_unknown_conversation", channel=message.channel, message_sid=message.message_sid)
            return IntakeResult.UNKNOWN_CONVERSATION
        if not await self._belongs(conversation, request, verified):
            return IntakeResult.UNKNOWN_CONVERSATION
        # Verified and found: from here on every step changes state; a deadline must not cut it half-way.
        mark = QueuedMark(always=False)
        try:
            return await asyncio.shield(self._act(conversation, message, mark))
        except asyncio.CancelledError:  # answered 503: Twilio retries, and the retry must find its trigger marked
            owed = mark.cut()
            if owed is not None:  # queued just before the cut, unmarked
                task = asyncio.ensure_future(owed())
                self._marking.add(task)
                task.add_done_callback(self._marking.discard)
            raise

    async def _act(self, conversation: ConversationRecord, message: InboundMessage, mark: QueuedMark) -> IntakeResult:
        ports = self._ports
        key = conversation.key
        company = await ports.companies.get(conversation.company_id, conversation.project_id)
        if company is None or not company.is_active or not company.allows(message.channel):
            log.info("inbound_refused_by_rules", conversation_id=key.conversation_id)
            return IntakeResult.REFUSED_BY_RULES
        ids = (company.company_id, company.project_id, message.channel, message.sender)
        reason = hand_off_reason(conversation, company, message.sender)
        suppressed = False  # read only where it changes what happens here: the reply consumer reads it before the AI
        if needs_suppression_list(message.body, conversation, reason):
            suppressed = await ports.opt_outs.is_opted_out(*ids)
        keyword = keyword_of(message.body, suppressed=suppressed)
        stamp = utc_iso(self._clock())
        if keyword is Keyword.OPT_OUT:
            await ports.opt_outs.opt_out(*ids, stamp)
            await ports.conversations.mark_opted_out(key)
            log.info("inbound_opted_out", conversation_id=key.conversation_id)
            return IntakeResult.OPTED_OUT
        if keyword is Keyword.OPT_IN:
            await ports.opt_outs.opt_in(*ids)
            await ports.conversations.mark_opted_in(key)
            log.info("inbound_opted_in", conversation_id=key.conversation_id)
            return IntakeResult.OPTED_IN
        if suppressed:
            log.info("inbound_from_suppressed_sender", conversation_id=key.conversation_id)
            return IntakeResult.SUPPRESSED
        if reason:
            await self._hand_off(conversation, company, message, reason, stamp)
            return IntakeResult.HANDED_OFF
        return await self._stage(key, message, mark, tenant_group(company.company_id, company.project_id))

    async def _hand_off(
        self, conversation: ConversationRecord, company: CompanyRecord, message: InboundMessage, reason: str, stamp: str
    ) -> None:
        queue_url = self._required(self._config.handoff_queue_url, "COMMS_HANDOFF_QUEUE_URL")
        shared = conversation.shared_fields  # the stored form: what a human is shown
        recent = await self._ports.conversations.recent_messages(conversation, HANDOFF_MESSAGES_KEPT)
        context = {
            "conversation": {**shared, "messages": [message_view(message) for message in recent]},
            "inbound": message.model_dump(mode="json"),
            "company": {"company_id": company.company_id, "project_id": company.project_id},
            "hand_off_reason": reason,
            "received_at": stamp,
        }
        key = conversation.key
        attributes = {"conversationId": key.conversation_id, "handOffReason": reason}
        group = tenant_group(company.company_id, company.project_id)
        await self._ports.publisher.publish(queue_url, orjson.dumps(context).decode(), attributes, group=group)
        await self._ports.conversations.mark_handed_off(key, reason)
        log.info("inbound_handed_off", conversation_id=key.conversation_id, reason=reason)

    async def _stage(self, key: ConversationKey, message: InboundMessage, mark: QueuedMark, group: str) -> IntakeResult:
        queue_url = self._required(self._config.replies_queue_url, "COMMS_REPLIES_QUEUE_URL")
        now, window = self._clock(), self._config.batching_window_s
        fragment = Fragment(message.message_sid, message.body, utc_iso(now))
        stored = await self._ports.stage.stage(key, fragment, lock_expiry(now, window))
        # Even a duplicate tries the lock: the first delivery may have failed (or been cut) before it queued the
        # trigger; it holds the lock then, and as its holder this retry may re-take it (`take_lock`).
        await queue_reply_trigger(
            self._ports.stage,
            self._ports.publisher,
            queue_url,
            key,
            holder=message.message_sid,
            now=now,
            window_s=window,
            mark=mark,
            group=group,
        )
        return IntakeResult.STAGED if stored else IntakeResult.DUPLICATE

    # ---- status callbacks ----------------------------------------------------------------------

    async def delivery_status(self, form: Mapping[str, str], request: SignedRequest) -> IntakeResult:
        """For a status callback `From` is our number and `To` the recipient."""
        sid = form.get("MessageSid") or form.get("SmsSid") or ""
        status = parse_delivery_status(form.get("MessageStatus") or form.get("SmsStatus") or "")
        raw_from, raw_to = form.get("From") or "", form.get("To") or ""
        channel = "whatsapp" if raw_from.startswith("whatsapp:") else "sms"
        company_address = bare_address(raw_from)
        verified = await self._verified_for_number(channel, company_address, request) if company_address else None
        if verified is None:
            return IntakeResult.FORBIDDEN
        if not sid or not raw_to or status is None:
            return IntakeResult.STATUS_UNKNOWN
        conversations = await self._ports.conversations.conversations_between(
            channel, company_address, bare_address(raw_to)
        )
        found = await self._message_named(conversations, sid)
        if found is None:
            return await self._hold(conversations, sid, status, request, verified)
        conversation, index, message = found
        if not await self._belongs(conversation, request, verified):
            return IntakeResult.STATUS_UNKNOWN
        if not is_forward(parse_delivery_status(message.delivery_status or ""), status):
            return IntakeResult.STATUS_STALE
        applied = await self._ports.conversations.set_delivery_status(conversation, index, sid, status)
        return IntakeResult.STATUS_APPLIED if applied else IntakeResult.STATUS_STALE

    async def _hold(
        self,
        conversations: Sequence[ConversationRecord],
        sid: str,
        status: DeliveryStatus,
        request: SignedRequest,
        verified: str,
    ) -> IntakeResult:
        """A callback for a SID no record shows yet (Twilio never retries it): keep it for the final update."""
        targets = conversations_to_hold(conversations)
        if not targets:
            log.info("status_for_unknown_message", message_sid=sid)
            return IntakeResult.STATUS_UNKNOWN
        held = False
        for conversation in targets:
            if await self._belongs(conversation, request, verified):
                held = await self._ports.conversations.hold_delivery_status(conversation.key, sid, status) or held
        log.info("status_before_its_message", message_sid=sid, status=status.value, held=held)
        return IntakeResult.STATUS_HELD if held else IntakeResult.STATUS_STALE

    async def _message_named(
        self, conversations: Sequence[ConversationRecord], sid: str
    ) -> tuple[ConversationRecord, int, Message] | None:
        """The conversation (newest first) that recorded the message, its position and the message as stored."""
        for conversation in sorted(conversations, key=lambda c: c.created_at, reverse=True):
            found = await self._ports.conversations.find_message(conversation, sid)
            if found is not None:
                return conversation, *found
        return None

    # ---- authentication ------------------------------------------------------------------------

    async def _verified_for_number(self, channel: str, company_address: str, request: SignedRequest) -> str | None:
        """The credentials id, among those the number's conversations name, whose token verifies the signature;
        else None. (A project whose credentials id changed leaves old conversations naming the old one: any of
        them may verify.)

        Looks at nothing but the number (public anyway), so an unverifiable request learns nothing about pairs.
        """
        if not request.signature:
            log.warning("webhook_signature_missing", channel=channel)
            return None
        candidates = await self._ports.conversations.tenant_credentials(channel, company_address)
        if not candidates:
            log.warning("webhook_number_has_no_tenant", channel=channel)
            return None
        for credentials_id in candidates:
            if await self._valid_with(credentials_id, request):
                return credentials_id
        return None

    async def _belongs(self, conversation: ConversationRecord, request: SignedRequest, verified: str) -> bool:
        """The conversation's own tenant verifies the request too (a number wrongly shared by two tenants must
        not let one of them write into the other's conversations). Usually the same credentials: no new check."""
        credentials_id = conversation.credentials_id
        if credentials_id == verified:
            return True
        if not credentials_id:
            log.error("webhook_tenant_has_no_credentials", conversation_id=conversation.key.conversation_id)
            return False
        if await self._valid_with(credentials_id, request):
            return True
        log.warning("webhook_conversation_of_another_tenant", conversation_id=conversation.key.conversation_id)
        return False

    async def _valid_with(self, credentials_id: str, request: SignedRequest) -> bool:
        """The signature checked with the Twilio auth token in this secret (cached by the secret store)."""
        try:
            secret = await self._ports.secrets.get_json(credentials_id)
        except PermanentProviderError as exc:  # no such secret: nothing can authenticate this tenant
            log.error("webhook_tenant_secret_unusable", reason=exc.reason)
            return False
        except ProviderError as exc:
            raise DependencyUnavailable("secretsmanager", "GetSecretValue", exc.reason) from exc
        token = secret.get("twilio_auth_token", "")
        if token and self._ports.signatures.valid(token, request.url, request.params, request.signature):
            return True
        log.warning("webhook_signature_invalid")
        return False

    # ---- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _required(queue_url: str | None, setting: str) -> str:
        if not queue_url:
            raise DependencyUnavailable("sqs", "SendMessage", f"{setting} is not configured")
        return queue_url
