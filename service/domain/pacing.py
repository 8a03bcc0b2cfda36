"""Provider pacing: sends from one sender number, across every worker of the fleet, at the provider's rate.

Twilio limits each sender (a WhatsApp sender about 80 messages a second by default, a US long code one segment a
second) and answers 429 (error 20429) past it. Sending as fast as the worker slots allow and relying on retries
turns a large campaign into a storm of refusals that burns receives. Here each send first takes a token from its
sender's bucket, shared by the fleet (`FleetRateLimiter` over the rate-limits table, leased in chunks), waiting
for one when the bucket is empty; a 429 pushes the shared bucket back, so every worker slows down at once.

The key is the channel and the sender (`send#whatsapp#+44...`); the rate is the project's `sends_per_second` for
that channel when it sets one, else the channel's default (settings). A wait longer than `max_wait_s` is not
waited in a worker slot: the message goes back to the queue for that long instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import structlog

from service.domain.errors import DependencyUnavailable
from service.domain.fleet_rate_limit import FleetRateLimiter
from service.domain.provider_ports import OutboundMessage
from service.domain.rate_limit import RateLimit

log = structlog.get_logger(__name__)

DEFAULT_HOLD_OFF_S = 1.0  # after a 429 that names no Retry-After


def pace_limit(per_second: float) -> RateLimit:
    """A sender's bucket: `per_second`, with a burst of one second's worth (at least one)."""
    return RateLimit(per_second=per_second, burst=max(1, int(per_second)))


class SendPacing:
    def __init__(
        self,
        limiter: FleetRateLimiter,
        defaults: Mapping[str, float],
        sleep: Callable[[float], Awaitable[None]],
        *,
        max_wait_s: float = 30.0,
    ) -> None:
        self._limiter = limiter
        self._defaults = dict(defaults)
        self._sleep = sleep
        self._max_wait_s = max_wait_s

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
        key, limit = paced
        waited = 0.0
        while (wait := await self._limiter.admit(key, limit)) > 0:
            if waited + wait > self._max_wait_s:
                log.info("send_paced_later", channel=message.channel, wait_s=round(wait, 3))
                return wait
            await self._sleep(wait)
            waited += wait
        return 0.0

    async def rate_limited(self, message: OutboundMessage, retry_after_s: float | None) -> None:
        """The provider answered 429 for this sender: no send from it, fleet-wide, for a while."""
        paced = self._paced(message)
        if paced is None:
            return
        key, limit = paced
        hold_s = retry_after_s or DEFAULT_HOLD_OFF_S
        log.warning("send_rate_limited", channel=message.channel, hold_off_s=hold_s)
        try:
            await self._limiter.hold_off(key, limit, hold_s)
        except DependencyUnavailable as exc:  # this replica still holds off; the others learn from their own 429
            log.warning("send_hold_off_not_shared", reason=str(exc))
