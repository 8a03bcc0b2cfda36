"""The shared rate-limit buckets (`ports.TokenLeases`), one item per key in the rate-limits table.

The item holds the bucket's GCRA state, `tat` in microseconds since the epoch (`rate_limit.take_tokens`). A lease
is one conditional UpdateItem that returns the item either way (ALL_NEW when it applied, ALL_OLD when refused):
- the bucket is full (`tat` absent or in the past): `SET tat = now + n x interval`, if it is still so;
- otherwise: `SET tat = tat + n x interval`, if `tat` still leaves room for n (`tat <= now + tolerance - n x
  interval`), so replicas leasing at the same moment all succeed without reading first.
A refusal returns the current `tat`, from which the next attempt is computed (a smaller grant, the other case,
or the time until a token is due); a few attempts settle any race. `expires_at` lets DynamoDB's TTL delete the
items of keys no longer used.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from service.adapters.aws.dynamo_calls import update_or_refusal
from service.adapters.aws.dynamo_codec import attribute_values
from service.domain.rate_limit import MICROS, Grant, RateLimit, held_off_tat, interval_us, take_tokens

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

FULL = "attribute_not_exists(tat) OR tat <= :now"
ROOM_FOR_N = "tat > :now AND tat <= :latest_start"
ATTEMPTS = 4
IDLE_TTL_S = 3600  # an unused key's item outlives a full bucket by this much


class DynamoTokenLeases:
    def __init__(self, dynamodb: DynamoDBClient, table: str, max_keys: int = 10_000) -> None:
        self._dynamodb = dynamodb
        self._table = table
        # The tat each key's last lease left: the first attempt's guess of which case applies (a busy key's bucket
        # is rarely full, so guessing "full" would cost every lease a refused attempt).
        self._last_tat: OrderedDict[str, int] = OrderedDict()
        self._max_keys = max_keys

    async def lease(self, key: str, limit: RateLimit, wanted: int, now: float) -> Grant:
        now_us = int(now * MICROS)
        interval = interval_us(limit)
        tolerance = limit.burst * interval
        seen = self._last_tat.get(key)  # the bucket's tat as last known; None: take it as full until told otherwise
        for _ in range(ATTEMPTS):
            take = take_tokens(seen, now_us, limit, wanted)
            if take.granted < 1:
                return Grant(0, take.retry_after_us / MICROS)
            if seen is None or seen <= now_us:
                condition, update = FULL, "SET tat = :tat, expires_at = :expires_at"
                values = {":now": now_us, ":tat": take.tat_us}
            else:
                condition, update = ROOM_FOR_N, "SET tat = tat + :step, expires_at = :expires_at"
                values = {":now": now_us, ":latest_start": now_us + tolerance - take.granted * interval}
                values[":step"] = take.granted * interval
            values[":expires_at"] = (take.tat_us + tolerance) // MICROS + IDLE_TTL_S
            written, item = await update_or_refusal(
                self._dynamodb,
                "UpdateItem",
                TableName=self._table,
                Key={"bucket_key": {"S": key}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeValues=attribute_values(values),
            )
            seen = int(item["tat"]) if "tat" in item else None
            self._remember(key, seen)
            if written:
                return Grant(take.granted)
        # Still racing after every attempt: refuse for one interval rather than lease without a condition.
        return Grant(0, interval / MICROS)

    async def hold_off(self, key: str, limit: RateLimit, until: float) -> None:
        tat = held_off_tat(limit, int(until * MICROS))
        written, item = await update_or_refusal(
            self._dynamodb,
            "UpdateItem",
            TableName=self._table,
            Key={"bucket_key": {"S": key}},
            UpdateExpression="SET tat = :tat, expires_at = :expires_at",
            ConditionExpression="attribute_not_exists(tat) OR tat < :tat",
            ExpressionAttributeValues=attribute_values(
                {":tat": tat, ":expires_at": (tat + limit.burst * interval_us(limit)) // MICROS + IDLE_TTL_S}
            ),
        )
        self._remember(key, tat if written else int(item["tat"]) if "tat" in item else None)

    def _remember(self, key: str, tat: int | None) -> None:
        if tat is None:
            self._last_tat.pop(key, None)
            return
        self._last_tat[key] = tat
        self._last_tat.move_to_end(key)
        while len(self._last_tat) > self._max_keys:
            self._last_tat.popitem(last=False)
