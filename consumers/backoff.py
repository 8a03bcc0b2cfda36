"""Jittered exponential delays: when a retried message reappears, and how long the poller rests after an error."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

MAX_VISIBILITY_S = 43200  # SQS: 12 hours
_MAX_DOUBLINGS = 32


def capped_exponential(attempt: int, base_s: float, cap_s: float) -> float:
    """min(cap, base * 2^(attempt-1)) for attempt >= 1."""
    doublings: int = min(max(attempt, 1) - 1, _MAX_DOUBLINGS)
    return min(cap_s, base_s * float(2**doublings))


def retry_delay_s(receive_count: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> int:
    """Whole seconds before a retried message reappears: half to all of the capped exponential, at least 1."""
    ceiling = capped_exponential(receive_count, base_s, cap_s)
    jittered = (rng or random).uniform(ceiling / 2, ceiling)
    return min(MAX_VISIBILITY_S, max(1, math.ceil(jittered)))


@dataclass(slots=True)
class PollBackoff:
    """Rest after consecutive polling errors: capped exponential with equal jitter, reset by a good poll."""

    base_s: float
    cap_s: float
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay_s(self) -> float:
        self.failures += 1
        ceiling = capped_exponential(self.failures, self.base_s, self.cap_s)
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0
