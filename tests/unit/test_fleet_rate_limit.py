"""The per-key rate limit shared by every api replica (service/domain/fleet_rate_limit.py), on fakes and a
controllable clock: replicas are FleetRateLimiter instances sharing one FakeTokenLeases."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain.fleet_rate_limit import FleetRateLimiter
from service.domain.rate_limit import MICROS, RateLimit, take_tokens
from tests.fakes import FakeClock, FakeTokenLeases

LIMIT = RateLimit(per_second=10.0, burst=10)


def fleet(replicas: int, clock: FakeClock, leases: FakeTokenLeases) -> list[FleetRateLimiter]:
    return [FleetRateLimiter(leases, clock) for _ in range(replicas)]


async def offer(limiters: list[FleetRateLimiter], clock: FakeClock, per_second: float, seconds: float) -> int:
    """Requests at `per_second`, round-robin over the replicas, for `seconds` of fake time: how many were let in."""
    accepted, step = 0, 1.0 / per_second
    for i in range(round(per_second * seconds)):
        accepted += await limiters[i % len(limiters)].check("key-1", LIMIT) == 0
        clock.advance(step)
    return accepted


def test_a_full_bucket_grants_up_to_its_burst() -> None:
    assert take_tokens(None, 0, LIMIT, wanted=25).granted == 10


def test_each_token_moves_the_arrival_time_on_by_one_interval() -> None:
    take = take_tokens(None, 5 * MICROS, LIMIT, wanted=3)
    assert (take.granted, take.tat_us) == (3, 5 * MICROS + 300_000)


def test_an_empty_bucket_names_when_its_next_token_is_due() -> None:
    drained = take_tokens(None, 0, LIMIT, wanted=10)
    refused = take_tokens(drained.tat_us, 0, LIMIT, wanted=1)
    assert (refused.granted, refused.retry_after_us) == (0, 100_000)


@given(
    tat=st.one_of(st.none(), st.integers(0, 5 * MICROS)),
    now=st.integers(0, 5 * MICROS),
    wanted=st.integers(1, 50),
    per_second=st.sampled_from([0.5, 1.0, 10.0, 250.0]),
    burst=st.integers(1, 40),
)
@settings(max_examples=300)
def test_a_take_never_leaves_more_than_the_burst_outstanding(
    tat: int | None, now: int, wanted: int, per_second: float, burst: int
) -> None:
    limit = RateLimit(per_second, burst)
    interval = round(MICROS / per_second)
    if tat is not None and tat > now + burst * interval:
        return  # not a state the rules can reach
    take = take_tokens(tat, now, limit, wanted)
    assert 0 <= take.granted <= wanted
    assert take.tat_us - now <= burst * interval
    if take.granted == 0:
        assert take.retry_after_us > 0
        assert take_tokens(tat, now + take.retry_after_us, limit, 1).granted == 1


@pytest.mark.parametrize("replicas", [1, 3, 8])
async def test_the_fleet_accepts_the_limit_within_ten_percent_however_many_replicas(replicas: int) -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    accepted = await offer(fleet(replicas, clock, leases), clock, per_second=60, seconds=20)
    expected = LIMIT.burst + LIMIT.per_second * 20
    assert abs(accepted - expected) <= 0.1 * expected


async def test_requests_under_the_limit_are_all_accepted_across_replicas() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    assert await offer(fleet(3, clock, leases), clock, per_second=9, seconds=20) == 180


async def test_a_busy_replica_leases_in_chunks_of_its_demand() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    limiter = FleetRateLimiter(leases, clock)
    limit = RateLimit(per_second=1000.0, burst=1000)
    for _ in range(25 * 20):  # 25 requests a second for 20 s, far under the limit
        assert await limiter.check("key-1", limit) == 0
        clock.advance(1 / 25)
    assert leases.calls / 500 <= 0.2


async def test_a_refused_replica_asks_the_shared_bucket_again_only_once_a_token_is_due() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    limiter = FleetRateLimiter(leases, clock)
    for _ in range(10):
        await limiter.check("key-1", LIMIT)
    calls = leases.calls
    refusals = [await limiter.check("key-1", LIMIT) for _ in range(100)]
    assert refusals == [1] * 100 and leases.calls == calls + 1


async def test_concurrent_requests_on_one_replica_share_one_lease() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    limiter = FleetRateLimiter(leases, clock)
    limiter_warm = [await limiter.check("key-1", LIMIT) for _ in range(5)]  # demand seen: chunks of 5
    clock.advance(1.0)
    calls = leases.calls
    answers = await asyncio.gather(*(limiter.check("key-1", LIMIT) for _ in range(5)))
    assert limiter_warm == [0] * 5 and answers == [0] * 5 and leases.calls == calls + 1


async def test_leased_tokens_lapse_when_their_replica_goes_quiet() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    quiet, busy = FleetRateLimiter(leases, clock), FleetRateLimiter(leases, clock)
    for _ in range(8):
        await quiet.check("key-1", LIMIT)  # leases a few at a time, keeps some
    clock.advance(5.0)  # the shared bucket refills; the quiet replica's stock has lapsed
    accepted = sum([await busy.check("key-1", LIMIT) == 0 for _ in range(30)])
    assert accepted == LIMIT.burst


async def test_a_changed_limit_takes_effect_at_once() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    limiter = FleetRateLimiter(leases, clock)
    tight = RateLimit(per_second=1.0, burst=2)
    assert [await limiter.check("key-1", LIMIT) for _ in range(3)] == [0, 0, 0]
    clock.advance(10.0)
    assert [await limiter.check("key-1", tight) for _ in range(3)] == [0, 0, 1]


async def test_an_unreachable_shared_bucket_falls_back_to_the_replica_s_own_limit() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    leases.faults.fail_always("lease")
    limiter = FleetRateLimiter(leases, clock)
    answers = [await limiter.check("key-1", LIMIT) for _ in range(12)]
    assert answers[:10] == [0] * 10 and all(wait >= 1 for wait in answers[10:])
