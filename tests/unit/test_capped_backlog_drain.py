"""A capped project's backlog, drained through the real `ConcurrencyCap` on fakes and a simulated clock: one worker
receives B messages of the project at once, the cap admits what it can, and every refused message comes back when
its deferral says (whole seconds, as SQS delays). Generated caps, hold times and backlogs; the properties are the
ones issue 14 §1 asks of the cap: never over it, nobody starved, and the backlog comes back evenly rather than in
waves that would make other tenants' messages wait behind it on a shared queue."""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from service.domain.company import CompanyRecord, RateLimits
from service.domain.concurrency_cap import OVERBOOK, ConcurrencyCap, Slot, inflight_key
from tests.cap_fakes import FakeInflightLeases
from tests.fakes import FakeWorld
from tests.unit.test_template_sender import COMPANY_ID, PROJECT_ID, company

DEFER_S = 5
KEY = inflight_key(COMPANY_ID, PROJECT_ID)


@dataclass
class Drain:
    """What happened to the backlog: each message's deferrals, when each came back, when the last one ran."""

    deferrals: Counter[int] = field(default_factory=Counter)
    returns_by_second: Counter[int] = field(default_factory=Counter)
    admitted: set[int] = field(default_factory=set)
    finished_at: float = 0.0


async def drain(cap: int, hold_s: float, backlog: int) -> tuple[Drain, FakeInflightLeases]:
    world, leases = FakeWorld(), FakeInflightLeases()
    record: CompanyRecord = company().model_copy(update={"rate_limits": RateLimits(concurrent_conversations=cap)})
    world.companies.records[(COMPANY_ID, PROJECT_ID)] = record
    lease_s = hold_s + 60  # a running conversation keeps its lease (the claim keep-alive does that in the service)
    gate = ConcurrencyCap(world.companies, leases, world.clock, lease_s=lease_s, defer_s=DEFER_S)
    start = world.clock.now()
    events: list[tuple[float, int, int, Slot | None]] = []  # (when, 0 = a lease ends / 1 = a message returns, id)
    result = Drain()

    async def arrive(message: int) -> None:
        admission = await gate.enter(COMPANY_ID, PROJECT_ID)
        if admission.admitted:
            result.admitted.add(message)
            heapq.heappush(events, (world.clock.now() + hold_s, 0, message, admission.slot))
        else:
            result.deferrals[message] += 1
            heapq.heappush(events, (world.clock.now() + admission.wait_s, 1, message, None))

    for message in range(backlog):
        await arrive(message)
    while events:
        when, kind, message, slot = heapq.heappop(events)
        world.clock.advance(max(0.0, when - world.clock.now()))
        if kind == 0:
            assert slot is not None
            await gate.leave(slot)
            result.finished_at = world.clock.now() - start
        else:
            result.returns_by_second[math.floor(world.clock.now() - start)] += 1
            await arrive(message)
    return result, leases


@settings(max_examples=40, deadline=None)
@given(
    cap=st.integers(min_value=1, max_value=8),
    hold_s=st.floats(min_value=1.0, max_value=20.0),
    backlog=st.integers(min_value=1, max_value=120),
)
async def test_a_capped_backlog_drains_under_its_cap_evenly_and_starves_no_one(
    cap: int, hold_s: float, backlog: int
) -> None:
    result, leases = await drain(cap, hold_s, backlog)

    assert result.admitted == set(range(backlog))  # nobody starved
    assert leases.most_held[KEY] <= cap
    # Bookings are at least min(hold, the assumed 1 s) / (OVERBOOK x cap) apart, so one second sees at most that
    # many returns booked in it and the next (whole-second delays round down from any moment): no waves.
    assert max(result.returns_by_second.values(), default=0) <= 2 * OVERBOOK * cap + 2
    # Whole-second returns cost at most one second per lease cycle; the first ones wait DEFER_S.
    cycles = math.ceil(backlog / cap)
    assert result.finished_at <= DEFER_S + cycles * (hold_s + 2) + hold_s + 2
