"""Inbound replies (SPEC §7): what a webhook carries and the rules that decide what happens to it.

Pure functions only: keyword handling, hand-off routing, fragment ordering and the batch a
reply answers. The intake (`inbound_intake`) and the reply processor apply them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from service.domain.company import CompanyRecord
from service.domain.conversation import ConversationRecord, ConversationStatus

OPT_OUT_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
OPT_IN_WORDS = frozenset({"START", "UNSTOP"})
OPT_IN_IF_SUPPRESSED = frozenset({"YES"})  # an ordinary answer unless the sender is suppressed


class Keyword(StrEnum):
    OPT_OUT = "opt_out"
    OPT_IN = "opt_in"


class InboundMessage(BaseModel):
    """One Twilio webhook POST, addresses without their `whatsapp:` prefix."""

    model_config = ConfigDict(frozen=True)

    channel: str
    message_sid: str = Field(min_length=1, max_length=64)
    sender: str = Field(min_length=1, max_length=320)  # Twilio `From`: the recipient of our first message
    company_address: str = Field(min_length=1, max_length=320)  # Twilio `To`: our number
    body: str = Field(default="", max_length=20_000)
    account_sid: str | None = None


class InvalidInbound(ValueError):
    """A webhook without the fields every Twilio message webhook carries."""


def bare_address(address: str) -> str:
    """`whatsapp:+447...` → `+447...`; other addresses unchanged (trimmed)."""
    address = address.strip()
    return address.removeprefix("whatsapp:") if address.startswith("whatsapp:") else address


def inbound_from_form(channel: str, form: Mapping[str, str]) -> InboundMessage:
    sid = form.get("MessageSid") or form.get("SmsMessageSid") or ""
    sender, to = form.get("From") or "", form.get("To") or ""
    if not sid or not sender or not to:
        raise InvalidInbound("MessageSid, From and To are required")
    return InboundMessage(
        channel=channel,
        message_sid=sid,
        sender=bare_address(sender),
        company_address=bare_address(to),
        body=form.get("Body") or "",
        account_sid=form.get("AccountSid"),
    )


def keyword_of(body: str, *, suppressed: bool) -> Keyword | None:
    """The opt-out/opt-in keyword the whole message is (trimmed, any case), or None."""
    word = body.strip().upper()
    if word in OPT_OUT_WORDS:
        return Keyword.OPT_OUT
    if word in OPT_IN_WORDS or (suppressed and word in OPT_IN_IF_SUPPRESSED):
        return Keyword.OPT_IN
    return None


def needs_suppression_list(body: str, conversation: ConversationRecord, hand_off: str | None) -> bool:
    """Whether the intake must read the suppression list before acting on this message: only where the answer
    changes what the intake itself does. YES opts in only a suppressed sender; a suppressed sender's message is
    not handed to a human; a conversation marked opted out usually means a suppressed sender (nothing staged).

    An ordinary message to an ordinary conversation is staged either way: the reply consumer reads the list before
    the AI is asked (a STOP may come during the window anyway), so a suppressed sender is still never answered.
    """
    return (
        hand_off is not None
        or conversation.status is ConversationStatus.OPTED_OUT
        or body.strip().upper() in OPT_IN_IF_SUPPRESSED
    )


def hand_off_reason(conversation: ConversationRecord, company: CompanyRecord, sender: str) -> str | None:
    """Why this reply goes to a human instead of the AI (SPEC §7 step 5), or None. Once handed off, a
    conversation's later replies follow."""
    if conversation.status is ConversationStatus.HANDED_OFF:
        return "conversation_handed_off"
    if conversation.hand_off_to_human:
        return "conversation_flagged"
    if company.auto_queue_reply_message:
        return "project_auto_queue"
    listed = [*company.auto_queue_reply_message_from_number, *company.auto_queue_reply_message_from_email]
    if sender.lower() in {item.strip().lower() for item in listed}:
        return "sender_auto_queue"
    return None


# ---- batching --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fragment:
    message_sid: str
    body: str
    received_at: str  # ISO UTC with ms: sorts as text


@dataclass(frozen=True, slots=True)
class Batch:
    """The fragments one reply answers, in the order they were received."""

    fragments: tuple[Fragment, ...]

    @property
    def message_sids(self) -> list[str]:
        return [f.message_sid for f in self.fragments]

    @property
    def first_sid(self) -> str:
        return self.fragments[0].message_sid

    @property
    def text(self) -> str:
        return "\n".join(f.body for f in self.fragments)

    @property
    def key(self) -> str:
        """Identifies the batch across redeliveries: the same fragments give the same key."""
        return hashlib.sha256("\n".join(sorted(self.message_sids)).encode()).hexdigest()[:32]


def batch_of(staged: Iterable[Fragment], already_answered: Sequence[str] = (), only: Sequence[str] = ()) -> Batch:
    """Unanswered fragments ordered by (received_at, message_sid); restricted to `only` when given.

    `only` is the batch of an attempt that may already have been sent: it is finished first, exactly,
    and fragments that arrived after it wait for the next reply.
    """
    answered = set(already_answered)
    chosen = [f for f in staged if f.message_sid not in answered and (not only or f.message_sid in only)]
    return Batch(tuple(sorted(chosen, key=lambda f: (f.received_at, f.message_sid))))
