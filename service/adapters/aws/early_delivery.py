"""Delivery states on the messages of the conversations table, and status callbacks kept until their message is.

Twilio reports a message as soon as it has it, and does not retry a status callback; the final update that
appends the message (template sender or replier) may land later, after a crash and a redelivery's reconcile.
A signed callback whose SID is not in `messages` yet is kept on the conversation in the map attribute
`early_delivery` = {sid: {"status", "at"}} (forward-only merge, at most `PENDING_CAP` entries) and applied by
the final update that appends that SID. A callback is kept on up to three conversations but forgotten only by the
one that records its message, so a full map makes room by dropping its oldest entry (by `at`): a new callback
is never refused for lack of room.

Race-free both ways because both sides write the same item and read what they wrote (ReturnValues ALL_NEW):
    - the callback keeps its state first: the final update's ALL_NEW holds the entry, it applies it;
    - the final update lands first: the callback's ALL_NEW holds the message, the callback applies it itself.
Every application is the same conditional forward-only write, so doing it twice, or out of order, is harmless.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import structlog

from service.adapters.aws.conversation_codec import EARLY_DELIVERY, MESSAGES
from service.adapters.aws.dynamo_calls import update_if
from service.adapters.aws.dynamo_codec import attribute_values, from_item
from service.adapters.aws.errors import AWS_FAILURES, is_conditional_check_failure, unavailable
from service.domain.delivery_state import DeliveryStatus, may_follow, parse_delivery_status
from service.domain.errors import DependencyUnavailable

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

log = structlog.get_logger(__name__)

PENDING_ATTRIBUTE = EARLY_DELIVERY
PENDING_CAP = 20  # kept callbacks per conversation; a SID that is never recorded must not grow the item for ever


def message_index(record: Mapping[str, Any], sid: str) -> int | None:
    """Where the message with this provider SID sits in `messages`, or None."""
    for index, element in enumerate(record.get(MESSAGES) or []):
        if isinstance(element, dict) and element.get("message_id") == sid:
            return index
    return None


def _allowed(may_replace: frozenset[DeliveryStatus], prefix: str) -> tuple[list[str], dict[str, str]]:
    allowed = sorted(s.value for s in may_replace)
    placeholders = [f":{prefix}{i}" for i in range(len(allowed))]
    return placeholders, dict(zip(placeholders, allowed, strict=True))


async def set_message_status(
    dynamodb: DynamoDBClient,
    table: str,
    key: Mapping[str, Any],
    index: int,
    message_sid: str,
    new: DeliveryStatus,
    may_replace: frozenset[DeliveryStatus],
    stamp: str,
) -> bool:
    """Forward-only: applied when message `index` is `message_sid` and has no state yet or one `new` may
    replace; else False."""
    element = f"#messages[{index}]"
    placeholders, allowed = _allowed(may_replace, "from")
    condition = f"{element}.message_id = :sid AND (attribute_not_exists({element}.delivery_status)"
    condition += f" OR {element}.delivery_status IN ({', '.join(placeholders)}))" if placeholders else ")"
    return await update_if(
        dynamodb,
        "UpdateItem",
        TableName=table,
        Key=dict(key),
        UpdateExpression=f"SET {element}.delivery_status = :new, {element}.delivery_updated_at = :stamp",
        ConditionExpression=condition,
        ExpressionAttributeNames={"#messages": MESSAGES},
        ExpressionAttributeValues=attribute_values(
            {":sid": message_sid, ":new": new.value, ":stamp": stamp, **allowed}
        ),
    )


async def _forget(dynamodb: DynamoDBClient, table: str, key: Mapping[str, Any], sid: str) -> None:
    """Drop a kept entry whose message is recorded (any later callback then finds the message itself)."""
    await update_if(  # already gone: another writer forgot it first
        dynamodb,
        "UpdateItem",
        TableName=table,
        Key=dict(key),
        UpdateExpression="REMOVE #pending.#sid",
        ConditionExpression="attribute_exists(#pending.#sid)",
        ExpressionAttributeNames={"#pending": PENDING_ATTRIBUTE, "#sid": sid},
    )


async def apply_pending(
    dynamodb: DynamoDBClient, table: str, key: Mapping[str, Any], record: Mapping[str, Any], sids: Iterable[str]
) -> None:
    """After a final update (its ALL_NEW `record`): apply, forward-only, what was kept for the SIDs it appended."""
    pending = record.get(PENDING_ATTRIBUTE)
    if not isinstance(pending, dict) or not pending:
        return
    for sid in sids:
        entry = pending.get(sid)
        index = message_index(record, sid)
        if not isinstance(entry, dict) or index is None:
            continue
        status = parse_delivery_status(str(entry.get("status") or ""))
        if status is not None:
            applied = await set_message_status(
                dynamodb, table, key, index, sid, status, may_follow(status), str(entry.get("at") or "")
            )
            log.info("early_delivery_status_applied", message_sid=sid, status=status.value, applied=applied)
        await _forget(dynamodb, table, key, sid)


async def apply_pending_safely(
    dynamodb: DynamoDBClient, table: str, key: Mapping[str, Any], record: Mapping[str, Any], sids: Iterable[str]
) -> None:
    """`apply_pending` for a final update that has already succeeded: a failure here must not make its caller
    retry (or report) the final update; the entry stays kept and the next callback for the SID applies."""
    sids = list(sids)
    try:
        await apply_pending(dynamodb, table, key, record, sids)
    except DependencyUnavailable as exc:
        log.warning("early_delivery_status_not_applied", message_sids=sids, detail=str(exc))


async def hold(
    dynamodb: DynamoDBClient,
    table: str,
    key: Mapping[str, Any],
    sid: str,
    new: DeliveryStatus,
    may_replace: frozenset[DeliveryStatus],
    stamp: str,
) -> bool:
    """Keep a callback for a SID not (yet) in `messages`, forward-only; if the message turns out to be recorded
    meanwhile, apply it to the message instead. True when kept or applied; False when stale, full or gone."""
    entry = {"status": new.value, "at": stamp}
    names = {"#pending": PENDING_ATTRIBUTE}
    try:  # the first kept callback of this conversation creates the map
        answer = await dynamodb.update_item(
            TableName=table,
            Key=dict(key),
            UpdateExpression="SET #pending = :pending",
            ConditionExpression="attribute_exists(conversation_id) AND attribute_not_exists(#pending)",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=attribute_values({":pending": {sid: entry}}),
            ReturnValues="ALL_NEW",
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )
    except AWS_FAILURES as exc:
        if not is_conditional_check_failure(exc):
            raise unavailable("dynamodb", "UpdateItem", exc) from exc
        if not getattr(exc, "response", {}).get("Item"):
            return False  # the conversation is gone
    else:
        return await _settle(dynamodb, table, key, from_item(answer["Attributes"]), sid, new, may_replace, stamp)
    placeholders, allowed = _allowed(may_replace, "from")
    condition = "attribute_not_exists(#pending.#sid) AND size(#pending) < :cap"
    if placeholders:  # a kept state may be replaced only by a later one
        later = f"attribute_exists(#pending.#sid) AND #pending.#sid.#status IN ({', '.join(placeholders)})"
        condition = f"({later}) OR ({condition})"
        names["#status"] = "status"
    try:
        answer = await dynamodb.update_item(
            TableName=table,
            Key=dict(key),
            UpdateExpression="SET #pending.#sid = :entry",
            ConditionExpression=f"attribute_exists(conversation_id) AND ({condition})",
            ExpressionAttributeNames={**names, "#sid": sid},
            ExpressionAttributeValues=attribute_values({":entry": entry, ":cap": PENDING_CAP, **allowed}),
            ReturnValues="ALL_NEW",
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )
    except AWS_FAILURES as exc:
        if not is_conditional_check_failure(exc):
            raise unavailable("dynamodb", "UpdateItem", exc) from exc
        old = from_item(getattr(exc, "response", {}).get("Item") or {})
        index = message_index(old, sid)
        if index is not None:  # recorded after our look-up: straight onto the message
            return await set_message_status(dynamodb, table, key, index, sid, new, may_replace, stamp)
        kept = old.get(PENDING_ATTRIBUTE)
        if isinstance(kept, dict) and sid not in kept and len(kept) >= PENDING_CAP:
            return await _replace_oldest(dynamodb, table, key, kept, sid, entry, new, may_replace, stamp)
        log.info("early_delivery_status_not_kept", message_sid=sid, status=new.value, reason="stale")
        return False
    return await _settle(dynamodb, table, key, from_item(answer["Attributes"]), sid, new, may_replace, stamp)


def _kept_at(entry: Any) -> str:
    return str(entry.get("at") or "") if isinstance(entry, dict) else ""


async def _replace_oldest(
    dynamodb: DynamoDBClient,
    table: str,
    key: Mapping[str, Any],
    kept: Mapping[str, Any],
    sid: str,
    entry: Mapping[str, str],
    new: DeliveryStatus,
    may_replace: frozenset[DeliveryStatus],
    stamp: str,
) -> bool:
    """The map is full: keep this callback in place of the oldest entry (by `at`; entries whose message was
    recorded elsewhere are never forgotten here and would otherwise fill it for good)."""
    oldest = min(kept, key=lambda kept_sid: (_kept_at(kept[kept_sid]), kept_sid))
    try:
        answer = await dynamodb.update_item(
            TableName=table,
            Key=dict(key),
            UpdateExpression="REMOVE #pending.#oldest SET #pending.#sid = :entry",
            ConditionExpression=(
                "attribute_exists(conversation_id) AND attribute_exists(#pending.#oldest)"
                " AND attribute_not_exists(#pending.#sid)"
            ),
            ExpressionAttributeNames={"#pending": PENDING_ATTRIBUTE, "#oldest": oldest, "#sid": sid},
            ExpressionAttributeValues=attribute_values({":entry": dict(entry)}),
            ReturnValues="ALL_NEW",
        )
    except AWS_FAILURES as exc:
        if not is_conditional_check_failure(exc):
            raise unavailable("dynamodb", "UpdateItem", exc) from exc
        log.info("early_delivery_status_not_kept", message_sid=sid, status=new.value, reason="full_and_changing")
        return False
    log.info("early_delivery_status_replaced_oldest", message_sid=sid, dropped_sid=oldest)
    return await _settle(dynamodb, table, key, from_item(answer["Attributes"]), sid, new, may_replace, stamp)


async def _settle(
    dynamodb: DynamoDBClient,
    table: str,
    key: Mapping[str, Any],
    record: Mapping[str, Any],
    sid: str,
    new: DeliveryStatus,
    may_replace: frozenset[DeliveryStatus],
    stamp: str,
) -> bool:
    """The record after keeping the callback: if its message was recorded meanwhile, apply it there now."""
    index = message_index(record, sid)
    if index is None:
        log.info("early_delivery_status_kept", message_sid=sid, status=new.value)
        return True
    await set_message_status(dynamodb, table, key, index, sid, new, may_replace, stamp)
    await _forget(dynamodb, table, key, sid)
    return True
