"""The template mode's steady-state window (bench/measure.py): ramp and drain left out, and a load that timed out
still gets figures (its verification fails it) instead of crashing the run."""

from __future__ import annotations

from collections import Counter

from bench.aws_proxy import CountsSnapshot
from bench.measure import Sample, steady_window
from bench.procfs import ProcessSample


def sample(at: float, sent: int) -> Sample:
    idle = ProcessSample(cpu_s=at, rss_kb=1000, peak_rss_kb=1000)
    return Sample(at, sent, idle, 0.0, 0.0, 0.0, 0.0, CountsSnapshot(Counter(), Counter(), {}), 0)


def test_the_window_leaves_out_the_first_and_last_c_conversations() -> None:
    samples = [sample(t, sent) for t, sent in enumerate([0, 5, 10, 50, 90, 95, 100])]
    first, last = steady_window(samples, base_sent=0, n=100, c=10)
    assert (first.sent, last.sent) == (10, 90)


def test_a_load_that_timed_out_ends_its_window_at_the_last_sample() -> None:
    samples = [sample(t, sent) for t, sent in enumerate([0, 10, 20, 30])]
    first, last = steady_window(samples, base_sent=0, n=100, c=10)
    assert (first.sent, last.sent) == (10, 30)
