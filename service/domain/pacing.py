"""Provider pacing: calls on one provider resource (a sender number, an AI API key), across every worker of the
fleet, at the provider's rate.

Providers limit each resource, not each caller: Twilio each sender (a WhatsApp sender about 80 messages a second
by default, a US long code one segment a second; 429 / error 20429 past it), OpenAI each API key (requests and
tokens a minute; 429 `rate_limit_exceeded`). Calling as fast as the worker slots allow and relying on retries
turns a large campaign into a storm of refusals that burns receives. Here each call first takes a token from its
resource's bucket, shared by the fleet (`FleetRateLimiter` over the rate-limits table, leased in chunks), waiting
for one when the bucket is empty; a 429 pushes the shared bucket back, so every worker slows down at once.

`Pace` is that mechanism for any bucket key; `SendPacing` applies it to sends (key `send#<channel>#<sender>`,
rate the project's `sends_per_second` for that channel when it sets one, else the channel's default), and
`service.domain.ai_pacing` to AI calls. A wait longer than `max_wait_s` is not waited in a worker slot: the
message goes back to the queue for that long instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog

from service.domain.errors import DependencyUnavailable
from service.domain.fleet_rate_limit import FleetRateLimiter
from service.domain.provider_ports import OutboundMessage
from service.domain.rate_limit import RateLimit

log = structlog.get_logger(__name__)

DEFAULT_HOLD_OFF_S = 1.0  # after a 429 that names no wait
MAX_HOLD_OFF_S = 60.0  # the window of a per-minute limit: a longer refusal is learnt again from the next 429


def pace_limit(per_second: float) -> RateLimit:
    """A resource's bucket: `per_second`, with a burst of one second's worth (at least one)."""
    return RateLimit(per_second=per_second, burst=max(1, int(per_second)))


def hold_off_seconds(retry_after_s: float | None) -> float:
    """How long a resource is left alone after a 429: the wait the provider named, else `DEFAULT_HOLD_OFF_S`,
    at most `MAX_HOLD_OFF_S`."""
    return min(retry_after_s or DEFAULT_HOLD_OFF_S, MAX_HOLD_OFF_S)


@dataclass(frozen=True, slots=True)
class Turn:
    """A `wait_turn`: `waited_s` spent sleeping for it; `later_s` > 0 when no token was taken (due that far off)."""

    waited_s: float
    later_s: float = 0.0


class Pace:
    """Turns from fleet-shared buckets: `wait_turn` takes one, waiting for it within a bound; `hold_off` empties
    a bucket for every worker after the provider said 429."""

    def __init__(
        self, limiter: FleetRateLimiter, sleep: Callable[[float], Awaitable[None]], *, max_wait_s: float = 30.0
    ) -> None:
        self._limiter = limiter
        self._sleep = sleep
        self.max_wait_s = max_wait_s

    async def wait_turn(self, key: str, limit: RateLimit, max_wait_s: float | None = None) -> Turn:
        """Take one token of `key`, waiting for it up to `max_wait_s` (default: the pace's); a token further off
        is not waited for (nothing taken: the caller comes back `later_s` from now)."""
        bound = self.max_wait_s if max_wait_s is None else max_wait_s
        waited = 0.0
        while (wait := await self._limiter.admit(key, limit)) > 0:
            if waited + wait > bound:
                return Turn(waited, wait)
            await self._sleep(wait)
            waited += wait
        return Turn(waited)

    async def hold_off(self, key: str, limit: RateLimit, retry_after_s: float | None) -> float:
        """No token of `key` anywhere in the fleet for `retry_after_s` (capped; `DEFAULT_HOLD_OFF_S` when the
        provider named no wait): the seconds held off."""
        hold_s = hold_off_seconds(retry_after_s)
        try:
            await self._limiter.hold_off(key, limit, hold_s)
        except DependencyUnavailable as exc:  # this replica still holds off; the others learn from their own 429
            log.warning("pace_hold_off_not_shared", reason=str(exc))
        return hold_s


class SendPacing:
    def __init__(
        self,
        limiter: FleetRateLimiter,
        defaults: Mapping[str, float],
        sleep: Callable[[float], Awaitable[None]],
        *,
        max_wait_s: float = 30.0,
    ) -> None:
        self._pace = Pace(limiter, sleep, max_wait_s=max_wait_s)
        self._defaults = dict(defaults)

    def _paced(self, message: OutboundMessage) -> tuple[str, RateLimit] | None:
        per_second = message.sends_per_second or self._defaults.get(message.channel)
        if not per_second:
            return None  # a channel without a documented sender limit (email): not paced
        return f"send#{message.channel}#{message.sender}", pace_limit(per_second)

    async def wait_turn(self, message: OutboundMessage) -> float:
        """Take this send's token, waiting for it up to `max_wait_s`: 0.0 once taken, else the seconds still to
        wait (nothing taken: the caller sends later)."""
        paced = self._paced(message)
        if paced is None:
            return 0.0
        wait = (await self._pace.wait_turn(*paced)).later_s
        if wait:
            log.info("send_paced_later", channel=message.channel, wait_s=round(wait, 3))
        return wait

    async def rate_limited(self, message: OutboundMessage, retry_after_s: float | None) -> None:
        """The provider answered 429 for this sender: no send from it, fleet-wide, for a while."""
        paced = self._paced(message)
        if paced is None:
            return
        hold_s = await self._pace.hold_off(*paced, retry_after_s)
        log.warning("send_rate_limited", channel=message.channel, hold_off_s=hold_s)
