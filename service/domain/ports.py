"""Every port the domain and the consumers need from the outside world, in one place. Adapters implement them;
tests/fakes.py implements each in memory.

Stores raise `DependencyUnavailable` when AWS cannot answer; provider ports raise only the exceptions of
`service.domain.provider_ports`. Claims follow `service.domain.claims`: one conditional write that, when
refused, returns the record that refused it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from service.domain.claims import Claim, RequestRecord
from service.domain.company import CompanyRecord
from service.domain.conversation import (
    ConversationKey,
    ConversationRecord,
    Failure,
    Message,
    NewConversation,
    ReplyAttempt,
    TemplateDraft,
)
from service.domain.delivery_state import DeliveryStatus
from service.domain.inbound import Fragment
from service.domain.provider_ports import AiRequest, AiResult, OutboundMessage, SentMessage
from service.domain.rate_limit import Grant, RateLimit

DraftT_contra = TypeVar("DraftT_contra", contravariant=True)

# ---- tenants and requests ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key_id: str
    secret_hash: str
    company_id: str
    project_id: str
    status: str  # "active" | "revoked"

    @property
    def is_active(self) -> bool:
        return self.status == "active"


class CompanyDirectory(Protocol):
    async def get(self, company_id: str, project_id: str) -> CompanyRecord | None: ...


class ApiKeyStore(Protocol):
    async def find(self, key_id: str) -> ApiKeyRecord | None: ...


class OptOutRegistry(Protocol):
    """The per-project, per-channel suppression list: read on every initiate and reply, never cached."""

    async def is_opted_out(self, company_id: str, project_id: str, channel: str, recipient: str) -> bool: ...

    async def opt_out(self, company_id: str, project_id: str, channel: str, recipient: str, at: str) -> None: ...

    async def opt_in(self, company_id: str, project_id: str, channel: str, recipient: str) -> None: ...


class RequestLedger(Protocol):
    async def claim(self, record: RequestRecord, now: float) -> RequestRecord | None:
        """Write `record` if `decide_request` would TAKE; None on success, else the record that refused it."""
        ...

    async def read(self, key: str) -> RequestRecord | None:
        """The record as of now (a strongly consistent read), or None."""
        ...

    async def complete(self, key: str, queue_timestamp: str) -> None: ...

    async def release(self, key: str) -> None: ...


class TokenLeases(Protocol):
    """The rate-limit buckets every api replica shares (`rate_limit.take_tokens` rules, one per key)."""

    async def lease(self, key: str, limit: RateLimit, wanted: int, now: float) -> Grant:
        """Take up to `wanted` tokens from `key`'s bucket at `now` (epoch seconds): what was granted, or none and
        when one is due."""
        ...

    async def hold_off(self, key: str, limit: RateLimit, until: float) -> None:
        """Grant no token of `key`'s bucket before `until` (epoch seconds); a bucket already further on is kept."""
        ...


class MessagePublisher(Protocol):
    async def publish(
        self, queue_url: str, body: str, attributes: dict[str, str], *, delay_s: int = 0, group: str | None = None
    ) -> str:
        """Put one message on a queue (visible after `delay_s`, at most 900) and return its message id. `group` is
        the tenant (`company.tenant_group`): SQS fair queues share the consumers out by it."""
        ...


# ---- outside services ----------------------------------------------------------------------------


class SecretStore(Protocol):
    async def get_json(self, secret_id: str) -> dict[str, str]:
        """The secret's JSON object (cached with a TTL). PermanentProviderError if it does not exist or is not a
        JSON object of strings; TransientProviderError when Secrets Manager is unavailable."""
        ...


class AiWriter(Protocol):
    async def write(self, request: AiRequest) -> AiResult:
        """A JSON object with exactly `output_keys` (string values), continuing from `request.thread_id`; the
        result's `thread_id` is what the conversation stores for the next exchange. Retries transient errors
        within `timeout_s`, then raises TransientProviderError; PermanentProviderError for 4xx other than
        408/409/429 and for an answer that is not a JSON object with the requested keys."""
        ...


class MessageSender(Protocol):
    async def send(self, message: OutboundMessage) -> SentMessage:
        """Send once (never retried inside: a retry could send twice). Raises PermanentProviderError,
        TransientProviderError (certainly not sent) or SendOutcomeUnknown (may have been sent)."""
        ...

    async def find_sent(self, message: OutboundMessage, since_epoch_s: float) -> SentMessage | None:
        """The provider's record of this message sent since `since_epoch_s`, or None when it has none.
        TransientProviderError when it cannot tell; PermanentProviderError when it offers no way to look."""
        ...


class SignatureVerifier(Protocol):
    def valid(self, auth_token: str, url: str, params: Mapping[str, str], signature: str) -> bool: ...


# ---- conversation claims (the consumers) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimAnswer:
    """A claim's verdict and the record: as claimed (TAKE), or as it refused the claim (None when absent)."""

    verdict: Claim
    record: ConversationRecord | None


class ClaimedWorkStore(Protocol[DraftT_contra]):
    """What the claimed-work skeleton does to a conversation it holds; every write applies only while `owner`
    still holds the claim and answers False when it does not (the skeleton then stops)."""

    async def refresh(self, key: ConversationKey, owner: str, lease_until: float) -> bool: ...

    async def release(self, key: ConversationKey, owner: str) -> bool:
        """Let the lease lapse at once, so a retry finds the conversation claimable."""
        ...

    async def record_attempt(self, key: ConversationKey, owner: str, draft: DraftT_contra) -> bool:
        """The ledger entry, written before the provider is called; False: the claim was lost, do not send."""
        ...

    async def clear_attempt(self, key: ConversationKey, owner: str) -> bool:
        """The provider certainly did not send: a later attempt may send without reconciling."""
        ...

    async def fail(self, key: ConversationKey, owner: str, failure: Failure) -> bool:
        """Record the failure (permanent, or retries exhausted) and drop the claim."""
        ...


