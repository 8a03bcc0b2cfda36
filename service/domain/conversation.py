"""The conversation (SPEC §5) as the domain sees it: identity, statuses and the typed record.

Only the DynamoDB adapter (`service.adapters.aws.conversation_codec` and the stores built on it) knows how a
record is stored: attribute names, index names, lease fields; the status values are defined here, once.
Everything else reads and writes these types (tests/test_architecture.py holds every other module to that).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import orjson


class ConversationStatus(StrEnum):
    """Every value a conversation's status may hold; nothing else writes a status string."""

    INITIATED = "initiated"  # only in the queue message: accepted, not yet claimed
    PROCESSING = "processing"
    INITIAL_MESSAGE_SENT = "initial_message_sent"
    PROCESSING_REPLY = "processing_reply"
    REPLY_SENT = "reply_sent"
    HANDED_OFF = "handed_off"
    OPTED_OUT = "opted_out"
    FAILED_SECRETS_FETCH = "failed_secrets_fetch"
    FAILED_TO_PROCESS_AI = "failed_to_process_ai"
    FAILED_TO_SEND_MESSAGE = "failed_to_send_message"
    FAILED_INVALID_CONTEXT = "failed_invalid_context"
    FAILED_UNKNOWN = "failed_unknown"


class SendState(StrEnum):
    """The template send ledger: written before the provider is called and after it answered."""

    NOT_SENT = "not_sent"
    ATTEMPTING = "attempting"
    SENT = "sent"


def conversation_component(channel: str, sender_address: str) -> str:
    """The last part of a conversation id: the company number without '+', or the company email."""
    return sender_address if channel == "email" else sender_address.lstrip("+")


def conversation_id(company_id: str, project_id: str, request_id: str, channel: str, sender_address: str) -> str:
    """`company_id#project_id#request_id#<component>` as SPEC §2 defines it."""
    return f"{company_id}#{project_id}#{request_id}#{conversation_component(channel, sender_address)}"


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """The conversations table key: `primary_channel` (recipient tel or email) + `conversation_id`."""

    primary_channel: str
    conversation_id: str


@dataclass(frozen=True, slots=True)
class Lease:
    """Who holds a record and until when (epoch seconds): the one lease shape of every claim (request,
    conversation, reply, trigger lock). A lease whose `expires_at` has passed may be taken over."""

    owner: str | None = None
    expires_at: float = 0.0

    def is_live(self, now: float) -> bool:
        return self.expires_at > now

    def wait_s(self, now: float) -> int:
        """Whole seconds until it lapses, at least 1 (a retry delay)."""
        return max(1, math.ceil(self.expires_at - now))


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Message:
    """One element of the conversation's messages (SPEC §5)."""

    message_id: str
    role: str  # "assistant" | "user"
    content: str
    timestamp: str
    usage: TokenUsage | None = None
    delivery_status: str | None = None
    fragment_sids: tuple[str, ...] = ()  # a user message: the staged fragments it joined (answered by the next)


def content_text(channel: str, content: Mapping[str, str]) -> str:
    """The template message as the conversation records it (from the content generated for the channel; content
    without the channel's fields, which only a hand-edited record can hold, reads as its JSON)."""
    if channel == "sms" and "body" in content:
        return content["body"]
    if channel == "email" and "subject" in content and "body" in content:
        return f"{content['subject']}\n\n{content['body']}"
    return orjson.dumps(dict(content)).decode()


def answered_fragments(record: ConversationRecord, messages: Iterable[Message]) -> frozenset[str]:
    """The fragments known answered: those `messages` (the conversation's newest) joined, and those an older record
    lists itself (`replied_sids`, no longer written: it grew with every reply)."""
    return record.replied_sids | frozenset(sid for message in messages for sid in message.fragment_sids)


def message_view(message: Message) -> dict[str, Any]:
    """A message as JSON for people (a hand-off, an operator): token counts flat, unknown parts left out."""
    view: dict[str, Any] = {
        "message_id": message.message_id,
        "timestamp": message.timestamp,
        "role": message.role,
        "content": message.content,
    }
    if message.usage is not None:
        view.update(
            prompt_tokens=message.usage.prompt_tokens,
            completion_tokens=message.usage.completion_tokens,
            total_tokens=message.usage.total_tokens,
        )
    if message.delivery_status is not None:
        view["delivery_status"] = message.delivery_status
    return view


@dataclass(frozen=True, slots=True)
class SendLedger:
    """The one template send: what was generated (so a redelivery sends the same text, no second AI call),
    whether the provider was called, and what it answered."""

    state: SendState = SendState.NOT_SENT
    generated: Mapping[str, str] | None = None
    usage: TokenUsage = field(default_factory=TokenUsage)
    provider_message_id: str | None = None
    attempted_at: float | None = None


@dataclass(frozen=True, slots=True)
class TemplateDraft:
    """The template's ledger entry: the content generated, written (ATTEMPTING) before the provider is called."""

    thread_id: str
    content: Mapping[str, str]  # the template variables, or the SMS body, or the email subject and body
    usage: TokenUsage
    attempted_at: float

    def attempted_again(self, at: float) -> TemplateDraft:
        """The same content, attempted anew at `at` (a reconcile found the earlier attempt never sent)."""
        return replace(self, attempted_at=at)


