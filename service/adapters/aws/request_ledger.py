"""The request-idempotency records (`ports.RequestLedger`), in the idempotency table.

The claim is one conditional PutItem mirroring the TAKE rows of `claims.decide_request` that also returns the
refusing record (ReturnValuesOnConditionCheckFailure), so a repeat costs one request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.adapters.aws.dynamo_calls import applied, get_item, refusal, send
from service.adapters.aws.dynamo_codec import to_attribute, to_item
from service.domain.claims import RequestRecord, RequestState
from service.domain.conversation import Lease

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient


# Absent, or an IN_PROGRESS claim whose lease has run out (its holder crashed).
CLAIMABLE = "attribute_not_exists(idempotency_key) OR (request_state = :in_progress AND lease_expires_at <= :now)"
# ...and, for a claim that carries a body hash, only a lapsed claim for the same body (or one
# written before hashes were stored): another body is refused, and the domain answers 422.
CLAIMABLE_FOR_BODY = (
    "attribute_not_exists(idempotency_key) OR (request_state = :in_progress AND lease_expires_at <= :now"
    " AND (attribute_not_exists(body_hash) OR body_hash = :body_hash))"
)


def _record(data: dict[str, Any]) -> RequestRecord:
    return RequestRecord(
        key=data["idempotency_key"],
        state=RequestState(data["request_state"]),
        conversation_id=data["conversation_id"],
        lease=Lease(expires_at=float(data.get("lease_expires_at", 0))),
        queue_timestamp=data.get("queue_timestamp"),
        body_hash=data.get("body_hash"),
    )


class DynamoRequestLedger:
    def __init__(self, dynamodb: DynamoDBClient, table: str, ttl_s: int) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._ttl_s = ttl_s

    async def claim(self, record: RequestRecord, now: float) -> RequestRecord | None:
        item = {
            "idempotency_key": record.key,
            "request_state": record.state.value,
            "conversation_id": record.conversation_id,
            "lease_expires_at": int(record.lease.expires_at),
            "expires_at": int(now) + self._ttl_s,
        }
        values = {
            ":in_progress": to_attribute(RequestState.IN_PROGRESS.value),
            ":now": to_attribute(int(now)),
        }
        condition = CLAIMABLE
        if record.body_hash is not None:
            item["body_hash"] = record.body_hash
            values[":body_hash"] = to_attribute(record.body_hash)
            condition = CLAIMABLE_FOR_BODY
        old = await refusal(
            self._dynamodb.put_item(
                TableName=self._table,
                Item=to_item(item),
                ConditionExpression=condition,
                ExpressionAttributeValues=values,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            ),
            "PutItem",
        )
        if old is None:
            return None
        return _record(old) if old else await self.read(record.key)

    async def read(self, key: str) -> RequestRecord | None:
        item = await get_item(self._dynamodb, TableName=self._table, Key=self._key(key), ConsistentRead=True)
        return None if item is None else _record(item)

    async def complete(self, key: str, queue_timestamp: str) -> None:
        update = self._dynamodb.update_item(
            TableName=self._table,
            Key=self._key(key),
            UpdateExpression="SET request_state = :done, queue_timestamp = :at",
            ExpressionAttributeValues={
                ":done": to_attribute(RequestState.COMPLETED.value),
                ":at": to_attribute(queue_timestamp),
            },
        )
        await send(update, "UpdateItem")

    async def release(self, key: str) -> None:
        delete = self._dynamodb.delete_item(
            TableName=self._table,
            Key=self._key(key),
            ConditionExpression="request_state = :in_progress",
            ExpressionAttributeValues={":in_progress": to_attribute(RequestState.IN_PROGRESS.value)},
        )
        await applied(delete, "DeleteItem")  # refused: completed (kept for repeats) or gone

    def _key(self, key: str) -> dict[str, Any]:
        return {"idempotency_key": to_attribute(key)}