class ConversationClaims(ClaimedWorkStore[TemplateDraft], Protocol):
    """The template sender's side of the conversations table (`claims.decide_conversation`)."""

    async def claim(self, new: NewConversation, owner: str, lease_until: float, now: float) -> ClaimAnswer: ...

    async def finalise(self, key: ConversationKey, message: Message, thread_id: str, processing_time_ms: int) -> bool:
        """initial_message_sent, the message appended, the ledger SENT: once (False: already finalised).
        Not conditioned on the claim: a send that happened is recorded whoever holds the conversation."""
        ...

    async def record_invalid(self, key: ConversationKey, reason: str) -> None:
        """A context too malformed to process, but naming its conversation: record why (once)."""
        ...


class ReplyClaims(ClaimedWorkStore[ReplyAttempt], Protocol):
    """The reply sender's side of the conversations table (`claims.decide_reply`)."""

    async def claim(self, key: ConversationKey, owner: str, lease_until: float, now: float) -> ClaimAnswer: ...

    async def finish_unanswered(self, key: ConversationKey, owner: str) -> bool:
        """Nothing to answer: back to the status the conversation had before the claim."""
        ...

    async def finalise(
        self,
        key: ConversationKey,
        owner: str,
        messages: Sequence[Message],
        answered_sids: Sequence[str],
        thread_id: str,
        processing_time_ms: int,
        *,
        claimed: ConversationRecord,
    ) -> ConversationRecord | None:
        """reply_sent, the messages appended (at `claimed.recorded_messages` on: `claimed` is the record as the
        claim read it), the fragments marked answered, `thread_id` (the AI continuation the next reply chains from)
        stored, the claim dropped. Retried (or redone by a takeover) it records each message once.
        An opt-out or hand-off that landed while sending keeps its status (the reply is still recorded).
        None when `owner` no longer holds the claim (a takeover reconciles and finalises)."""
        ...

    async def recent_messages(self, record: ConversationRecord, limit: int) -> tuple[Message, ...]:
        """The newest `limit` messages `record` has recorded, oldest first: a reply's context and the fragments
        they answered. Delivery states may be left out (the template message's is not read)."""
        ...


# ---- replies intake (webhooks) ----------------------------------------------------------------------


class ConversationLookup(Protocol):
    """The intake's side of the conversations table: look-ups by our address + the sender, and the writes
    webhooks make."""

    async def tenant_credentials(self, channel: str, company_address: str) -> tuple[str, ...]:
        """The distinct credentials ids the conversations of this company address name (cached briefly)."""
        ...

    async def find_open(self, channel: str, company_address: str, sender: str) -> ConversationRecord | None:
        """The newest open conversation between the pair, or None."""
        ...

    async def conversations_between(
        self, channel: str, company_address: str, sender: str
    ) -> list[ConversationRecord]: ...

    async def mark_opted_out(self, key: ConversationKey) -> None: ...

    async def mark_opted_in(self, key: ConversationKey) -> None:
        """Back to answerable after START/UNSTOP (only if it was opted out)."""
        ...

    async def mark_handed_off(self, key: ConversationKey, reason: str) -> None: ...

    async def recent_messages(self, record: ConversationRecord, limit: int) -> tuple[Message, ...]:
        """The newest `limit` messages `record` has recorded, oldest first."""
        ...

    async def find_message(self, record: ConversationRecord, message_sid: str) -> tuple[int, Message] | None:
        """The message of this conversation with this provider id and its position (read consistently, newest
        first: a status callback is about a recent message), or None."""
        ...

    async def set_delivery_status(
        self, record: ConversationRecord, index: int, message_sid: str, new: DeliveryStatus
    ) -> bool:
        """Message `index` of `record` (its position, `find_message`), forward-only (`delivery_state.may_follow`):
        False when the stored state is already later."""
        ...

    async def hold_delivery_status(self, key: ConversationKey, message_sid: str, new: DeliveryStatus) -> bool:
        """Keep a callback for a message not recorded yet until the final update that records it applies it."""
        ...


class ReplyStage(Protocol):
    """Staged reply fragments and the per-conversation trigger lock (`claims.decide_trigger_lock`)."""

    async def stage(self, key: ConversationKey, fragment: Fragment, expires_at: int) -> bool:
        """Store the fragment; False when this MessageSid was already staged (a webhook retry)."""
        ...

    async def staged(self, conversation_id: str) -> list[Fragment]:
        """Every staged fragment (strongly consistent)."""
        ...

    async def delete_staged(self, conversation_id: str, message_sids: Sequence[str]) -> None: ...

    async def finish_window(self, conversation_id: str, message_sids: Sequence[str]) -> None:
        """Delete these fragments (answered, or not to be answered) and the trigger lock, in one request."""
        ...

    async def take_lock(self, conversation_id: str, holder: str, now: float, expires_at: int) -> bool: ...

    async def mark_queued(self, conversation_id: str, holder: str) -> None: ...

    async def release_lock(self, conversation_id: str, holder: str | None = None) -> None:
        """Drop the lock (only `holder`'s, when given)."""
        ...
