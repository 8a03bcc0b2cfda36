"""Jittered exponential delays: when a retried message reappears, and how long the poller rests after an error."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

MAX_VISIBILITY_S = 43200  # SQS: 12 hours
_MAX_DOUBLINGS = 32


def jittered_exponential_s(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Equal jitter: half to all of min(cap, base * 2^(attempt-1)), attempt counted from 1."""
    doublings: int = min(max(attempt, 1) - 1, _MAX_DOUBLINGS)
    ceiling = min(cap_s, base_s * float(2**doublings))
    return (rng or random).uniform(ceiling / 2, ceiling)


def retry_delay_s(receive_count: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> int:
    """Whole seconds before a retried message reappears, at least 1."""
    return min(MAX_VISIBILITY_S, max(1, math.ceil(jittered_exponential_s(receive_count, base_s, cap_s, rng))))


@dataclass(slots=True)
class PollBackoff:
    """Rest after consecutive polling errors, reset by a good poll."""

    base_s: float
    cap_s: float
    failures: int = 0

    def next_delay_s(self) -> float:
        self.failures += 1
        return jittered_exponential_s(self.failures, self.base_s, self.cap_s)

    def reset(self) -> None:
        self.failures = 0
