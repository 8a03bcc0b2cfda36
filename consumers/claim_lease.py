"""What both processors do with a conversation claim while they work: keep it alive, and the retry outcome."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog

from consumers.contracts import Outcome
from service.domain.errors import DependencyUnavailable
from service.domain.provider_ports import TransientProviderError

log = structlog.get_logger(__name__)


@asynccontextmanager
async def kept_alive(refresh: Callable[[], Awaitable[object]], interval_s: float) -> AsyncIterator[None]:
    """Call `refresh` every `interval_s` while the body runs (rare: a slow AI call outliving half the lease)."""

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await refresh()
            except DependencyUnavailable as exc:
                log.warning("claim_refresh_failed", detail=str(exc))

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()


def transient_retry(step: str, exc: TransientProviderError) -> Outcome:
    """Retry later, after the provider's Retry-After when it gave one."""
    log.warning("transient_failure", step=step, reason=exc.reason)
    return Outcome.retry(f"{step}_transient", math.ceil(exc.retry_after_s) if exc.retry_after_s else None)
