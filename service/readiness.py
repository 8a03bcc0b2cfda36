"""What /readyz reports: AWS reachable, consumers running (when this process runs them), not draining."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Readiness:
    """Flags the worker and the shutdown path flip; the probe result is cached briefly."""

    expects_consumers: bool = False
    consumers_running: Callable[[], bool] = field(default=lambda: False)
    draining: bool = False
    probe_ttl_s: float = 5.0
    _last_probe_at: float = field(default=-1e9)
    _last_problems: list[str] = field(default_factory=list)

    async def problems(self, probe_aws: Callable[[], Awaitable[list[str]]]) -> list[str]:
        found: list[str] = []
        if self.draining:
            found.append("draining")
        if self.expects_consumers and not self.consumers_running():
            found.append("consumers not running")
        now = time.monotonic()
        if now - self._last_probe_at > self.probe_ttl_s:
            try:
                self._last_problems = await asyncio.wait_for(probe_aws(), timeout=3.0)
            except TimeoutError:
                self._last_problems = ["aws probe timed out"]
            self._last_probe_at = now
        return found + self._last_problems
