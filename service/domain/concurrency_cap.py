"""A project's `rate_limits.concurrent_conversations`, held across the whole worker fleet (issue 14 §1).

Each message of a capped project takes an in-flight lease before its conversation is claimed: one entry in a
shared per-project item (`InflightLeases`, the rate-limits table), holder -> expiry. A message that finds the
project full is deferred (re-queued with a delay, no receive burnt) instead of holding a worker slot, so one
tenant's backlog cannot fill every slot of the fleet and the others' messages keep moving.

- A lease expires by itself (a crashed worker's after `lease_s`); the claim keep-alive refreshes it while work
  runs, and it is released when the message finishes however it ends (done, retry, defer, dead letter, cancel).
- A refusal is remembered for `refused_memo_s` on this worker, so a backlog of one project met in a row is
  deferred without asking DynamoDB for each message (a release of this worker's own lease forgets it).
- A refused message is given a time to come back, as if this worker kept its project's refused messages in a
  queue laid out in time (`Backlog`): the first `defer_s` from now, each next one `hold / (OVERBOOK x cap)`
  later, where `hold` is how long the project's conversations hold their lease (a moving average of those this
  worker saw end; `ASSUMED_HOLD_S` until one has), and at most `MAX_SPACING_S` later (with a small cap and long
  holds a freed lease would otherwise wait up to half a hold for the next return). So the backlog comes back a
  little faster than the cap drains it: the project keeps running near its cap (returns arriving exactly at the
  drain rate would find it full about a third of the time, a loss system at full load), a return that finds it
  full goes to the back, and no wave of returns makes the tenants sharing the queue wait behind it. (Doubling
  back-offs returned the whole backlog in waves: on one queue served in order, a quiet tenant's message waited
  behind each wave, and the capped project ran well below its cap between them.) A slot beyond SQS's 900 s
  delay is not booked: that message comes back at a jittered 450-900 s and is booked then. With R replicas each
  books its own refusals, so returns come about R times as fast; the surplus is deferred again, evenly.
- No cap: nothing is asked of DynamoDB at all (the company record comes from the directory's cache).
- DynamoDB cannot answer (the company record or the lease): fail open, the message goes ahead unleased. The
  cap is about fairness, not a SPEC guarantee (never twice, never lost, opt-outs refused all hold without
  it), and the work's own claim needs DynamoDB anyway: if it is really down the claim fails and the message
  is retried; if only the lease's item is throttled, failing closed would instead defer or retry every message
  of every capped project, burning receives (retries) or spinning the queue (deferrals) for no safety gain.
"""

from __future__ import annotations

import math
import random
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from service.domain.errors import DependencyUnavailable
from service.domain.ports import CompanyDirectory

log = structlog.get_logger(__name__)

REFUSED_MEMO_S = 1.0
MAX_DEFER_S = 900  # SQS's DelaySeconds limit: a later slot is not booked (see `Backlog`)
# How long a capped project's conversation is assumed to hold its lease until this worker has seen one end: short
# rather than long, since too short costs a few early re-deferrals and too long leaves the project below its cap.
ASSUMED_HOLD_S = 1.0
OVERBOOK = 2  # returns booked per lease the cap frees: keeps a backlogged project near its cap
MAX_SPACING_S = 1.0  # a backlogged project gets a return at least this often (about 0.3 SQS requests each)
HOLD_WEIGHT = 0.2  # of each observed hold in the moving average


class InflightLeases(Protocol):
    """The fleet's in-flight leases, one shared item per project key."""

    async def acquire(self, key: str, holder: str, cap: int, until: float, now: float) -> str | None:
        """Add `holder`'s lease (expiring at `until`, epoch seconds) if fewer than `cap` unexpired leases of `key`
        are held at `now` (expired ones are pruned on the way): the item key the lease is held in (an adapter may
        spread a large cap over several items), or None when the project is full."""
        ...

    async def refresh(self, key: str, holder: str, until: float) -> None:
        """Move `holder`'s lease expiry to `until` (re-adding it if it was pruned meanwhile: the work still runs)."""
        ...

    async def release(self, key: str, holder: str) -> None:
        """Drop `holder`'s lease; nothing if it is gone already."""
        ...


def inflight_key(company_id: str, project_id: str) -> str:
    return f"inflight#{company_id}#{project_id}"


@dataclass(frozen=True, slots=True)
class Slot:
    """A lease this worker holds for one message."""

    key: str  # the project's (`inflight_key`): what a refusal is remembered by
    item_key: str  # the item the lease is held in
    holder: str
    since: float  # when it was taken (the clock's seconds): how long it was held feeds `Backlog.hold_s`


@dataclass(frozen=True, slots=True)
class Admission:
    """`admitted`: go ahead (holding `slot` when the project is capped and the lease was taken); refused: come
    back in `wait_s` seconds (the message is deferred that long)."""

    admitted: bool
    slot: Slot | None = None
    wait_s: int = 0


