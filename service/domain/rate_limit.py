"""Per-API-key rate limits: a token bucket per key in one process, and the rules of the bucket the api replicas
share (GCRA, `take_tokens`; see `fleet_rate_limit`). Clocks are passed in, so the arithmetic is testable without
sleeping."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RateLimit:
    per_second: float
    burst: int


@dataclass(slots=True)
class TokenBucket:
    limit: RateLimit
    tokens: float
    updated_at: float

    def take(self, now: float) -> float:
        """Take one token; return 0 when allowed, else the seconds until a token is due."""
        elapsed = max(0.0, now - self.updated_at)
        self.tokens = min(float(self.limit.burst), self.tokens + elapsed * self.limit.per_second)
        self.updated_at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.limit.per_second


class KeyRateLimit(Protocol):
    """What the endpoint asks: `check(key, limit)` is 0 when the request may go ahead, else the whole seconds to
    put in `Retry-After`. `ReplicaRateLimiter` (this process alone) or `fleet_rate_limit.FleetRateLimiter`."""

    async def check(self, key: str, limit: RateLimit) -> int: ...


class RateLimiter:
    """Buckets keyed by API key id; the least recently used are evicted past `max_keys`."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._max_keys = max_keys

    def check(self, key: str, limit: RateLimit, now: float) -> int:
        """0 when the request may go ahead, else the whole seconds to put in `Retry-After`."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket.limit != limit:
            tokens = float(limit.burst) if bucket is None else min(bucket.tokens, float(limit.burst))
            bucket = TokenBucket(limit=limit, tokens=tokens, updated_at=now)
            self._buckets[key] = bucket
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return retry_after_seconds(bucket.take(now))


def retry_after_seconds(wait_s: float) -> int:
    """A wait as `check` answers it: 0 to go ahead, else whole seconds for `Retry-After`, at least 1."""
    return 0 if wait_s == 0 else max(1, math.ceil(wait_s))


class ReplicaRateLimiter:
    """The limit enforced by this process alone (`rate_limit_scope=replica`): N replicas allow N times it."""

    def __init__(self, clock: Callable[[], float], max_keys: int = 10_000) -> None:
        self._buckets = RateLimiter(max_keys)
        self._clock = clock

    async def check(self, key: str, limit: RateLimit) -> int:
        return self._buckets.check(key, limit, self._clock())


MICROS = 1_000_000


@dataclass(frozen=True, slots=True)
class Take:
    """The outcome of a take on the shared bucket: `granted` tokens and the new `tat` (microseconds), or none and
    the microseconds until one is due."""

    granted: int
    tat_us: int
    retry_after_us: int = 0


def interval_us(limit: RateLimit) -> int:
    return max(1, round(MICROS / limit.per_second))


def take_tokens(tat_us: int | None, now_us: int, limit: RateLimit, wanted: int) -> Take:
    """Up to `wanted` tokens from a bucket whose state is `tat_us` (None: never used, i.e. full)."""
    interval = interval_us(limit)
    start = now_us if tat_us is None else max(tat_us, now_us)
    available = (now_us + limit.burst * interval - start) // interval
    granted = min(wanted, available)
    if granted < 1:
        return Take(0, start, retry_after_us=start - limit.burst * interval + interval - now_us)
    return Take(granted, start + granted * interval)


def held_off_tat(limit: RateLimit, until_us: int) -> int:
    """The `tat` at which a bucket's next token is due at `until_us` (and none before)."""
    return until_us + (limit.burst - 1) * interval_us(limit)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a lease obtained: tokens, or none and the seconds until one is due."""

    granted: int
    retry_after_s: float = 0.0
