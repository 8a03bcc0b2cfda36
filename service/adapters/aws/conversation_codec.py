"""The stored form of a conversation (SPEC §5): its attribute names, index names, status strings and lease/ledger
fields, read into `ConversationRecord`s and written from domain values.

Each conditional write is made by the one store that sends it (`conversation_claims`, `reply_claims`,
`conversation_lookup`, most through `update_params`; `early_delivery` for the delivery states). The messages
themselves are items of their own (`message_items`); this module only reads the ones older records embed.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

from service.adapters.aws.dynamo_codec import attribute_values, to_attribute
from service.adapters.aws.resources import COMPANY_SHARD, CONVERSATION_INDEXES, Index
from service.domain.claims import RETRIES_EXHAUSTED
from service.domain.company import ai_requests_per_second
from service.domain.conversation import (
    AiProfile,
    ConversationKey,
    ConversationRecord,
    ConversationStatus,
    Failure,
    Lease,
    Message,
    NewConversation,
    ReplyAttempt,
    SendLedger,
    SendState,
    TokenUsage,
)

STATUS = "conversation_status"
MESSAGES = "messages"  # embedded messages of records written before `message_items`; [] in newer ones
MESSAGE_COUNT = "message_count"  # messages recorded (in `message_items`, after any embedded ones)
FIRST_MESSAGE_AT = "first_message_at"  # set: the template message is the record's own ledger (`ledger_message`)
# Answered fragments, a string set older records grow with every reply; now on the user message (`fragment_sids`).
REPLIED_SIDS = "replied_message_sids"
EARLY_DELIVERY = "early_delivery"  # status callbacks kept until their message is recorded (`early_delivery`)
STATUS_NAME = {"#status": STATUS}
# Left out of `shared_fields`: configuration (credentials ids, AI settings) and bookkeeping no hand-off needs.
NOT_SHARED = ("ai_config", "channel_config", EARLY_DELIVERY, COMPANY_SHARD)

GSI_SENDER = {
    "whatsapp": "gsi_company_whatsapp_number",
    "sms": "gsi_company_sms_number",
    "email": "gsi_company_email",
}
INDEX_BY_CHANNEL: dict[str, Index] = {
    channel: next(index for index in CONVERSATION_INDEXES if index.partition_key == attribute)
    for channel, attribute in GSI_SENDER.items()
}
_TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def gsi_recipient(channel: str) -> str:
    return "gsi_recipient_email" if channel == "email" else "gsi_recipient_tel"


def credentials_attribute(channel: str) -> str:
    """The channel's provider secret, inside `channel_config`."""
    return f"{channel}_credentials_id"


# ---- keys ------------------------------------------------------------------------------------------------


def item_fields(key: ConversationKey) -> dict[str, str]:
    return {"primary_channel": key.primary_channel, "conversation_id": key.conversation_id}


def item_key(key: ConversationKey) -> dict[str, Any]:
    return {name: to_attribute(value) for name, value in item_fields(key).items()}


def key_of(item: Mapping[str, Any]) -> ConversationKey:
    return ConversationKey(str(item.get("primary_channel", "")), str(item.get("conversation_id", "")))


# ---- item -> record ----------------------------------------------------------------------------------------


def record_from_item(item: Mapping[str, Any]) -> ConversationRecord:
    """A decoded item as the typed record; tolerant of missing attributes (a record written by
    `record_invalid`, or seeded by hand) and of values it does not know (an unknown status reads as
    failed_unknown)."""
    channel = str(item.get("channel_method", ""))
    status = _status(item.get(STATUS))
    last_reason = item.get("last_failure_reason")
    # Embedded messages: only in records written before each message became its own item (`message_items`).
    embedded = tuple(message_from_element(element) for element in embedded_elements(item))
    return ConversationRecord(
        key=key_of(item),
        status=status,
        channel=channel,
        company_id=str(item.get("company_id", "")),
        project_id=str(item.get("project_id", "")),
        created_at=str(item.get("created_at", "")),
        company_address=_text_or_none(item.get(GSI_SENDER.get(channel, ""))),
        credentials_id=credentials_of(item, channel),
        sends_per_second=pace_of(item),
        ai=_ai_profile(_mapping(item.get("ai_config"))),
        thread_id=_text_or_none(item.get("thread_id")),
        is_open=item.get("task_complete") == 0,
        hand_off_to_human=item.get("hand_off_to_human") is True,
        messages=embedded,
        message_count=max(_int(item.get(MESSAGE_COUNT)), len(embedded)),
        first_message_at=_text_or_none(item.get(FIRST_MESSAGE_AT)),
        claim=_lease(item.get("claim_owner"), item.get("claim_expires_at")),
        ledger=_ledger(item),
        reply_claim=_lease(item.get("reply_owner"), item.get("reply_lease_expires")),
        reply_attempt=_reply_attempt(item.get("reply_attempt")),
        replied_sids=frozenset(str(sid) for sid in item.get(REPLIED_SIDS) or []),
        failure=_failure(item, status),
        early_delivery_sids=frozenset(str(sid) for sid in _mapping(item.get(EARLY_DELIVERY))),
        shared_fields=shared_fields(item),
        updated_at=str(item.get("updated_at", "")),
        last_failure_reason=None if last_reason is None else str(last_reason),
        reopen_count=_int(item.get("reopen_count")),
    )


