"""AI pacing: calls on one OpenAI API key, across every worker of the fleet, at the key's rate.

OpenAI limits each key (each organisation/project behind it) in requests and tokens a minute and answers 429
`rate_limit_exceeded` past either. `PacedAiWriter` wraps any `AiWriter` (the consumers do not change):
- before each write it takes a turn from the key's bucket (`pacing.Pace`, shared by the fleet through the
  rate-limits table): the project's `requests_per_second` for that key when the request carries one, else
  `settings.ai_requests_per_second`; 0 means not paced. A turn further off than `max_wait_s` is not waited in a
  worker slot: `ProviderPaced`, and the message waits in the queue that long without burning a receive.
- a 429 that reaches it (`ProviderRateLimited`: the OpenAI writer does not retry a refused create itself) holds
  the key off for the whole fleet for the wait OpenAI named, then the write takes a turn again, within the same
  bound; after `max_attempts` refusals in a row the message goes back as paced too.

The bucket key is `ai#` + a digest of the API key, never the key: it is stored in the rate-limits table and
named in logs. Tokens a minute are honoured through the 429s alone (the wait OpenAI names for its token limit is
held off like any other): see `pace_for` for why there is no token bucket.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from service.domain.fleet_rate_limit import FleetRateLimiter
from service.domain.pacing import Pace, hold_off_seconds, pace_limit
from service.domain.ports import AiWriter, TokenLeases
from service.domain.provider_ports import AiRequest, AiResult, ProviderPaced, ProviderRateLimited
from service.domain.rate_limit import RateLimit

log = structlog.get_logger(__name__)

AI_BUCKET_PREFIX = "ai#"
DEFAULT_MAX_ATTEMPTS = 3  # writes per call that OpenAI may refuse with 429 before the message is put back


def ai_bucket_key(api_key: str) -> str:
    """The key's bucket in the rate-limits table: a digest (64 bits), so the table and the logs never hold it."""
    return AI_BUCKET_PREFIX + hashlib.sha256(api_key.encode()).hexdigest()[:16]


def pace_for(request: AiRequest, default_per_second: float) -> RateLimit | None:
    """The key's bucket for this request, or None when it is not paced.

    Requests only: a token bucket would need each call's tokens before it is made, and the tokens OpenAI counts
    for a chained exchange include the whole conversation it holds (`previous_response_id`), which the request
    does not carry; an estimate from the new input alone would undercount the calls that matter most. The
    token limit is honoured by holding the key off for the wait its 429 names."""
    per_second = request.requests_per_second or default_per_second
    return pace_limit(per_second) if per_second > 0 else None


class AiPaceSettings(Protocol):
    """What `paced_ai_writer` reads of the settings (`service.config.Settings` has both)."""

    @property
    def ai_requests_per_second(self) -> float: ...

    @property
    def send_pace_max_wait_s(self) -> float: ...


class PacedAiWriter:
    """`AiWriter` that paces `inner` per API key, fleet-wide, and backs off the whole fleet on a 429."""

    def __init__(
        self,
        inner: AiWriter,
        pace: Pace,
        default_per_second: float,
        sleep: Callable[[float], Awaitable[None]],
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self._inner = inner
        self._pace = pace
        self._default_per_second = default_per_second
        self._sleep = sleep
        self._max_attempts = max_attempts

    async def write(self, request: AiRequest) -> AiResult:
        limit = pace_for(request, self._default_per_second)
        key = ai_bucket_key(request.api_key)
        budget_s = self._pace.max_wait_s  # what this call may spend waiting in its worker slot, 429s included
        attempt = 1
        while True:
            if limit is not None:
                turn = await self._pace.wait_turn(key, limit, budget_s)
                if turn.later_s:
                    log.info("ai_paced_later", key_id=key, wait_s=round(turn.later_s, 3))
                    raise ProviderPaced("ai_paced", code="ai_key_pace", retry_after_s=turn.later_s)
                budget_s -= turn.waited_s
            try:
                return await self._inner.write(request)
            except ProviderRateLimited as exc:
                hold_s = await self._back_off(key, limit, exc)
                if attempt >= self._max_attempts or hold_s > budget_s:
                    raise ProviderPaced("ai_rate_limited", code=exc.code, retry_after_s=hold_s) from exc
                if limit is None:  # no shared bucket to wait on: this slot waits the 429 out itself
                    await self._sleep(hold_s)
                    budget_s -= hold_s
                attempt += 1

    async def _back_off(self, key: str, limit: RateLimit | None, exc: ProviderRateLimited) -> float:
        """Hold the key off fleet-wide when it is paced: the seconds before its next call."""
        if limit is None:
            hold_s = hold_off_seconds(exc.retry_after_s)
        else:
            hold_s = await self._pace.hold_off(key, limit, exc.retry_after_s)
        log.warning("ai_rate_limited", key_id=key, code=exc.code, hold_off_s=hold_s, paced=limit is not None)
        return hold_s


def paced_ai_writer(
    settings: AiPaceSettings,
    leases: TokenLeases,
    writer: AiWriter,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> PacedAiWriter:
    """The decorator the composition root puts around the OpenAI writer, one per process (its leased shares
    serve every consumer): always, even at `ai_requests_per_second` 0, for a project's own pace and the 429s."""
    pace = Pace(FleetRateLimiter(leases, clock), sleep, max_wait_s=settings.send_pace_max_wait_s)
    return PacedAiWriter(writer, pace, settings.ai_requests_per_second, sleep)