@dataclass(frozen=True, slots=True)
class ReplyAttempt:
    """The reply ledger entry: what was about to be sent, for which fragments, written before sending."""

    message_sids: tuple[str, ...]
    text: str
    first_received_at: str
    content: str
    usage: TokenUsage
    thread_id: str
    attempted_at: float

    def attempted_again(self, at: float) -> ReplyAttempt:
        """The same reply, attempted anew at `at` (a reconcile found the earlier attempt never sent)."""
        return replace(self, attempted_at=at)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a conversation failed: its failed_* status, the reason recorded, and whether retries ran out on a
    transient failure (then `comms dlq redrive` may reopen it)."""

    status: ConversationStatus
    reason: str
    exhausted: bool = False


@dataclass(frozen=True, slots=True)
class AiProfile:
    """The channel's AI settings a reply needs (the project's ai_config, copied into the record)."""

    api_key_reference: str | None = None
    model: str = "gpt-4.1-mini"
    reply_instructions: str = ""
    background: bool = False
    requests_per_second: float | None = None  # the project's pace for this key (None: the default)


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    """One conversation as stored, typed. `shared_fields` is the stored record without configuration and
    bookkeeping: what a hand-off carries to a human and what operators are shown."""

    key: ConversationKey
    status: ConversationStatus
    channel: str
    company_id: str
    project_id: str
    created_at: str = ""
    company_address: str | None = None  # our number or email on the channel
    credentials_id: str | None = None  # the channel's provider secret
    sends_per_second: float | None = None  # the project's pace for its sender on this channel (None: default)
    ai: AiProfile = field(default_factory=AiProfile)
    thread_id: str | None = None
    is_open: bool = True  # task_complete = 0
    hand_off_to_human: bool = False
    # The messages read with the record: none from the conversations table today (each message is its own item,
    # read through the stores' `recent_messages`), only those a record written before that embedded. A reader that
    # needs the messages asks the store; `message_count` says how many are recorded (the next one's position).
    messages: tuple[Message, ...] = ()
    message_count: int = 0
    # When the template message was recorded, if the record itself holds it (`ledger_message`): set by the
    # template's final update, which then writes no item for it (the ledger already has the content, its usage and
    # its provider id). None: recorded as message 0's item or embedded (records written before), or not yet sent.
    first_message_at: str | None = None
    claim: Lease = field(default_factory=Lease)  # the template sender's
    ledger: SendLedger = field(default_factory=SendLedger)
    reply_claim: Lease = field(default_factory=Lease)
    reply_attempt: ReplyAttempt | None = None
    replied_sids: frozenset[str] = frozenset()  # older records only (`answered_fragments`)
    failure: Failure | None = None
    early_delivery_sids: frozenset[str] = frozenset()  # status callbacks kept until their message is recorded
    shared_fields: Mapping[str, Any] = field(default_factory=dict)
    updated_at: str = ""
    # `comms dlq redrive` bookkeeping: the reason a reopen cleared, and how often it was reopened (0: never)
    last_failure_reason: str | None = None
    reopen_count: int = 0

    @property
    def awaits_final_update(self) -> bool:
        """A send may have gone out that the record does not show yet."""
        return self.ledger.state is SendState.ATTEMPTING or self.reply_attempt is not None

    @property
    def recorded_messages(self) -> int:
        """How many messages the conversation has recorded: the position its next message takes."""
        return max(self.message_count, len(self.messages))

    @property
    def ledger_message(self) -> Message | None:
        """The template message (position 0) when the record holds it: the ledger's content, usage and provider
        id, recorded at `first_message_at` (its delivery state is kept apart, in the store)."""
        ledger = self.ledger
        if self.first_message_at is None or ledger.provider_message_id is None or ledger.generated is None:
            return None
        content = content_text(self.channel, ledger.generated)
        return Message(ledger.provider_message_id, "assistant", content, self.first_message_at, ledger.usage)

    def holds_message(self, message_id: str) -> bool:
        """Whether the message with this provider id is the record's own template message (`ledger_message`)."""
        first = self.ledger_message
        return first is not None and first.message_id == message_id

    def message_index(self, message_id: str) -> int | None:
        for index, message in enumerate(self.messages):
            if message.message_id == message_id:
                return index
        return None


@dataclass(frozen=True, slots=True)
class NewConversation:
    """The initial record the template sender creates on its first claim (SPEC §5)."""

    key: ConversationKey
    request_id: str
    channel: str
    company_id: str
    project_id: str
    company_address: str  # our number or email: with the recipient, the replies look-up key
    company_name: str = ""
    project_name: str = ""
    company_rep: Mapping[str, Any] = field(default_factory=dict)
    recipient: Mapping[str, Any] = field(default_factory=dict)  # recipient_data as the caller sent it
    project_data: Mapping[str, Any] = field(default_factory=dict)
    ai_config: Mapping[str, Any] | None = None  # the channel's openai_config
    channel_config: Mapping[str, Any] | None = None  # the channel's channel_config
    router_version: str = ""
    processor_version: str = ""
    trace_id: str = ""
