"""AI pacing (service/domain/ai_pacing.py): calls on one OpenAI API key, across the fleet, at the key's rate; a 429
holds every worker off that key. Workers are PacedAiWriters sharing one FakeTokenLeases on one fake clock, each
over its own FakeAiWriter."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from service.domain.ai_pacing import AI_BUCKET_PREFIX, PacedAiWriter, ai_bucket_key, paced_ai_writer
from service.domain.fleet_rate_limit import FleetRateLimiter
from service.domain.pacing import MAX_HOLD_OFF_S, Pace
from service.domain.provider_ports import (
    AiRequest,
    PermanentProviderError,
    ProviderPaced,
    ProviderRateLimited,
    TransientProviderError,
)
from tests.fakes import FakeAiWriter, FakeClock, FakeTokenLeases

API_KEY = "sk-proj-tenant-a-0123456789"
PER_SECOND = 2.0


def ask(api_key: str = API_KEY) -> AiRequest:
    return AiRequest(api_key=api_key, model="gpt-4.1-mini", instructions="i", input_text="t", output_keys=("content",))


def rate_limited(retry_after_s: float | None = 1.0) -> ProviderRateLimited:
    return ProviderRateLimited("ai_rate_limited", code="rate_limit_exceeded", retry_after_s=retry_after_s)


def worker(
    clock: FakeClock,
    leases: FakeTokenLeases,
    inner: FakeAiWriter | None = None,
    *,
    per_second: float = PER_SECOND,
    max_wait_s: float = 30.0,
) -> PacedAiWriter:
    pace = Pace(FleetRateLimiter(leases, clock), clock.sleep, max_wait_s=max_wait_s)
    return PacedAiWriter(inner or FakeAiWriter(), pace, per_second, clock.sleep)


async def call_times(writer: PacedAiWriter, clock: FakeClock, request: AiRequest, count: int) -> list[float]:
    times = []
    for _ in range(count):
        await writer.write(request)
        times.append(clock.now())
    return times


async def test_one_key_is_called_at_the_default_rate() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    times = await call_times(worker(clock, leases), clock, ask(), 6)
    assert [round(t - times[0], 6) for t in times] == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]  # a burst of 2, then 2 a second


async def test_a_project_s_own_pace_replaces_the_default() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    request = AiRequest(
        api_key=API_KEY,
        model="gpt-4.1-mini",
        instructions="i",
        input_text="t",
        output_keys=("content",),
        requests_per_second=4.0,
    )
    times = await call_times(worker(clock, leases), clock, request, 8)
    assert round(times[-1] - times[0], 6) == 1.0  # a burst of 4, then one every 0.25 s


async def test_workers_share_one_key_s_pace() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    workers = [worker(clock, leases) for _ in range(3)]
    times = []
    for i in range(6):
        await workers[i % 3].write(ask())
        times.append(clock.now())
    assert round(times[-1] - times[0], 6) == 2.0


async def test_different_keys_do_not_wait_for_one_another() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    writer = worker(clock, leases, per_second=1.0)
    for key in ("sk-a", "sk-b", "sk-c"):
        await writer.write(ask(key))
    assert clock.sleeps == []


async def test_the_bucket_is_named_by_a_digest_never_by_the_key() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    await worker(clock, leases).write(ask())
    [bucket] = leases.tat_us
    assert bucket == ai_bucket_key(API_KEY) and bucket.startswith(AI_BUCKET_PREFIX)
    assert API_KEY not in bucket and len(bucket) == len(AI_BUCKET_PREFIX) + 16


async def test_a_turn_further_than_the_bound_is_handed_back_without_calling() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    busy = worker(clock, leases)
    await call_times(busy, clock, ask(), 4)  # the burst of 2, then turns 0.5 s apart: the next is 0.5 s off
    inner = FakeAiWriter()
    with pytest.raises(ProviderPaced) as caught:
        await worker(clock, leases, inner, max_wait_s=0.25).write(ask())
    assert caught.value.retry_after_s == 0.5
    assert inner.requests == []


async def test_a_429_holds_every_worker_off_that_key() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    refused = FakeAiWriter()
    refused.answer_next(rate_limited(3.0))
    first = worker(clock, leases, refused, per_second=50.0, max_wait_s=1.0)
    second = worker(clock, leases, per_second=50.0)
    with pytest.raises(ProviderPaced):
        await first.write(ask())  # the 3 s hold-off is past its bound: handed back, the bucket pushed back
    start = clock.now()
    await second.write(ask())
    assert clock.now() - start >= 3.0


async def test_a_429_is_written_again_after_the_hold_off() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    inner = FakeAiWriter()
    inner.answer_next(rate_limited(1.5))
    result = await worker(clock, leases, inner).write(ask())
    assert result.output == {"content": "content #2"}
    assert sum(clock.sleeps) >= 1.5


async def test_a_hold_off_beyond_the_bound_hands_the_message_back() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    inner = FakeAiWriter()
    inner.answer_next(rate_limited(20.0))
    with pytest.raises(ProviderPaced) as caught:
        await worker(clock, leases, inner, max_wait_s=10.0).write(ask())
    assert (caught.value.reason, caught.value.retry_after_s) == ("ai_rate_limited", 20.0)
    assert len(inner.requests) == 1 and clock.sleeps == []


async def test_refusals_in_a_row_hand_the_message_back_after_max_attempts() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    inner = FakeAiWriter()
    inner.answer_next(*(rate_limited(0.1) for _ in range(5)))
    with pytest.raises(ProviderPaced) as caught:
        await worker(clock, leases, inner).write(ask())
    assert caught.value.reason == "ai_rate_limited"
    assert len(inner.requests) == 3


async def test_a_hold_off_is_at_most_a_minute() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    inner = FakeAiWriter()
    inner.answer_next(rate_limited(6 * 3600.0))  # e.g. a day's limit: the next 429 says so again
    with pytest.raises(ProviderPaced) as caught:
        await worker(clock, leases, inner).write(ask())
    assert caught.value.retry_after_s == MAX_HOLD_OFF_S


async def test_a_429_without_a_wait_holds_off_one_second() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    inner = FakeAiWriter()
    inner.answer_next(rate_limited(None))
    with pytest.raises(ProviderPaced) as caught:
        await worker(clock, leases, inner, max_wait_s=0.5).write(ask())
    assert caught.value.retry_after_s == 1.0


async def test_an_unpaced_key_takes_no_turn_and_waits_a_429_out_in_its_slot() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    inner = FakeAiWriter()
    inner.answer_next(rate_limited(2.0))
    writer = worker(clock, leases, inner, per_second=0.0)
    await writer.write(ask())
    await call_times(writer, clock, ask(), 20)
    assert leases.calls == 0
    assert clock.sleeps == [2.0]


@pytest.mark.parametrize(
    "failure",
    [PermanentProviderError("ai_rejected", code="invalid_api_key"), TransientProviderError("ai_unavailable")],
    ids=["permanent", "transient"],
)
async def test_other_failures_pass_through_untouched(failure: Exception) -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    inner = FakeAiWriter()
    inner.answer_next(failure)
    with pytest.raises(type(failure)) as caught:
        await worker(clock, leases, inner).write(ask())
    assert caught.value is failure and len(inner.requests) == 1


async def test_concurrent_calls_on_one_key_are_spaced_out() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    writer = worker(clock, leases)
    turns: list[float] = []

    async def one() -> None:
        await writer.write(ask())
        turns.append(clock.now())

    start = clock.now()
    await asyncio.gather(*(one() for _ in range(5)))
    assert round(max(turns) - start, 6) == 1.5  # 2 at once, then 0.5 s apart


async def test_the_builder_reads_the_default_pace_and_the_bound_from_the_settings() -> None:
    @dataclass(frozen=True)
    class Settings:
        ai_requests_per_second: float = 1.0
        send_pace_max_wait_s: float = 0.5

    clock, leases = FakeClock(), FakeTokenLeases()
    writer = paced_ai_writer(Settings(), leases, FakeAiWriter(), clock=clock, sleep=clock.sleep)
    await writer.write(ask())
    with pytest.raises(ProviderPaced) as caught:
        await writer.write(ask())  # the next turn is 1 s off, past the 0.5 s bound
    assert caught.value.retry_after_s == 1.0


async def test_a_hold_off_the_table_cannot_take_still_holds_this_replica_off() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    inner = FakeAiWriter()
    inner.answer_next(rate_limited(5.0))
    leases.faults.fail_next("hold_off")
    writer = worker(clock, leases, inner, per_second=50.0, max_wait_s=1.0)
    with pytest.raises(ProviderPaced):
        await writer.write(ask())
    with pytest.raises(ProviderPaced) as caught:
        await writer.write(ask())  # this replica remembers the refusal: no call before the 5 s are over
    assert caught.value.retry_after_s == pytest.approx(5.0)
    assert len(inner.requests) == 1
