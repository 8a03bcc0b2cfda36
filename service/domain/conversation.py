"""Conversation identity and the statuses a conversation moves through (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ConversationStatus(StrEnum):
    """Every value `conversation_status` may hold; nothing else writes a status string."""

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
