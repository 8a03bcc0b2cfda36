"""A project's `rate_limits.concurrent_conversations`, held across the whole worker fleet (issue 14 §1).

Each message of a capped project takes an in-flight lease before its conversation is claimed: one entry in a
shared per-project item (`InflightLeases`, the rate-limits table), holder -> expiry. A message that finds the
project full is deferred (re-queued with a delay, no receive burnt) instead of holding a worker slot, so one
tenant's backlog cannot fill every slot of the fleet and the others' messages keep moving.

- A lease expires by itself (a crashed worker's after `lease_s`); the claim keep-alive refreshes it while work
  runs, and it is released when the message finishes however it ends (done, retry, defer, dead letter, cancel).
- A refusal is remembered for `refused_memo_s` on this worker, so a backlog of one project met in a row is
  deferred without asking DynamoDB for each message (a release of this worker's own lease forgets it).
- A refused message waits `defer_s`, doubling with each deferral it already had (jittered, at most
  `MAX_DEFER_S`): with a fixed wait a backlog of B messages over a cap of c is re-queued about B x B / c times
  while it drains (each message comes back every `defer_s` until its turn), with a doubling one about
  B x log2(its wait / defer_s) times, so the queue other tenants share is not kept busy by the churn.
- No cap: nothing is asked of DynamoDB at all (the company record comes from the directory's cache).
- DynamoDB cannot answer (the company record or the lease): fail open, the message goes ahead unleased. The
  cap is about fairness, not a SPEC guarantee (never twice, never lost, opt-outs refused all hold without
  it), and the work's own claim needs DynamoDB anyway: if it is really down the claim fails and the message
  is retried; if only the lease's item is throttled, failing closed would instead defer or retry every message
  of every capped project, burning receives (retries) or spinning the queue (deferrals) for no safety gain.
"""

from __future__ import annotations

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
# The longest one deferral waits (SQS allows 900). Longer waits churn less, but a capped project whose backlog B is
# small (B / MAX_DEFER_S < cap / L messages coming back a second) may run below its cap while they sit it out.
MAX_DEFER_S = 120
MAX_DOUBLINGS = 10


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


@dataclass(frozen=True, slots=True)
class Admission:
    """`admitted`: go ahead (holding `slot` when the project is capped and the lease was taken)."""

    admitted: bool
    slot: Slot | None = None


ADMITTED_UNCAPPED = Admission(True)
REFUSED = Admission(False)


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
        self.defer_s = defer_s  # how long a refused message waits in the queue before it is tried again
        self._refused_memo_s = refused_memo_s
        self._refused_until: OrderedDict[str, float] = OrderedDict()
        self._max_keys = max_keys

    def defer_delay_s(self, deferrals: int) -> int:
        """How long a refused message waits: `defer_s` doubled per earlier deferral, half to all of it (so copies
        deferred together do not all come back together), at most MAX_DEFER_S."""
        ceiling = min(MAX_DEFER_S, self.defer_s * 2 ** min(max(0, deferrals), MAX_DOUBLINGS))
        return max(1, round(self._rng.uniform(max(self.defer_s, ceiling / 2), ceiling)))

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
        if now < self._refused_until.get(key, 0.0):
            return REFUSED
        try:
            holder = uuid.uuid4().hex[:12]  # short: the lease item holds one entry per running conversation
            held_in = await self._leases.acquire(key, holder, cap, now + self.lease_s, now)
        except DependencyUnavailable as exc:
            log.warning("concurrency_cap_fail_open", reason=str(exc))
            return ADMITTED_UNCAPPED
        if held_in is None:
            self._remember_refusal(key, now + self._refused_memo_s)
            log.info("concurrency_capped", cap=cap)
            return REFUSED
        return Admission(True, Slot(key, held_in, holder))

    async def refresh(self, slot: Slot) -> None:
        try:
            await self._leases.refresh(slot.item_key, slot.holder, self._clock() + self.lease_s)
        except DependencyUnavailable as exc:  # it expires by itself; a later refresh may still reach it
            log.warning("inflight_lease_refresh_failed", reason=str(exc))

    async def leave(self, slot: Slot) -> None:
        self._refused_until.pop(slot.key, None)  # a lease of the project just came free here
        try:
            await self._leases.release(slot.item_key, slot.holder)
        except DependencyUnavailable as exc:  # it expires by itself after lease_s
            log.warning("inflight_lease_release_failed", reason=str(exc))

    def _remember_refusal(self, key: str, until: float) -> None:
        self._refused_until[key] = until
        self._refused_until.move_to_end(key)
        while len(self._refused_until) > self._max_keys:
            self._refused_until.popitem(last=False)
