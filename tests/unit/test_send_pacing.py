"""Provider pacing (service/domain/pacing.py): sends from one sender, across the fleet, at the sender's rate; a
429 slows every worker down. Workers are SendPacing instances sharing one FakeTokenLeases on one fake clock."""

from __future__ import annotations

import asyncio

import pytest

from service.domain.fleet_rate_limit import FleetRateLimiter
from service.domain.pacing import MAX_HOLD_OFF_S, SendPacing
from service.domain.provider_ports import OutboundMessage
from tests.fakes import FakeClock, FakeTokenLeases

DEFAULTS = {"whatsapp": 80.0, "sms": 1.0}


def worker(clock: FakeClock, leases: FakeTokenLeases, max_wait_s: float = 30.0) -> SendPacing:
    return SendPacing(FleetRateLimiter(leases, clock), DEFAULTS, clock.sleep, max_wait_s=max_wait_s)


def sms(sender: str = "+447700900002", sends_per_second: float | None = None) -> OutboundMessage:
    return OutboundMessage(
        channel="sms",
        credentials={},
        sender=sender,
        recipient="+447700900123",
        body="hi",
        sends_per_second=sends_per_second,
    )


async def send_times(pacing: SendPacing, clock: FakeClock, message: OutboundMessage, count: int) -> list[float]:
    times = []
    for _ in range(count):
        assert await pacing.wait_turn(message) == 0.0
        times.append(clock.now())
    return times


async def test_one_sender_sends_at_its_default_rate() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    times = await send_times(worker(clock, leases), clock, sms(), 5)
    assert [round(t - times[0], 6) for t in times] == [0.0, 1.0, 2.0, 3.0, 4.0]


async def test_a_project_s_own_pace_replaces_the_default() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    times = await send_times(worker(clock, leases), clock, sms(sends_per_second=4.0), 9)
    assert round(times[-1] - times[0], 6) == 1.25  # a burst of 4, then one every 0.25 s


async def test_workers_share_one_sender_s_pace() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    workers = [worker(clock, leases) for _ in range(3)]
    times = []
    for i in range(6):
        assert await workers[i % 3].wait_turn(sms()) == 0.0
        times.append(clock.now())
    assert round(times[-1] - times[0], 6) == 5.0


async def test_different_senders_do_not_wait_for_one_another() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    pacing = worker(clock, leases)
    for sender in ("+447700900002", "+447700900003", "+447700900004"):
        assert await pacing.wait_turn(sms(sender)) == 0.0
    assert clock.sleeps == []


async def test_email_is_not_paced() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    email = OutboundMessage(channel="email", credentials={}, sender="a@b.example", recipient="c@d.example")
    for _ in range(100):
        assert await worker(clock, leases).wait_turn(email) == 0.0
    assert leases.calls == 0


async def test_a_wait_longer_than_the_bound_is_handed_back_without_a_token() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    pacing = worker(clock, leases, max_wait_s=2.5)
    await send_times(pacing, clock, sms(), 3)  # the next turn is 1 s away, then 2 s...
    other = worker(clock, leases, max_wait_s=0.5)
    assert await other.wait_turn(sms()) == 1.0
    assert clock.sleeps == [1.0, 1.0]  # only the first worker's own waits


async def test_a_429_holds_every_worker_off_that_sender() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    first, second = worker(clock, leases), worker(clock, leases)
    message = sms(sends_per_second=50.0)
    assert await first.wait_turn(message) == 0.0
    await first.rate_limited(message, retry_after_s=3.0)
    start = clock.now()
    assert await second.wait_turn(message) == 0.0
    assert clock.now() - start >= 3.0


async def test_concurrent_sends_from_one_sender_are_spaced_out() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    pacing = worker(clock, leases)
    turns: list[float] = []

    async def one() -> None:
        assert await pacing.wait_turn(sms()) == 0.0
        turns.append(clock.now())

    await asyncio.gather(*(one() for _ in range(4)))
    assert len(turns) == 4 and len(leases.tat_us) == 1


async def test_a_429_holds_the_sender_off_for_at_most_a_minute() -> None:
    clock, leases = FakeClock(), FakeTokenLeases()
    pacing = worker(clock, leases)
    message = sms(sends_per_second=50.0)
    await pacing.rate_limited(message, retry_after_s=3600.0)  # a wait that long is learnt again from the next 429
    assert await worker(clock, leases, max_wait_s=0.0).wait_turn(message) == pytest.approx(MAX_HOLD_OFF_S)