def embedded_elements(item: Mapping[str, Any]) -> list[Any]:
    """The `messages` a record written before `message_items` holds in itself, as stored (empty for newer ones)."""
    return list(item.get(MESSAGES) or [])


def record_or_none(item: Mapping[str, Any]) -> ConversationRecord | None:
    """The record of an item that may be empty (a refused write's ALL_OLD when there was no record)."""
    return record_from_item(item) if item else None


def credentials_of(item: Mapping[str, Any], channel: str) -> str | None:
    """The credentials id in the item's `channel_config` (None for a record without one)."""
    return _text_or_none(_mapping(item.get("channel_config")).get(credentials_attribute(channel)))


def pace_of(item: Mapping[str, Any]) -> float | None:
    """The sender's pace the project set in the item's `channel_config` (None when it set none)."""
    pace = _mapping(item.get("channel_config")).get("sends_per_second")
    return float(pace) if isinstance(pace, int | float) and not isinstance(pace, bool) and pace > 0 else None


def shared_fields(item: Mapping[str, Any]) -> dict[str, Any]:
    """The stored record without configuration and bookkeeping: what a hand-off carries, operators are shown."""
    return {name: value for name, value in item.items() if name not in NOT_SHARED}


def message_from_element(element: Any) -> Message:
    """One `messages` element; anything that is not a map reads as an empty message (indices stay aligned with
    the stored list, which delivery-state writes address by position)."""
    data = _mapping(element)
    usage = _usage(data) if any(name in data for name in _TOKEN_FIELDS) else None
    delivery = data.get("delivery_status")
    return Message(
        message_id=str(data.get("message_id", "")),
        role=str(data.get("role", "")),
        content=str(data.get("content", "")),
        timestamp=str(data.get("timestamp", "")),
        usage=usage,
        delivery_status=None if delivery is None else str(delivery),
        fragment_sids=tuple(str(sid) for sid in data.get("fragment_sids") or []),
    )


def _status(value: Any) -> ConversationStatus:
    try:
        return ConversationStatus(str(value))
    except ValueError:
        return ConversationStatus.FAILED_UNKNOWN


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _usage(value: Any) -> TokenUsage:
    data = _mapping(value)
    return TokenUsage(*(_int(data.get(name)) for name in _TOKEN_FIELDS))


def _lease(owner: Any, expires_at: Any) -> Lease:
    return Lease(owner=None if owner is None else str(owner), expires_at=float(expires_at or 0))


def _ai_profile(config: Mapping[str, Any]) -> AiProfile:
    reference = config.get("api_key_reference")
    return AiProfile(
        api_key_reference=reference if isinstance(reference, str) else None,
        model=str(config.get("model") or "gpt-4.1-mini"),
        reply_instructions=str(_mapping(config.get("replies")).get("instructions") or ""),
        background=config.get("mode") == "background",
        requests_per_second=ai_requests_per_second(config),
    )


def _ledger(item: Mapping[str, Any]) -> SendLedger:
    try:
        state = SendState(str(item.get("send_state", SendState.NOT_SENT.value)))
    except ValueError:
        state = SendState.NOT_SENT
    generated = item.get("generated_content")
    attempted_at = item.get("send_attempted_at")
    provider_id = item.get("provider_message_id")
    return SendLedger(
        state=state,
        generated={str(k): str(v) for k, v in generated.items()} if isinstance(generated, Mapping) else None,
        usage=_usage(item.get("ai_usage")),
        provider_message_id=None if provider_id is None else str(provider_id),
        attempted_at=float(attempted_at) if isinstance(attempted_at, int | float) else None,
    )


def _reply_attempt(value: Any) -> ReplyAttempt | None:
    """Any stored map is an entry (a send may have gone out); missing parts read as empty."""
    if not isinstance(value, Mapping):
        return None
    return ReplyAttempt(
        message_sids=tuple(str(sid) for sid in value.get("message_sids") or []),
        text=str(value.get("text", "")),
        first_received_at=str(value.get("first_received_at", "")),
        content=str(value.get("content", "")),
        usage=_usage(value.get("usage")),
        thread_id=str(value.get("thread_id", "")),
        attempted_at=float(value.get("attempted_at") or 0),
    )


