"""The shared rate-limit buckets against moto (service/adapters/aws/token_leases.py): conditional updates that
never grant more than the bucket holds, however many replicas lease at once."""

from __future__ import annotations

import asyncio
import time
import uuid

from service.adapters.aws.token_leases import IDLE_TTL_S, DynamoTokenLeases
from service.bootstrap import Dependencies
from service.domain.rate_limit import RateLimit

LIMIT = RateLimit(per_second=10.0, burst=10)


def replica(deps: Dependencies) -> DynamoTokenLeases:
    return DynamoTokenLeases(deps.aws.dynamodb, deps.settings.rate_limits_table)


def new_key() -> str:
    return f"k-{uuid.uuid4().hex}"


async def test_a_new_key_grants_up_to_its_burst(deps: Dependencies) -> None:
    grant = await replica(deps).lease(new_key(), LIMIT, 25, time.time())
    assert grant.granted == 10


async def test_leases_take_from_the_bucket_until_it_is_empty_then_name_the_wait(deps: Dependencies) -> None:
    leases, key, now = replica(deps), new_key(), time.time()
    granted = [(await leases.lease(key, LIMIT, 4, now)).granted for _ in range(4)]
    refused = await leases.lease(key, LIMIT, 1, now)
    assert granted == [4, 4, 2, 0]
    assert refused.granted == 0 and abs(refused.retry_after_s - 0.1) < 1e-6


async def test_the_bucket_refills_at_its_rate(deps: Dependencies) -> None:
    leases, key, now = replica(deps), new_key(), time.time()
    await leases.lease(key, LIMIT, 10, now)
    assert (await leases.lease(key, LIMIT, 10, now + 0.35)).granted == 3


async def test_a_replica_that_never_saw_the_key_takes_only_what_is_left(deps: Dependencies) -> None:
    key, now = new_key(), time.time()
    await replica(deps).lease(key, LIMIT, 7, now)
    assert (await replica(deps).lease(key, LIMIT, 10, now)).granted == 3


async def test_replicas_leasing_at_once_never_share_out_more_than_the_bucket_holds(deps: Dependencies) -> None:
    key, now = new_key(), time.time()
    fleet = [replica(deps) for _ in range(4)]
    grants = await asyncio.gather(*(fleet[i % 4].lease(key, LIMIT, 3, now) for i in range(12)))
    assert sum(grant.granted for grant in grants) == 10


async def test_an_unused_key_s_item_expires_after_its_bucket_is_full_again(deps: Dependencies) -> None:
    key, now = new_key(), time.time()
    await replica(deps).lease(key, LIMIT, 10, now)
    item = await deps.aws.dynamodb.get_item(
        TableName=deps.settings.rate_limits_table, Key={"bucket_key": {"S": key}}, ConsistentRead=True
    )
    expires_at = int(item["Item"]["expires_at"]["N"])
    assert int(now) + 1 + IDLE_TTL_S <= expires_at <= int(now) + 3 + IDLE_TTL_S


async def test_a_hold_off_grants_nothing_before_its_end_then_one_at_a_time(deps: Dependencies) -> None:
    leases, key, now = replica(deps), new_key(), time.time()
    await replica(deps).hold_off(key, LIMIT, now + 2.0)
    early = await leases.lease(key, LIMIT, 5, now + 1.0)
    assert early.granted == 0 and abs(early.retry_after_s - 1.0) < 1e-6
    assert (await leases.lease(key, LIMIT, 5, now + 2.0)).granted == 1


async def test_a_hold_off_never_brings_a_bucket_further_on_back(deps: Dependencies) -> None:
    leases, key, now = replica(deps), new_key(), time.time()
    await leases.hold_off(key, LIMIT, now + 5.0)
    await leases.hold_off(key, LIMIT, now + 1.0)
    assert (await leases.lease(key, LIMIT, 1, now + 4.0)).granted == 0
