"""Sampling during the load and the figures of the steady-state window.

Every `interval_s` a `Sample` records messages sent (Twilio sandbox), the service's CPU time and RSS,
moto's and this process's CPU time, the proxy's AWS request counters and the AI calls in flight. The
steady-state window runs from the sample where `lo` conversations of the load were sent to the one where
`n - lo` were (lo = min(C, N/4)): the ramp-up (first AI latency) and the drain (fewer than C left) are out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.aws_proxy import CountingProxy, CountsSnapshot
from bench.procfs import ProcessSample, cpu_seconds, machine_cpu_seconds, own_cpu_seconds, sample_process
from bench.sandboxes import Sandboxes
from bench.write_units import per_unit_of_work


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.monotonic()
    sent: int
    service: ProcessSample
    moto_cpu_s: float
    bench_cpu_s: float
    machine_busy_s: float  # every process on every core
    machine_steal_s: float
    aws: CountsSnapshot
    ai_in_flight: int


class Probe:
    def __init__(self, service_pid: int, moto_pid: int, sandboxes: Sandboxes, proxy: CountingProxy) -> None:
        self._service_pid = service_pid
        self._moto_pid = moto_pid
        self._sandboxes = sandboxes
        self._proxy = proxy

    def take(self) -> Sample:
        busy, steal = machine_cpu_seconds()
        return Sample(
            at=time.monotonic(),
            sent=self._sandboxes.messages_sent,
            service=sample_process(self._service_pid),
            moto_cpu_s=cpu_seconds(self._moto_pid),
            bench_cpu_s=own_cpu_seconds(),
            machine_busy_s=busy,
            machine_steal_s=steal,
            aws=self._proxy.counter.snapshot(),
            ai_in_flight=self._sandboxes.openai_stats.in_flight,
        )


async def sample_until(
    probe: Probe, done: Callable[[Sample], bool], *, interval_s: float, timeout_s: float
) -> list[Sample]:
    """Samples every `interval_s` until `done(sample)` or `timeout_s` (then the caller sees it was not done)."""
    samples = [probe.take()]
    deadline = time.monotonic() + timeout_s
    while not done(samples[-1]) and time.monotonic() < deadline:
        await asyncio.sleep(interval_s)
        samples.append(probe.take())
    return samples


@dataclass(frozen=True, slots=True)
class WindowFigures:
    seconds: float
    conversations: int
    conversations_per_s: float
    cpu_ms_per_conversation: float
    service_cpu_share: float  # of one core
    moto_cpu_share: float
    bench_cpu_share: float  # sandboxes + counting proxy + feeder + sampling
    other_cpu_share: float  # every other process on the machine (noise: should be near 0)
    steal_share: float  # CPU the hypervisor took away
    moto_cpu_ms_per_request: float  # moto CPU / AWS requests the service made (the feeder's few batches included)
    moto_cpu_ms_per_conversation: float
    aws_requests_per_conversation: float
    aws_by_operation: dict[str, float]  # requests per conversation
    aws_upstream_ms: dict[str, float]  # mean time moto took per request, through the proxy
    aws_errors: dict[str, int]
    ai_in_flight_mean: float
    write_units: dict[str, float]  # DynamoDB write units per conversation: total, base tables, GSIs, each


def steady_window(samples: Sequence[Sample], base_sent: int, n: int, c: int) -> tuple[Sample, Sample]:
    """From the sample where `lo` conversations were sent to the one where `n - lo` were; a load that timed out
    (the verification says so) ends at its last sample, one that never reached `lo` starts at its first."""
    lo = max(1, min(c, n // 4))
    first = next((s for s in samples if s.sent - base_sent >= lo), samples[0])
    last = next((s for s in samples if s.sent - base_sent >= n - lo), samples[-1])
    if last.at <= first.at:
        raise RuntimeError("the steady-state window is empty: raise --conversations")
    return first, last


def window_figures(samples: Sequence[Sample], first: Sample, last: Sample) -> WindowFigures:
    seconds = last.at - first.at
    done = last.sent - first.sent
    aws = last.aws.since(first.aws)
    inside = [s.ai_in_flight for s in samples if first.at <= s.at <= last.at]
    service_s = last.service.cpu_s - first.service.cpu_s
    moto_s = last.moto_cpu_s - first.moto_cpu_s
    bench_s = last.bench_cpu_s - first.bench_cpu_s
    return WindowFigures(
        seconds=seconds,
        conversations=done,
        conversations_per_s=done / seconds,
        cpu_ms_per_conversation=service_s * 1000 / max(1, done),
        service_cpu_share=service_s / seconds,
        moto_cpu_share=moto_s / seconds,
        bench_cpu_share=bench_s / seconds,
        other_cpu_share=max(0.0, last.machine_busy_s - first.machine_busy_s - service_s - moto_s - bench_s) / seconds,
        steal_share=(last.machine_steal_s - first.machine_steal_s) / seconds,
        moto_cpu_ms_per_request=moto_s * 1000 / max(1, aws.total),
        moto_cpu_ms_per_conversation=moto_s * 1000 / max(1, done),
        aws_requests_per_conversation=aws.total / max(1, done),
        aws_by_operation={op: n / max(1, done) for op, n in sorted(aws.requests.items())},
        aws_upstream_ms={op: aws.upstream_s[op] * 1000 / n for op, n in sorted(aws.requests.items()) if n},
        aws_errors=dict(aws.errors),
        ai_in_flight_mean=sum(inside) / max(1, len(inside)),
        write_units=per_unit_of_work(aws.write_units, done),
    )


def step_means_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean time per consumer step (claim, secrets, ai, send, final_update) between two /metrics scrapes."""
    means: dict[str, float] = {}
    for key, total in after.items():
        if not key.startswith("comms_step_duration_seconds_sum{"):
            continue
        count_key = key.replace("_sum{", "_count{", 1)
        count = after.get(count_key, 0.0) - before.get(count_key, 0.0)
        if count > 0:
            step = key.split("step=", 1)[1].split(",", 1)[0].rstrip("}")
            means[step] = (total - before.get(key, 0.0)) * 1000 / count
    return means


def finished_by_reason(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Messages the service finished between two /metrics scrapes, by `reason` (sent, already_done, ...)."""
    counts: dict[str, int] = {}
    for key, total in after.items():
        if key.startswith("comms_messages_finished_total{") and "reason=" in key:
            reason = key.split("reason=", 1)[1].split(",", 1)[0].rstrip("}")
            delta = int(total - before.get(key, 0.0))
            if delta:
                counts[reason] = counts.get(reason, 0) + delta
    return counts