def _failure(item: Mapping[str, Any], status: ConversationStatus) -> Failure | None:
    """The failure the record holds: its status with `failure_reason` (and `failure_kind`)."""
    if "failure_reason" not in item and "failure_kind" not in item and not status.value.startswith("failed_"):
        return None
    return Failure(
        status=status,
        reason=str(item.get("failure_reason", "")),
        exhausted=item.get("failure_kind") == RETRIES_EXHAUSTED,
    )


# ---- domain -> attributes ------------------------------------------------------------------------------------


def company_shard(company_id: str, conversation_id: str, shards: int) -> str:
    """The per-company index's partition: "<company_id>#<n>", n a stable hash of the conversation id (the same in
    every process and release: crc32, not Python's salted `hash`) modulo the shard count."""
    return f"{company_id}#{zlib.crc32(conversation_id.encode()) % shards}"


def new_conversation_fields(new: NewConversation, stamp: str, shards: int) -> dict[str, Any]:
    """The SPEC §5 initial record (keys and claim excluded), attributes without a value left out; `shards`: the
    per-company index's shard count (`settings.conversation_index_shards`)."""
    recipient = new.recipient
    record: dict[str, Any] = {
        "request_id": new.request_id,
        "channel_method": new.channel,
        "company_id": new.company_id,
        "project_id": new.project_id,
        COMPANY_SHARD: company_shard(new.company_id, new.key.conversation_id, shards),
        "company_name": new.company_name,
        "project_name": new.project_name,
        "company_rep": dict(new.company_rep),
        "recipient_first_name": recipient.get("recipient_first_name"),
        "recipient_last_name": recipient.get("recipient_last_name"),
        "recipient_tel": recipient.get("recipient_tel"),
        "recipient_email": recipient.get("recipient_email"),
        "comms_consent": recipient.get("comms_consent"),
        "project_data": dict(new.project_data),
        "ai_config": None if new.ai_config is None else dict(new.ai_config),
        "channel_config": None if new.channel_config is None else dict(new.channel_config),
        "router_version": new.router_version,
        "processor_version": new.processor_version,
        "trace_id": new.trace_id,
        MESSAGES: [],
        "task_complete": 0,
        "hand_off_to_human": False,
        "send_state": SendState.NOT_SENT.value,
        "created_at": stamp,
        GSI_SENDER[new.channel]: new.company_address,
        gsi_recipient(new.channel): new.key.primary_channel,
    }
    return {name: value for name, value in record.items() if value is not None}


def message_element(message: Message) -> dict[str, Any]:
    """A `messages` element (SPEC §5): token counts flat on the element, the delivery state when known."""
    element: dict[str, Any] = {
        "message_id": message.message_id,
        "timestamp": message.timestamp,
        "role": message.role,
        "content": message.content,
    }
    if message.usage is not None:
        element.update(usage_fields(message.usage))
    if message.delivery_status is not None:
        element["delivery_status"] = message.delivery_status
    if message.fragment_sids:
        element["fragment_sids"] = list(message.fragment_sids)
    return element


def usage_fields(usage: TokenUsage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def reply_attempt_fields(attempt: ReplyAttempt) -> dict[str, Any]:
    return {
        "message_sids": list(attempt.message_sids),
        "text": attempt.text,
        "first_received_at": attempt.first_received_at,
        "content": attempt.content,
        "usage": usage_fields(attempt.usage),
        "thread_id": attempt.thread_id,
        "attempted_at": attempt.attempted_at,
    }


def created_item(new: NewConversation, owner: str, lease_until: float, stamp: str, shards: int) -> dict[str, Any]:
    """The record a first claim creates: the initial record, PROCESSING, claimed by `owner`."""
    claim = {
        STATUS: ConversationStatus.PROCESSING.value,
        "claim_owner": owner,
        "claim_expires_at": lease_until,
        "updated_at": stamp,
        "claim_count": 1,
    }
    return {**new_conversation_fields(new, stamp, shards), **item_fields(new.key), **claim}


def update_params(
    table: str,
    key: ConversationKey,
    update: str,
    condition: str,
    values: Mapping[str, Any],
    names: Mapping[str, str] = STATUS_NAME,
) -> dict[str, Any]:
    """One conditional UpdateItem on a conversation."""
    return {
        "TableName": table,
        "Key": item_key(key),
        "UpdateExpression": update,
        "ConditionExpression": condition,
        "ExpressionAttributeNames": dict(names),
        "ExpressionAttributeValues": attribute_values(values),
    }
