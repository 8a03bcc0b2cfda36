"""The stored form of a conversation (SPEC §5): the one module that knows the conversations table's attribute
names, index names, status strings and lease/ledger fields.

It turns items into `ConversationRecord`s and domain values into attributes, and builds every conditional
write the claims and the intake make; `conversation_claims`, `reply_claims` and `conversation_lookup` only send
them (`early_delivery` owns the delivery-state writes on `messages`). The claim conditions mirror the TAKE rows
of `service.domain.claims`, whose functions judge what a refusing record means.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.adapters.aws.dynamo_codec import attribute_values, to_attribute
from service.adapters.aws.resources import CONVERSATION_INDEXES, Index
from service.domain.claims import EXHAUSTIBLE_STATUSES, RETRIES_EXHAUSTED, Claim, decide_conversation, may_reopen
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
    TemplateDraft,
    TokenUsage,
)

STATUS = "conversation_status"
MESSAGES = "messages"
EARLY_DELIVERY = "early_delivery"  # status callbacks kept until their message is recorded (`early_delivery`)
STATUS_NAME = {"#status": STATUS}
# Left out of `shared_fields`: configuration (credentials ids, AI settings) and bookkeeping no hand-off needs.
NOT_SHARED = ("ai_config", "channel_config", EARLY_DELIVERY)

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
    channel_config = _mapping(item.get("channel_config"))
    credentials = channel_config.get(credentials_attribute(channel))
    status = _status(item.get(STATUS))
    reopen_count = item.get("reopen_count")
    last_reason = item.get("last_failure_reason")
    return ConversationRecord(
        key=key_of(item),
        status=status,
        channel=channel,
        company_id=str(item.get("company_id", "")),
        project_id=str(item.get("project_id", "")),
        created_at=str(item.get("created_at", "")),
        company_address=_text_or_none(item.get(GSI_SENDER.get(channel, ""))),
        credentials_id=_text_or_none(credentials),
        ai=_ai_profile(_mapping(item.get("ai_config"))),
        thread_id=_text_or_none(item.get("thread_id")),
        is_open=item.get("task_complete") == 0,
        hand_off_to_human=bool(item.get("hand_off_to_human")),
        messages=tuple(message_from_element(element) for element in item.get(MESSAGES) or []),
        claim=_lease(item.get("claim_owner"), item.get("claim_expires_at")),
        ledger=_ledger(item),
        reply_claim=_lease(item.get("reply_owner"), item.get("reply_lease_expires")),
        reply_attempt=_reply_attempt(item.get("reply_attempt")),
        replied_sids=frozenset(str(sid) for sid in item.get("replied_message_sids") or []),
        failure=_failure(item, status),
        early_delivery_sids=frozenset(str(sid) for sid in _mapping(item.get(EARLY_DELIVERY))),
        shared_fields=shared_fields(item),
        updated_at=str(item.get("updated_at", "")),
        last_failure_reason=None if last_reason is None else str(last_reason),
        reopen_count=int(reopen_count) if isinstance(reopen_count, int | float) else 0,
    )


def record_or_none(item: Mapping[str, Any]) -> ConversationRecord | None:
    """The record of an item that may be empty (a refused write's ALL_OLD when there was no record)."""
    return record_from_item(item) if item else None


def shared_fields(item: Mapping[str, Any]) -> dict[str, Any]:
    """The stored record without configuration and bookkeeping: what a hand-off carries, operators are shown."""
    return {name: value for name, value in item.items() if name not in NOT_SHARED}


def message_from_element(element: Any) -> Message:
    """One `messages` element; anything that is not a map reads as an empty message (indices stay aligned with
    the stored list, which delivery-state writes address by position)."""
    data = _mapping(element)
    usage = TokenUsage(*(_int(data.get(name)) for name in _TOKEN_FIELDS)) if _has_tokens(data) else None
    delivery = data.get("delivery_status")
    return Message(
        message_id=str(data.get("message_id", "")),
        role=str(data.get("role", "")),
        content=str(data.get("content", "")),
        timestamp=str(data.get("timestamp", "")),
        usage=usage,
        delivery_status=None if delivery is None else str(delivery),
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


def _has_tokens(data: Mapping[str, Any]) -> bool:
    return any(name in data for name in _TOKEN_FIELDS)


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


def new_conversation_fields(new: NewConversation, stamp: str) -> dict[str, Any]:
    """The SPEC §5 initial record (keys and claim excluded), attributes without a value left out."""
    recipient = new.recipient
    record: dict[str, Any] = {
        "request_id": new.request_id,
        "channel_method": new.channel,
        "company_id": new.company_id,
        "project_id": new.project_id,
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


def message_ids(messages: Iterable[Message]) -> list[str]:
    """The provider ids of the messages a final update appends (where early callbacks may be waiting)."""
    return [message.message_id for message in messages if message.message_id]


# ---- writes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Write:
    """One conditional UpdateItem on a conversation."""

    update: str
    condition: str
    values: Mapping[str, Any]
    names: Mapping[str, str] = field(default_factory=lambda: dict(STATUS_NAME))

    def params(self, table: str, key: ConversationKey) -> dict[str, Any]:
        return {
            "TableName": table,
            "Key": item_key(key),
            "UpdateExpression": self.update,
            "ConditionExpression": self.condition,
            "ExpressionAttributeNames": dict(self.names),
            "ExpressionAttributeValues": attribute_values(self.values),
        }


# Template sender (`claims.decide_conversation`): absent, or PROCESSING with a lapsed claim, may be taken.
CREATE_CONDITION = "attribute_not_exists(conversation_id)"
_CLAIMABLE = "attribute_not_exists(conversation_id) OR (#status = :processing AND claim_expires_at <= :now)"
_OWNED = "claim_owner = :owner AND #status = :processing"


def created_item(new: NewConversation, owner: str, lease_until: float, stamp: str) -> dict[str, Any]:
    """The record a first claim creates: the initial record, PROCESSING, claimed by `owner`."""
    claim = {
        STATUS: ConversationStatus.PROCESSING.value,
        "claim_owner": owner,
        "claim_expires_at": lease_until,
        "updated_at": stamp,
        "claim_count": 1,
    }
    return {**new_conversation_fields(new, stamp), **item_fields(new.key), **claim}


def may_take_over(record: ConversationRecord, now: float) -> bool:
    """What `_CLAIMABLE` lets a takeover write through, for a record that exists (the pure rule, mirrored)."""
    return decide_conversation(record, now) is Claim.TAKE


def take_over(owner: str, lease_until: float, now: float, stamp: str) -> Write:
    """Take a lapsed claim: only the claim fields change; the record keeps its ledger and content."""
    return Write(
        "SET #status = :processing, claim_owner = :owner, claim_expires_at = :lease, updated_at = :stamp, "
        "claim_count = if_not_exists(claim_count, :zero) + :one",
        _CLAIMABLE,
        {
            ":processing": ConversationStatus.PROCESSING.value,
            ":owner": owner,
            ":lease": lease_until,
            ":now": now,
            ":stamp": stamp,
            ":zero": 0,
            ":one": 1,
        },
    )


def _claim_owned(update: str, owner: str, values: Mapping[str, Any]) -> Write:
    """Applies only while `owner` still holds the template claim."""
    return Write(update, _OWNED, {":owner": owner, ":processing": ConversationStatus.PROCESSING.value, **values})


def refresh_claim(owner: str, lease_until: float) -> Write:
    """Extend the claim; `lease_until` 0 releases it (a retry then finds it lapsed)."""
    return _claim_owned("SET claim_expires_at = :lease", owner, {":lease": lease_until})


def record_draft(owner: str, draft: TemplateDraft, stamp: str) -> Write:
    return _claim_owned(
        "SET send_state = :attempting, send_attempted_at = :at, thread_id = :thread, "
        "generated_content = :generated, ai_usage = :usage, updated_at = :stamp",
        owner,
        {
            ":attempting": SendState.ATTEMPTING.value,
            ":at": draft.attempted_at,
            ":thread": draft.thread_id,
            ":generated": dict(draft.content),
            ":usage": usage_fields(draft.usage),
            ":stamp": stamp,
        },
    )


def clear_draft(owner: str, stamp: str) -> Write:
    values = {":not_sent": SendState.NOT_SENT.value, ":stamp": stamp}
    return _claim_owned("SET send_state = :not_sent, updated_at = :stamp", owner, values)


def fail_claim(owner: str, failure: Failure, stamp: str) -> Write:
    """Failed for good, or (exhausted) marked `failure_kind` so `comms dlq redrive` may reopen it; the send
    ledger is left exactly as it is either way."""
    values: dict[str, Any] = {":failed": failure.status.value, ":reason": failure.reason, ":zero": 0, ":stamp": stamp}
    if not failure.exhausted:
        update = "SET #status = :failed, failure_reason = :reason, claim_expires_at = :zero, updated_at = :stamp"
        return _claim_owned(update, owner, values)
    update = (
        "SET #status = :failed, failure_reason = :reason, failure_kind = :kind, claim_expires_at = :zero, "
        "updated_at = :stamp"
    )
    return _claim_owned(update, owner, {**values, ":kind": RETRIES_EXHAUSTED})


def finalise_template(message: Message, thread_id: str, processing_time_ms: int, stamp: str) -> Write:
    """INITIAL_MESSAGE_SENT, the message appended, the ledger SENT: once (refused when already SENT)."""
    return Write(
        "SET #status = :sent_status, send_state = :sent, provider_message_id = :sid, thread_id = :thread, "
        "#messages = list_append(if_not_exists(#messages, :empty), :message), processing_time_ms = :ms, "
        "task_complete = :zero, claim_expires_at = :zero, updated_at = :stamp",
        "attribute_exists(conversation_id) AND send_state <> :sent",
        {
            ":sent_status": ConversationStatus.INITIAL_MESSAGE_SENT.value,
            ":sent": SendState.SENT.value,
            ":sid": message.message_id,
            ":thread": thread_id,
            ":empty": [],
            ":message": [message_element(message)],
            ":ms": processing_time_ms,
            ":zero": 0,
            ":stamp": stamp,
        },
        {**STATUS_NAME, "#messages": MESSAGES},
    )


def invalid_item(key: ConversationKey, reason: str, stamp: str) -> dict[str, Any]:
    """What a context too malformed to process records about the conversation it names."""
    return {
        **item_fields(key),
        STATUS: ConversationStatus.FAILED_INVALID_CONTEXT.value,
        "failure_reason": reason,
        "created_at": stamp,
        "updated_at": stamp,
    }


def reopen(stamp: str) -> Write:
    """`comms dlq redrive`: failed by exhausted retries -> PROCESSING with a lapsed claim (claim_expires_at 0),
    the ledger untouched, the old reason kept as `last_failure_reason`."""
    statuses = sorted(status.value for status in EXHAUSTIBLE_STATUSES)
    placeholders = [f":failed{i}" for i in range(len(statuses))]
    return Write(
        "SET #status = :processing, claim_expires_at = :zero, last_failure_reason = failure_reason, "
        "updated_at = :stamp, reopen_count = if_not_exists(reopen_count, :zero) + :one "
        "REMOVE failure_reason, failure_kind",
        f"failure_kind = :kind AND #status IN ({', '.join(placeholders)})",
        {
            ":processing": ConversationStatus.PROCESSING.value,
            ":kind": RETRIES_EXHAUSTED,
            ":zero": 0,
            ":one": 1,
            ":stamp": stamp,
            **dict(zip(placeholders, statuses, strict=True)),
        },
    )


def close_reopened(before: ConversationRecord, reopened_at: str, stamp: str) -> Write | None:
    """Undo `reopen` (see `DynamoConversationClaims.close_reopened`); None when `before` was not reopenable."""
    failure = before.failure
    if failure is None or not may_reopen(before):
        return None
    values: dict[str, Any] = {
        ":processing": ConversationStatus.PROCESSING.value,
        ":zero": 0,
        ":reopened": reopened_at,
        ":count": before.reopen_count + 1,
        ":failed": before.status.value,
        ":reason": failure.reason,
        ":kind": RETRIES_EXHAUSTED,
        ":stamp": stamp,
    }
    sets = ["#status = :failed", "failure_reason = :reason", "failure_kind = :kind", "updated_at = :stamp"]
    removes: list[str] = []
    if before.last_failure_reason is not None:
        sets.append("last_failure_reason = :last")
        values[":last"] = before.last_failure_reason
    else:
        removes.append("last_failure_reason")
    if before.reopen_count:  # reopens always count from 1: 0 means the attribute was not there
        sets.append("reopen_count = :before_count")
        values[":before_count"] = before.reopen_count
    else:
        removes.append("reopen_count")
    condition = (
        "#status = :processing AND claim_expires_at = :zero AND updated_at = :reopened "
        "AND reopen_count = :count AND attribute_not_exists(failure_kind)"
    )
    if before.claim.owner is not None:
        condition += " AND claim_owner = :owner"
        values[":owner"] = before.claim.owner
    else:
        condition += " AND attribute_not_exists(claim_owner)"
    update = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
    return Write(update, condition, values)


# Reply sender (`claims.decide_reply`): answerable, or processing_reply with a lapsed lease, may be taken.
_REPLY_CLAIMABLE = (
    "attribute_exists(conversation_id) AND ((#status IN (:initial, :replied)) "
    "OR (#status = :replying AND reply_lease_expires <= :now))"
)
_REPLY_OWNED = "reply_owner = :owner AND #status = :replying"
# An opt-out or hand-off that landed while the owner was sending: its reply went out and must still be recorded.
_REPLY_OWNED_BUT_STOPPED = "reply_owner = :owner AND #status IN (:opted_out, :handed_off)"
_DROP_REPLY_CLAIM = "REMOVE reply_owner, reply_lease_expires, status_before_reply"


def claim_reply(owner: str, lease_until: float, now: float, stamp: str) -> Write:
    """-> processing_reply, remembering the status to return to."""
    return Write(
        "SET status_before_reply = if_not_exists(status_before_reply, #status), "
        "#status = :replying, reply_owner = :owner, reply_lease_expires = :lease, updated_at = :stamp",
        _REPLY_CLAIMABLE,
        {
            ":initial": ConversationStatus.INITIAL_MESSAGE_SENT.value,
            ":replied": ConversationStatus.REPLY_SENT.value,
            ":replying": ConversationStatus.PROCESSING_REPLY.value,
            ":owner": owner,
            ":lease": lease_until,
            ":now": now,
            ":stamp": stamp,
        },
    )


def _reply_owned(update: str, owner: str, values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> Write:
    """Applies only while `owner` holds the reply claim."""
    guard = {":owner": owner, ":replying": ConversationStatus.PROCESSING_REPLY.value}
    return Write(update, _REPLY_OWNED, {**guard, **values}, {**STATUS_NAME, **(names or {})})


def refresh_reply(owner: str, lease_until: float) -> Write:
    """Extend the reply lease; `lease_until` 0 releases it (a retried trigger then takes it over)."""
    return _reply_owned("SET reply_lease_expires = :lease", owner, {":lease": lease_until})


def record_reply_attempt(owner: str, attempt: ReplyAttempt, stamp: str) -> Write:
    values = {":attempt": reply_attempt_fields(attempt), ":stamp": stamp}
    return _reply_owned("SET reply_attempt = :attempt, updated_at = :stamp", owner, values)


def clear_reply_attempt(owner: str) -> Write:
    return _reply_owned("REMOVE reply_attempt", owner, {})


def finalise_reply(
    owner: str, messages: Sequence[Message], answered_sids: Sequence[str], processing_time_ms: int, stamp: str
) -> Write:
    """reply_sent, the messages appended, the fragments marked answered, the claim dropped."""
    return _reply_owned(
        _finalise_reply_update("#status = :replied, "),
        owner,
        {
            **_finalise_reply_values(messages, answered_sids, processing_time_ms, stamp),
            ":replied": ConversationStatus.REPLY_SENT.value,
        },
        {"#messages": MESSAGES},
    )


def finalise_stopped_reply(
    owner: str, messages: Sequence[Message], answered_sids: Sequence[str], processing_time_ms: int, stamp: str
) -> Write:
    """As `finalise_reply`, but the opt-out or hand-off status that replaced processing_reply is kept."""
    values = {
        ":owner": owner,
        ":opted_out": ConversationStatus.OPTED_OUT.value,
        ":handed_off": ConversationStatus.HANDED_OFF.value,
        **_finalise_reply_values(messages, answered_sids, processing_time_ms, stamp),
    }
    names = {**STATUS_NAME, "#messages": MESSAGES}
    return Write(_finalise_reply_update(""), _REPLY_OWNED_BUT_STOPPED, values, names)


def _finalise_reply_update(status: str) -> str:
    return (
        f"SET {status}#messages = list_append(if_not_exists(#messages, :empty), :messages), "
        "processing_time_ms = :ms, updated_at = :stamp "
        "REMOVE reply_attempt, reply_owner, reply_lease_expires, status_before_reply "
        "ADD replied_message_sids :sids"
    )


def _finalise_reply_values(
    messages: Sequence[Message], answered_sids: Sequence[str], processing_time_ms: int, stamp: str
) -> dict[str, Any]:
    return {
        ":empty": [],
        ":messages": [message_element(message) for message in messages],
        ":ms": processing_time_ms,
        ":stamp": stamp,
        ":sids": set(answered_sids),
    }


def finish_unanswered(owner: str, stamp: str) -> Write:
    """Nothing to answer: back to the status before the claim."""
    return _reply_owned(
        f"SET #status = status_before_reply, updated_at = :stamp {_DROP_REPLY_CLAIM}", owner, {":stamp": stamp}
    )


def fail_reply(owner: str, failure: Failure, stamp: str) -> Write:
    """Failed for good; or, retries exhausted, back to the status before the claim (still answerable) with the
    failure noted in `last_reply_failure` and `reply_attempt` kept (a reply that may have gone out is reconciled
    by the next trigger, never sent twice)."""
    if not failure.exhausted:
        update = f"SET #status = :failed, failure_reason = :reason, updated_at = :stamp {_DROP_REPLY_CLAIM}"
        values = {":failed": failure.status.value, ":reason": failure.reason, ":stamp": stamp}
        return _reply_owned(update, owner, values)
    noted = {"status": failure.status.value, "reason": failure.reason, "failure_kind": RETRIES_EXHAUSTED, "at": stamp}
    update = (
        f"SET #status = status_before_reply, last_reply_failure = :failure, updated_at = :stamp {_DROP_REPLY_CLAIM}"
    )
    return _reply_owned(update, owner, {":failure": noted, ":stamp": stamp})


# Intake (webhooks): on a conversation that exists.
EXISTS = "attribute_exists(conversation_id)"


def opted_out(stamp: str) -> Write:
    values = {":opted_out": ConversationStatus.OPTED_OUT.value, ":stamp": stamp}
    return Write("SET #status = :opted_out, opted_out_at = :stamp, updated_at = :stamp", EXISTS, values)


def opted_in(stamp: str) -> Write:
    """Back to answerable, only if it was opted out."""
    return Write(
        "SET #status = :replied, updated_at = :stamp REMOVE opted_out_at",
        "#status = :opted_out",
        {
            ":replied": ConversationStatus.REPLY_SENT.value,
            ":opted_out": ConversationStatus.OPTED_OUT.value,
            ":stamp": stamp,
        },
    )


def handed_off(reason: str, stamp: str) -> Write:
    values = {":handed_off": ConversationStatus.HANDED_OFF.value, ":reason": reason, ":stamp": stamp}
    return Write("SET #status = :handed_off, hand_off_reason = :reason, updated_at = :stamp", EXISTS, values)


# ---- queries -------------------------------------------------------------------------------------------------


def between_query(table: str, channel: str, company_address: str, sender: str) -> dict[str, Any]:
    """Every conversation of this company address with this sender (the channel's index)."""
    index = INDEX_BY_CHANNEL[channel]
    sender_key = sender.lower() if channel == "email" else sender
    return {
        "TableName": table,
        "IndexName": index.name,
        "KeyConditionExpression": "#pk = :pk AND #sk = :sk",
        "ExpressionAttributeNames": {"#pk": index.partition_key, "#sk": str(index.sort_key)},
        "ExpressionAttributeValues": attribute_values({":pk": company_address, ":sk": sender_key}),
    }


def credentials_query(table: str, channel: str, company_address: str, page_size: int) -> dict[str, Any]:
    """The conversations of this company address (the index's partition key), the credentials id only."""
    index = INDEX_BY_CHANNEL[channel]
    return {
        "TableName": table,
        "IndexName": index.name,
        "KeyConditionExpression": "#pk = :pk",
        "ProjectionExpression": "#config.#credentials",
        "ExpressionAttributeNames": {
            "#pk": index.partition_key,
            "#config": "channel_config",
            "#credentials": credentials_attribute(channel),
        },
        "ExpressionAttributeValues": attribute_values({":pk": company_address}),
        "Limit": page_size,
    }


def credentials_of(item: Mapping[str, Any], channel: str) -> str | None:
    """The credentials id an item of `credentials_query` names (None for a record without channel config)."""
    return _text_or_none(_mapping(item.get("channel_config")).get(credentials_attribute(channel)))
