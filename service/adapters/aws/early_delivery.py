"""Delivery states on a conversation's messages (`message_items`; embedded in records written before those), and
status callbacks kept until their message is.

Twilio reports a message as soon as it has it, and does not retry a status callback; the final update that
records the message (template sender or replier) may land later, after a crash and a redelivery's reconcile.
A signed callback whose SID is not recorded yet is kept on the conversation in the map attribute
`early_delivery` = {sid: {"status", "at"}} (forward-only merge, at most `PENDING_CAP` entries) and applied by
the final update that appends that SID. A callback is kept on up to three conversations but forgotten only by the
one that records its message, so a full map makes room by dropping its oldest entry (by `at`): a new callback
is never refused for lack of room.

Race-free both ways because both sides write the conversation item and read what they wrote (ReturnValues ALL_NEW),
and a final update writes its message items before that conversation update (the template's message is the
conversation item's own, recorded by that very update):
    - the callback keeps its state first: the final update's ALL_NEW holds the entry, it applies it;
    - the final update lands first: its message items were written before, so the callback's consistent look-up
      after keeping its state finds the message, and the callback applies it itself.
Every application is the same conditional forward-only write (`delivery_state.may_follow`), so doing it twice, or
out of order, is harmless.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from service.adapters.aws.conversation_codec import EARLY_DELIVERY, MESSAGES, item_key, record_from_item
from service.adapters.aws.dynamo_calls import update_if, update_or_refusal, update_returning
from service.adapters.aws.dynamo_codec import attribute_values
from service.adapters.aws.message_items import MessageItems
from service.domain.conversation import ConversationKey
from service.domain.delivery_state import DeliveryStatus, may_follow, parse_delivery_status
from service.domain.errors import DependencyUnavailable

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

log = structlog.get_logger(__name__)

PENDING_ATTRIBUTE = EARLY_DELIVERY
PENDING_CAP = 20  # kept callbacks per conversation; a SID that is never recorded must not grow the item for ever


def _replaceable(new: DeliveryStatus) -> tuple[list[str], dict[str, str]]:
    """The placeholders and values of the stored states `new` may replace."""
    allowed = sorted(s.value for s in may_follow(new))
    placeholders = [f":from{i}" for i in range(len(allowed))]
    return placeholders, dict(zip(placeholders, allowed, strict=True))


def _kept_at(entry: Any) -> str:
    return str(entry.get("at") or "") if isinstance(entry, dict) else ""


@dataclass(frozen=True, slots=True)
class DeliveryStates:
    """The delivery-state writes on one conversation."""

    dynamodb: DynamoDBClient
    table: str
    key: ConversationKey
    messages: MessageItems

    def _params(self, **params: Any) -> dict[str, Any]:
        return {"TableName": self.table, "Key": item_key(self.key), **params}

    async def set_status(
        self, index: int, sid: str, new: DeliveryStatus, stamp: str, *, on_record: bool = False
    ) -> bool:
        """Forward-only: applied when message `index` (its position) is `sid` and has no state yet or one `new` may
        replace; else False. The message item (`on_record`: the record's own template message, whose state is
        position 0's item, created by the first), or the element of an older record's embedded list."""
        placeholders, allowed = _replaceable(new)
        values = {":sid": sid, ":new": new.value, ":stamp": stamp, **allowed}
        condition = "message_id = :sid AND (attribute_not_exists(delivery_status)"
        condition += f" OR delivery_status IN ({', '.join(placeholders)}))" if placeholders else ")"
        update = "SET delivery_status = :new, delivery_updated_at = :stamp"
        applied = await self.messages.set_status(self.key, index, update, condition, values, create=on_record)
        if applied is not None:
            return applied
        element = f"#messages[{index}]"  # no such item: an embedded message
        condition = f"{element}.message_id = :sid AND (attribute_not_exists({element}.delivery_status)"
        condition += f" OR {element}.delivery_status IN ({', '.join(placeholders)}))" if placeholders else ")"
        params = self._params(
            UpdateExpression=f"SET {element}.delivery_status = :new, {element}.delivery_updated_at = :stamp",
            ConditionExpression=condition,
            ExpressionAttributeNames={"#messages": MESSAGES},
            ExpressionAttributeValues=attribute_values(values),
        )
        return await update_if(self.dynamodb, "UpdateItem", **params)

    async def _recorded_at(self, record: Mapping[str, Any], sid: str) -> tuple[int, bool] | None:
        """The position of the message with this SID, if it is recorded (a consistent look-up), and whether it is
        the record's own template message (`ledger_message`)."""
        typed = record_from_item(record)
        found = await self.messages.find(self.key, sid, typed.messages, typed.ledger_message)
        return None if found is None else (found[0], typed.holds_message(sid))

    async def _forget(self, sid: str) -> None:
        """Drop a kept entry whose message is recorded (any later callback then finds the message itself)."""
        params = self._params(
            UpdateExpression="REMOVE #pending.#sid",
            ConditionExpression="attribute_exists(#pending.#sid)",
            ExpressionAttributeNames={"#pending": PENDING_ATTRIBUTE, "#sid": sid},
        )
        await update_if(self.dynamodb, "UpdateItem", **params)  # refused: another writer forgot it first

    async def apply_pending(self, record: Mapping[str, Any], positions: Mapping[str, int]) -> None:
        """After a final update that has succeeded (its ALL_NEW `record`): apply, forward-only, what was kept for
        the SIDs it recorded (`positions`: each SID's position). A failure here must not make its caller retry (or
        report) the final update: the entry stays kept and the next callback for the SID applies."""
        pending = record.get(PENDING_ATTRIBUTE)
        if not isinstance(pending, dict) or not pending:
            return
        sids = list(positions)
        typed = record_from_item(record)
        try:
            for sid, index in positions.items():
                entry = pending.get(sid)
                if not isinstance(entry, dict):
                    continue
                status = parse_delivery_status(str(entry.get("status") or ""))
                if status is not None:
                    at = str(entry.get("at") or "")
                    applied = await self.set_status(index, sid, status, at, on_record=typed.holds_message(sid))
                    log.info("early_delivery_status_applied", message_sid=sid, status=status.value, applied=applied)
                await self._forget(sid)
        except DependencyUnavailable as exc:
            log.warning("early_delivery_status_not_applied", message_sids=list(sids), detail=str(exc))

    async def hold(self, sid: str, new: DeliveryStatus, stamp: str) -> bool:
        """Keep a callback for a SID not (yet) in `messages`, forward-only; if the message turns out to be recorded
        meanwhile, apply it to the message instead. True when kept or applied; False when stale, full or gone."""
        entry = {"status": new.value, "at": stamp}
        created, item = await update_or_refusal(  # the first kept callback of this conversation creates the map
            self.dynamodb,
            "UpdateItem",
            **self._params(
                UpdateExpression="SET #pending = :pending",
                ConditionExpression="attribute_exists(conversation_id) AND attribute_not_exists(#pending)",
                ExpressionAttributeNames={"#pending": PENDING_ATTRIBUTE},
                ExpressionAttributeValues=attribute_values({":pending": {sid: entry}}),
            ),
        )
        if created:
            return await self._settle(item, sid, new, stamp)
        if not item:
            return False  # the conversation is gone
        names = {"#pending": PENDING_ATTRIBUTE, "#sid": sid}
        placeholders, allowed = _replaceable(new)
        condition = "attribute_not_exists(#pending.#sid) AND size(#pending) < :cap"
        if placeholders:  # a kept state may be replaced only by a later one
            later = f"attribute_exists(#pending.#sid) AND #pending.#sid.#status IN ({', '.join(placeholders)})"
            condition = f"({later}) OR ({condition})"
            names["#status"] = "status"
        kept, item = await update_or_refusal(
            self.dynamodb,
            "UpdateItem",
            **self._params(
                UpdateExpression="SET #pending.#sid = :entry",
                ConditionExpression=f"attribute_exists(conversation_id) AND ({condition})",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=attribute_values({":entry": entry, ":cap": PENDING_CAP, **allowed}),
            ),
        )
        if kept:
            return await self._settle(item, sid, new, stamp)
        recorded = await self._recorded_at(item, sid)
        if recorded is not None:  # recorded after our look-up: straight onto the message
            return await self.set_status(recorded[0], sid, new, stamp, on_record=recorded[1])
        pending = item.get(PENDING_ATTRIBUTE)
        if isinstance(pending, dict) and sid not in pending and len(pending) >= PENDING_CAP:
            return await self._replace_oldest(pending, sid, new, stamp)
        log.info("early_delivery_status_not_kept", message_sid=sid, status=new.value, reason="stale")
        return False

    async def _replace_oldest(self, kept: Mapping[str, Any], sid: str, new: DeliveryStatus, stamp: str) -> bool:
        """The map is full: keep this callback in place of the oldest entry (by `at`; entries whose message was
        recorded elsewhere are never forgotten here and would otherwise fill it for good)."""
        oldest = min(kept, key=lambda kept_sid: (_kept_at(kept[kept_sid]), kept_sid))
        item = await update_returning(
            self.dynamodb,
            "UpdateItem",
            **self._params(
                UpdateExpression="REMOVE #pending.#oldest SET #pending.#sid = :entry",
                ConditionExpression=(
                    "attribute_exists(conversation_id) AND attribute_exists(#pending.#oldest)"
                    " AND attribute_not_exists(#pending.#sid)"
                ),
                ExpressionAttributeNames={"#pending": PENDING_ATTRIBUTE, "#oldest": oldest, "#sid": sid},
                ExpressionAttributeValues=attribute_values({":entry": {"status": new.value, "at": stamp}}),
            ),
        )
        if item is None:
            log.info("early_delivery_status_not_kept", message_sid=sid, status=new.value, reason="full_and_changing")
            return False
        log.info("early_delivery_status_replaced_oldest", message_sid=sid, dropped_sid=oldest)
        return await self._settle(item, sid, new, stamp)

    async def _settle(self, record: Mapping[str, Any], sid: str, new: DeliveryStatus, stamp: str) -> bool:
        """The record after keeping the callback: if its message was recorded meanwhile, apply it there now."""
        recorded = await self._recorded_at(record, sid)
        if recorded is None:
            log.info("early_delivery_status_kept", message_sid=sid, status=new.value)
            return True
        await self.set_status(recorded[0], sid, new, stamp, on_record=recorded[1])
        await self._forget(sid)
        return True