ADMITTED_UNCAPPED = Admission(True)


@dataclass(slots=True)
class Backlog:
    """What this worker keeps of one capped project: its refused messages as a queue laid out in time (the next one
    refused comes back at `next_at`, and each takes `hold_s / (OVERBOOK x cap)` of it, since the cap frees a lease
    every `hold_s / cap`; at most MAX_SPACING_S), and until when a refusal is remembered (`refused_until`)."""

    next_at: float = 0.0
    hold_s: float = ASSUMED_HOLD_S
    refused_until: float = 0.0


class ConcurrencyCap:
    def __init__(
        self,
        companies: CompanyDirectory,
        leases: InflightLeases,
        clock: Callable[[], float],
        *,
        lease_s: float,
        defer_s: int,
        refused_memo_s: float = REFUSED_MEMO_S,
        max_keys: int = 10_000,
        rng: random.Random | None = None,
    ) -> None:
        self._rng = rng or random.Random()
        self._companies = companies
        self._leases = leases
        self._clock = clock
        self.lease_s = lease_s
        self.defer_s = defer_s  # the shortest wait of a refused message (the first of a backlog waits this long)
        self._refused_memo_s = refused_memo_s
        self._backlogs: OrderedDict[str, Backlog] = OrderedDict()  # by project key, the least recently used dropped
        self._max_keys = max_keys

    def refused(self, key: str, cap: int, now: float) -> Admission:
        """A refusal, with the time its message comes back: its project's next slot in this worker's backlog,
        `defer_s` from now at the earliest; past MAX_DEFER_S, unbooked and jittered over its second half."""
        backlog = self._backlog(key)
        due = max(backlog.next_at, now + self.defer_s)
        if due - now > MAX_DEFER_S:
            return Admission(False, wait_s=round(self._rng.uniform(MAX_DEFER_S / 2, MAX_DEFER_S)))
        backlog.next_at = due + min(MAX_SPACING_S, backlog.hold_s / (OVERBOOK * max(1, cap)))
        return Admission(False, wait_s=max(1, math.floor(due - now)))  # whole seconds: early rather than late

    def _backlog(self, key: str) -> Backlog:
        backlog = self._backlogs.get(key)
        if backlog is None:
            backlog = self._backlogs[key] = Backlog()
        self._backlogs.move_to_end(key)
        while len(self._backlogs) > self._max_keys:
            self._backlogs.popitem(last=False)
        return backlog

    async def cap_of(self, company_id: str, project_id: str) -> int | None:
        """The project's concurrent_conversations (None: no cap, or the record could not be read: fail open)."""
        try:
            company = await self._companies.get(company_id, project_id)
        except DependencyUnavailable as exc:
            log.warning("concurrency_cap_unknown", reason=str(exc))
            return None
        if company is None or company.rate_limits is None:
            return None
        return company.rate_limits.concurrent_conversations

    async def enter(self, company_id: str, project_id: str) -> Admission:
        """Take an in-flight lease if the project has a cap and room under it."""
        cap = await self.cap_of(company_id, project_id)
        if cap is None:
            return ADMITTED_UNCAPPED
        key = inflight_key(company_id, project_id)
        now = self._clock()
        if now < self._backlog(key).refused_until:
            return self.refused(key, cap, now)
        try:
            holder = uuid.uuid4().hex[:12]  # short: the lease item holds one entry per running conversation
            held_in = await self._leases.acquire(key, holder, cap, now + self.lease_s, now)
        except DependencyUnavailable as exc:
            log.warning("concurrency_cap_fail_open", reason=str(exc))
            return ADMITTED_UNCAPPED
        if held_in is None:
            self._backlog(key).refused_until = now + self._refused_memo_s
            log.info("concurrency_capped", cap=cap)
            return self.refused(key, cap, now)
        return Admission(True, Slot(key, held_in, holder, now))

    async def refresh(self, slot: Slot) -> None:
        try:
            await self._leases.refresh(slot.item_key, slot.holder, self._clock() + self.lease_s)
        except DependencyUnavailable as exc:  # it expires by itself; a later refresh may still reach it
            log.warning("inflight_lease_refresh_failed", reason=str(exc))

    async def leave(self, slot: Slot) -> None:
        backlog = self._backlog(slot.key)
        backlog.refused_until = 0.0  # a lease of the project just came free here
        held = max(0.0, self._clock() - slot.since)
        backlog.hold_s += HOLD_WEIGHT * (held - backlog.hold_s)
        try:
            await self._leases.release(slot.item_key, slot.holder)
        except DependencyUnavailable as exc:  # it expires by itself after lease_s
            log.warning("inflight_lease_release_failed", reason=str(exc))
