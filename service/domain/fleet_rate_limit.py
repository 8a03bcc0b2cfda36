"""A per-key rate limit that holds for the whole fleet of api replicas, not for each one.

The shared state is one number per key, the GCRA "theoretical arrival time" (`tat`): the bucket is full when
`tat <= now`, each token moves `tat` on by one emission interval (1 / rate), and a take is allowed while the new
`tat` stays within the burst tolerance (burst x interval) of `now`. The rules are `rate_limit.take_tokens`; the
`TokenLeases` port keeps `tat` where every replica sees it (a DynamoDB item, one conditional update a lease).

A replica leases tokens in chunks and answers from its local share, so most requests cost no AWS call:
- the chunk follows the replica's own demand for that key over the last `horizon_s` (at least 1, at most the
  burst and the rate x horizon): a busy replica leases many at once, a quiet one one at a time;
- leased tokens lapse after `2 x horizon_s` unused, so a replica that stops getting requests cannot hold a stock
  that would later add to the fleet's burst;
- a refusal is remembered until the token it names is due, so an over-limit caller costs no AWS call either;
- one lease at a time per key and replica: concurrent requests wait for it instead of each leasing.

Accuracy: the fleet can never take more than the shared bucket grants (rate x time + burst); it can accept
fewer by the tokens that lapse unused, at most one chunk per replica per lapse.
When the shared state cannot be reached, the replica falls back to its own bucket (the limit per replica, as
before this module), so a DynamoDB outage degrades the limit instead of refusing every request.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from service.domain.errors import DependencyUnavailable
from service.domain.ports import TokenLeases
from service.domain.rate_limit import RateLimit, RateLimiter, retry_after_seconds

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Share:
    """One key's local share on this replica."""

    limit: RateLimit
    tokens: int = 0
    lapses_at: float = 0.0
    refused_until: float = 0.0
    window_start: float = 0.0
    window_count: int = 0
    last_window_count: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def note_request(self, now: float, horizon_s: float) -> None:
        if now - self.window_start >= horizon_s:
            # the previous window's count, or 0 when more than one window passed without a request
            self.last_window_count = self.window_count if now - self.window_start < 2 * horizon_s else 0
            self.window_start, self.window_count = now, 0
        self.window_count += 1

    def chunk(self, horizon_s: float) -> int:
        most = max(1, min(self.limit.burst, math.floor(self.limit.per_second * horizon_s)))
        return max(1, min(most, max(self.window_count, self.last_window_count)))

    def take_local(self, now: float) -> bool:
        if self.tokens >= 1 and now < self.lapses_at:
            self.tokens -= 1
            return True
        return False


class FleetRateLimiter:
    """`check(key, limit)`: 0 when the request may go ahead, else the whole seconds for `Retry-After`."""

    def __init__(
        self,
        leases: TokenLeases,
        clock: Callable[[], float],
        *,
        horizon_s: float = 1.0,
        fallback: RateLimiter | None = None,
        max_keys: int = 10_000,
    ) -> None:
        self._leases = leases
        self._clock = clock
        self._horizon_s = horizon_s
        self._fallback = fallback or RateLimiter(max_keys)
        self._shares: OrderedDict[str, _Share] = OrderedDict()
        self._max_keys = max_keys

    async def check(self, key: str, limit: RateLimit) -> int:
        return retry_after_seconds(await self.admit(key, limit))

    async def admit(self, key: str, limit: RateLimit) -> float:
        """0.0 when one token was taken for this request, else the seconds until one is due (not rounded)."""
        share = self._share(key, limit)
        now = self._clock()
        share.note_request(now, self._horizon_s)
        if share.take_local(now):
            return 0.0
        if now < share.refused_until:
            return share.refused_until - now
        async with share.lock:  # one lease at a time: whoever waited here may find the tokens it brought
            now = self._clock()
            if share.take_local(now):
                return 0.0
            if now < share.refused_until:
                return share.refused_until - now
            try:
                grant = await self._leases.lease(key, limit, share.chunk(self._horizon_s), now)
            except DependencyUnavailable as exc:
                log.warning("rate_limit_fallback", key_id=key, reason=str(exc))
                return float(self._fallback.check(key, limit, now))
            if grant.granted < 1:
                share.refused_until = now + grant.retry_after_s
                return grant.retry_after_s
            share.tokens, share.lapses_at = grant.granted - 1, now + 2 * self._horizon_s
            return 0.0

    async def hold_off(self, key: str, limit: RateLimit, seconds: float) -> None:
        """No token for `key` anywhere in the fleet for `seconds` (a provider said 429): this replica's share is
        dropped and the shared bucket pushed back."""
        now = self._clock()
        self._shares.pop(key, None)
        share = self._share(key, limit)
        share.refused_until = now + seconds
        await self._leases.hold_off(key, limit, now + seconds)

    def _share(self, key: str, limit: RateLimit) -> _Share:
        share = self._shares.get(key)
        if share is None or share.limit != limit:  # a changed limit starts a new share (tokens leased under it)
            share = _Share(limit)
            self._shares[key] = share
        self._shares.move_to_end(key)
        while len(self._shares) > self._max_keys:
            self._shares.popitem(last=False)
        return share
