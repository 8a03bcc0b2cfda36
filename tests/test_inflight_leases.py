"""The fleet's in-flight leases against moto (service/adapters/aws/inflight_leases.py): conditional updates that
never hold more leases than the cap, however many workers take them at once, and prune the expired ones."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

from service.adapters.aws.inflight_leases import SHARD_CAP, DynamoInflightLeases, shard_caps
from service.bootstrap import Dependencies


def worker(deps: Dependencies, seed: int = 0) -> DynamoInflightLeases:
    return DynamoInflightLeases(deps.aws.dynamodb, deps.settings.rate_limits_table, random.Random(seed))


def new_key() -> str:
    return f"inflight#c-{uuid.uuid4().hex[:8]}#p"


async def leases_of(deps: Dependencies, item_key: str) -> dict[str, int]:
    item = await deps.aws.dynamodb.get_item(
        TableName=deps.settings.rate_limits_table, Key={"bucket_key": {"S": item_key}}, ConsistentRead=True
    )
    return {h: int(v["N"]) for h, v in item.get("Item", {}).get("leases", {}).get("M", {}).items()}


async def test_leases_are_granted_up_to_the_cap_then_refused(deps: Dependencies) -> None:
    leases, key, now = worker(deps), new_key(), time.time()
    taken = [await leases.acquire(key, f"h{i}", 3, now + 30, now) for i in range(4)]
    assert taken == [key, key, key, None]


async def test_a_released_lease_makes_room_for_another(deps: Dependencies) -> None:
    leases, key, now = worker(deps), new_key(), time.time()
    for i in range(2):
        await leases.acquire(key, f"h{i}", 2, now + 30, now)
    await leases.release(key, "h0")
    assert await leases.acquire(key, "h2", 2, now + 30, now) == key
    assert set(await leases_of(deps, key)) == {"h1", "h2"}


async def test_an_expired_lease_is_pruned_to_make_room(deps: Dependencies) -> None:
    leases, key, now = worker(deps), new_key(), time.time()
    await leases.acquire(key, "crashed", 1, now + 5, now)
    assert await leases.acquire(key, "late", 1, now + 35, now + 1) is None
    assert await leases.acquire(key, "after", 1, now + 40, now + 10) == key
    assert set(await leases_of(deps, key)) == {"after"}


async def test_a_refreshed_lease_outlives_its_first_expiry(deps: Dependencies) -> None:
    leases, key, now = worker(deps), new_key(), time.time()
    await leases.acquire(key, "slow", 1, now + 5, now)
    await leases.refresh(key, "slow", now + 60)
    assert await leases.acquire(key, "other", 1, now + 40, now + 10) is None


async def test_workers_leasing_at_once_never_hold_more_than_the_cap(deps: Dependencies) -> None:
    key, now = new_key(), time.time()
    fleet = [worker(deps, seed) for seed in range(4)]
    taken = await asyncio.gather(*(fleet[i % 4].acquire(key, f"h{i}", 5, now + 30, now) for i in range(16)))
    assert sum(t is not None for t in taken) <= 5
    assert len(await leases_of(deps, key)) <= 5


async def test_a_large_cap_is_spread_over_items_that_add_up_to_it(deps: Dependencies) -> None:
    cap = 2 * SHARD_CAP + 5
    assert sum(shard_caps(cap)) == cap and max(shard_caps(cap)) <= SHARD_CAP
    leases, key, now = worker(deps), new_key(), time.time()
    taken = [await leases.acquire(key, f"h{i}", cap, now + 30, now) for i in range(cap + 5)]
    held = [t for t in taken if t is not None]
    assert cap - 5 <= len(held) <= cap  # a refusal may leave room in a shard not tried, never more than the cap
    for shard in set(held):
        assert len(await leases_of(deps, shard)) <= max(shard_caps(cap))


async def test_releasing_a_lease_no_longer_held_is_harmless(deps: Dependencies) -> None:
    leases, key = worker(deps), new_key()
    await leases.release(key, "never")
    await leases.refresh(key, "never", time.time() + 30)
    assert await leases_of(deps, key) == {}
