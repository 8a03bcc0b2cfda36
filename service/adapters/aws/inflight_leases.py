"""The fleet's in-flight leases (`concurrency_cap.InflightLeases`) in the rate-limits table, UpdateItem only.

A project's leases live in one item (`bucket_key` = `inflight#<company>#<project>`): a map `leases` of holder ->
expiry (epoch seconds). Every change is one conditional UpdateItem that returns the item when refused
(ReturnValuesOnConditionCheckFailure=ALL_OLD), from which the next attempt is computed:
- room (the usual case): `SET leases.#h = :until` if `size(leases) < :cap`;
- no map yet: `SET leases = {holder: until}` if `attribute_not_exists(leases)`;
- full, but some leases expired (crashed workers): `REMOVE` them and `SET` ours in the same update, if each is
  still expired and `size(leases) < :cap + <removed>`; none expired: refused.
A few attempts settle a race; the cap is never exceeded. `expires_at` lets DynamoDB's TTL delete a project's
item a day after its last lease.

Write units follow the item's size, so a large cap is spread over `ceil(cap / SHARD_CAP)` items (`<key>#<i>`), each
with its share of the cap: every write stays about one write unit. A lease tries up to `SHARD_TRIES` shards from
a random one; a refusal then may leave room in a shard not tried (the fleet runs a little under a large cap near
it, never over). Changing a cap re-shards: leases taken under the old shape lapse or end within `lease_s`.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any

from service.adapters.aws.dynamo_calls import update_if, update_or_refusal
from service.adapters.aws.dynamo_codec import attribute_values

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient

SHARD_CAP = 40  # leases per item: ~40 x 20 bytes, one write unit
SHARD_TRIES = 3
ATTEMPTS = 4
MAX_PRUNED = 20  # expired leases removed in one update (expression size)
IDLE_TTL_S = 86400


def shard_caps(cap: int) -> list[int]:
    """Each shard's share of `cap` (they add up to it)."""
    shards = max(1, math.ceil(cap / SHARD_CAP))
    return [cap // shards + (1 if i < cap % shards else 0) for i in range(shards)]


class DynamoInflightLeases:
    def __init__(self, dynamodb: DynamoDBClient, table: str, rng: random.Random | None = None) -> None:
        self._dynamodb = dynamodb
        self._table = table
        self._rng = rng or random.Random()

    async def acquire(self, key: str, holder: str, cap: int, until: float, now: float) -> str | None:
        caps = shard_caps(cap)
        if len(caps) == 1:
            return key if await self._acquire_in(key, holder, cap, until, now) else None
        first = self._rng.randrange(len(caps))
        for step in range(min(SHARD_TRIES, len(caps))):
            shard = (first + step) % len(caps)
            item_key = f"{key}#{shard}"
            if await self._acquire_in(item_key, holder, caps[shard], until, now):
                return item_key
        return None

    async def _acquire_in(self, item_key: str, holder: str, cap: int, until: float, now: float) -> bool:
        until_s, now_s = math.ceil(until), int(now)
        expires_at = until_s + IDLE_TTL_S
        names: dict[str, str] = {"#h": holder}
        seen: dict[str, Any] | None = None  # the leases as last returned; None: not read yet (assume room)
        for _ in range(ATTEMPTS):
            values: dict[str, Any] = {":until": until_s, ":expires_at": expires_at}
            if seen is None:
                update = "SET leases.#h = :until, expires_at = :expires_at"
                condition = "attribute_exists(leases) AND size(leases) < :cap"  # (moto fails size() of nothing)
                values[":cap"] = cap
            elif not seen:
                update = "SET leases = :mine, expires_at = :expires_at"
                condition = "attribute_not_exists(leases) OR size(leases) = :zero"
                values.pop(":until")
                values.update({":mine": {holder: until_s}, ":zero": 0})
            else:
                expired = [h for h, at in seen.items() if int(at) <= now_s][:MAX_PRUNED]
                if len(seen) - len(expired) >= cap:
                    return False
                pruned = {f"#e{i}": h for i, h in enumerate(expired)}
                names.update(pruned)
                removal = f" REMOVE {', '.join(f'leases.{n}' for n in pruned)}" if pruned else ""
                update = "SET leases.#h = :until, expires_at = :expires_at" + removal
                condition = " AND ".join(["size(leases) < :cap", *(f"leases.{n} <= :now" for n in pruned)])
                values.update({":cap": cap + len(pruned), ":now": now_s} if pruned else {":cap": cap})
            written, item = await update_or_refusal(
                self._dynamodb,
                "UpdateItem",
                TableName=self._table,
                Key={"bucket_key": {"S": item_key}},
                UpdateExpression=update,
                ConditionExpression=condition,
                ExpressionAttributeNames={k: v for k, v in names.items() if k in update},
                ExpressionAttributeValues=attribute_values(values),
            )
            if written:
                return True
            seen = dict(item.get("leases") or {})
        return False  # still racing after every attempt: refused (the message is deferred, tried again soon)

    async def refresh(self, key: str, holder: str, until: float) -> None:
        until_s = math.ceil(until)
        await update_if(
            self._dynamodb,
            "UpdateItem",
            TableName=self._table,
            Key={"bucket_key": {"S": key}},
            UpdateExpression="SET leases.#h = :until, expires_at = :expires_at",
            ConditionExpression="attribute_exists(leases)",
            ExpressionAttributeNames={"#h": holder},
            ExpressionAttributeValues=attribute_values({":until": until_s, ":expires_at": until_s + IDLE_TTL_S}),
        )

    async def release(self, key: str, holder: str) -> None:
        await update_if(
            self._dynamodb,
            "UpdateItem",
            TableName=self._table,
            Key={"bucket_key": {"S": key}},
            UpdateExpression="REMOVE leases.#h",
            ConditionExpression="attribute_exists(leases.#h)",
            ExpressionAttributeNames={"#h": holder},
        )
