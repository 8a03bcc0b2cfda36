"""Per-API-key token buckets. The clock is passed in, so the arithmetic is testable without sleeping."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass


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
        wait = bucket.take(now)
        return 0 if wait == 0 else max(1, math.ceil(wait))
