"""The template mode: one run of the template sender (worker role), loaded through its queue, measured, verified.

Phases: setup (`bench.stack`: moto, proxy, tables and queues, sandboxes, demo tenant, endpoint ceiling; N context
messages built by the initiate path; the write-unit ledger primed) → service start → warm-up (a few
conversations, then the idle RSS) → load (steady feed or N messages made visible at once, sampled until all are
sent) → stop and verify.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from bench.ceiling import Ceiling
from bench.measure import (
    Probe,
    Sample,
    WindowFigures,
    finished_by_reason,
    sample_until,
    steady_window,
    step_means_ms,
    window_figures,
)
from bench.options import RESULTS_DIR, BenchOptions
from bench.otlp_collector import CollectorCounts
from bench.procfs import ProcessSample
from bench.stack import (
    Stack,
    StackConfig,
    machine,
    measure_ceilings,
    open_stack,
    prime_write_units,
    say,
    shadow_drift,
    start_service,
)
from bench.verify import Verification, verify
from bench.workload import ContextMessage, build_messages, enqueue, feed

SETTLE_S = 3.0  # after the last send: final updates, batched deletes, then the RSS reading
IDLE_S = 5.0  # the idle service's own CPU use (long polls, heartbeat ticks) is measured over this
ENQUEUE_RATE_PER_S = 100.0  # a cautious guess of SendMessageBatch entries moto takes per second


@dataclass(frozen=True, slots=True)
class BenchRun:
    options: BenchOptions
    machine: dict[str, Any]
    ceilings: list[Ceiling]
    idle: ProcessSample  # after the warm-up
    idle_cpu_share: float  # of one core, the service doing nothing (long polls, timers)
    after_load: ProcessSample
    peak_rss_kb: int  # most RSS sampled during the load
    steady: WindowFigures
    whole_load: WindowFigures
    step_ms: dict[str, float]
    finished_by_reason: dict[str, int]  # the service's own count of finished messages over the load, by reason
    enqueue_overrun_s: float  # > 0: enqueueing was still going when the messages became visible
    resent_lost: int  # messages moto lost (send/delete race) that the benchmark queued again
    service_exit_code: int | None
    verification: Verification
    tracing: CollectorCounts | None  # what the service exported over the load (None: tracing off)
    write_units_unmodelled: dict[str, int]  # DynamoDB writes the write-unit ledger could not charge
    write_units_drift: dict[str, int]  # the ledger's item images against moto's items at the end


async def warm_up(stack: Stack, probe: Probe, messages: list[ContextMessage], options: BenchOptions) -> None:
    if not messages:
        return
    await enqueue(stack.deps.aws.sqs, stack.queue_url, messages, visible_at=time.time())
    target = len(messages)
    samples = await sample_until(
        probe, lambda s: s.sent >= target, interval_s=0.2, timeout_s=60 + 5 * options.ai_latency_s
    )
    if samples[-1].sent < target:
        raise RuntimeError(f"warm-up: only {samples[-1].sent}/{target} messages sent; see the service log")
    await asyncio.sleep(SETTLE_S)


async def enqueue_upfront(stack: Stack, messages: list[ContextMessage]) -> float:
    """All N queued, visible at one moment; returns how late the enqueueing finished (> 0: it overran)."""
    visible_at = time.time() + 2.0 + len(messages) / ENQUEUE_RATE_PER_S
    await enqueue(stack.deps.aws.sqs, stack.queue_url, messages, visible_at=visible_at)
    overrun = time.time() - visible_at
    say(f"{len(messages)} messages queued, visible in {-overrun:.1f} s")
    return overrun


def start_feeder(
    stack: Stack, messages: list[ContextMessage], base_sent: int, options: BenchOptions
) -> asyncio.Task[None]:
    def finished() -> int:
        return stack.sandboxes.messages_sent - base_sent

    def ramp(elapsed_s: float) -> int:  # C per L: the first C start spread over one AI latency
        return math.ceil(options.concurrency * elapsed_s / options.ai_latency_s)

    say(f"feeding {len(messages)} messages: C over the first L, then at most {options.ahead} queued or in flight")
    sqs, url = stack.deps.aws.sqs, stack.queue_url
    return asyncio.create_task(feed(sqs, url, messages, finished, options.ahead, ramp))


async def queue_is_empty(stack: Stack) -> bool:
    names = [
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    ]
    answer = await stack.deps.aws.sqs.get_queue_attributes(QueueUrl=stack.queue_url, AttributeNames=names)  # type: ignore[arg-type]
    return all(int(value) == 0 for value in answer.get("Attributes", {}).values())


async def resend_lost(stack: Stack, messages: list[ContextMessage]) -> int:
    """Re-queue messages moto lost: nothing queued or in flight, yet their recipient got no message.

    moto's `Queue.delete_message` rebuilds the message list without its lock, so a SendMessage(Batch) that
    lands during a DeleteMessageBatch can vanish (and two concurrent deletes can undo one another: that
    message comes back after its visibility timeout and the service acknowledges it as already done).
    """
    sent_to = {m.to.removeprefix("whatsapp:") for m in stack.sandboxes.twilio_state.messages.values()}
    lost = [m for m in messages if m.recipient not in sent_to]
    if lost:
        say(f"moto lost {len(lost)} queued messages (send/delete race); sending them again")
        await enqueue(stack.deps.aws.sqs, stack.queue_url, lost, visible_at=0.0)
    return len(lost)


@dataclass(slots=True)
class LoadOutcome:
    samples: list[Sample]
    enqueue_overrun_s: float = 0.0
    resent_lost: int = 0


async def load(
    stack: Stack, probe: Probe, messages: list[ContextMessage], base_sent: int, options: BenchOptions
) -> LoadOutcome:
    """Put the load on the queue (steady feed or upfront), sample until every message was sent or time ran out.

    Sampling runs in stretches of `stall_s`; after a stretch without progress, once the feeder is done and the
    queue is empty, messages moto lost are sent again (see `resend_lost`).
    """
    upfront = options.feed == "upfront"
    outcome = LoadOutcome([], await enqueue_upfront(stack, messages) if upfront else 0.0)
    feeder = None if upfront else start_feeder(stack, messages, base_sent, options)
    target = base_sent + len(messages)
    deadline = time.monotonic() + 120 + 6 * len(messages) / options.ideal_per_s  # a guard against a hang only
    stall_s = max(15.0, 2 * options.ai_latency_s)
    say(f"load running; ideal C/L = {options.ideal_per_s:.1f} conv/s")
    try:
        while time.monotonic() < deadline:
            stretch = await sample_until(
                probe, lambda s: s.sent >= target, interval_s=options.sample_interval_s, timeout_s=stall_s
            )
            outcome.samples += stretch
            if stretch[-1].sent >= target:
                break
            if feeder is not None and feeder.done():
                feeder.result()  # re-raises a feeder failure
            fed = feeder is None or feeder.done()
            if fed and stretch[-1].sent == stretch[0].sent and await queue_is_empty(stack):
                outcome.resent_lost += await resend_lost(stack, messages)
        else:
            say(f"TIMEOUT: {outcome.samples[-1].sent - base_sent}/{len(messages)} sent")
    finally:
        if feeder is not None:
            feeder.cancel()
    return outcome


def template_stack(options: BenchOptions) -> StackConfig:
    return StackConfig(
        concurrency=options.concurrency,
        ai_latency_s=options.ai_latency_s,
        thread_latency_s=options.thread_latency_s,
        log_level=options.log_level,
        tracing=options.tracing,
    )


async def run_bench(options: BenchOptions) -> BenchRun:
    async with AsyncExitStack() as exits:
        stack = await open_stack(template_stack(options), exits)
        ceilings = await measure_ceilings(stack, options.ceiling_s)
        tenant = (stack.settings, stack.tenant.company_id, stack.tenant.project_id)
        warm = await build_messages(*tenant, range(options.warmup))
        messages = await build_messages(*tenant, range(options.warmup, options.warmup + options.conversations))
        say(f"{len(warm)} warm-up and {len(messages)} load context messages built by the initiate path")
        await prime_write_units(stack)

        suffix = "-traced" if options.tracing else ""
        log_path = RESULTS_DIR / f"template-c{options.concurrency}-l{options.ai_latency_s:g}{suffix}-service.log"
        service = await start_service(stack, exits, stack.service_settings(), "worker", log_path)
        say(f"service pid {service.pid} ready (worker role, C={options.concurrency}); log {service.log_path}")
        probe = Probe(service.pid, stack.moto.process.pid, stack.sandboxes, stack.proxy)

        await warm_up(stack, probe, warm, options)
        idle_from = probe.take()
        await asyncio.sleep(IDLE_S)
        idle = probe.take()
        idle_cpu_share = (idle.service.cpu_s - idle_from.service.cpu_s) / (idle.at - idle_from.at)
        metrics_before = await service.metrics()
        say(f"warm-up done; idle RSS {idle.service.rss_kb / 1024:.1f} MB, idle CPU {idle_cpu_share:.1%} of a core")

        traced_before = stack.collector.counts.snapshot() if stack.collector else None
        outcome = await load(stack, probe, messages, idle.sent, options)
        samples = outcome.samples
        await asyncio.sleep(SETTLE_S)
        after = probe.take()
        metrics_after = await service.metrics()
        exit_code = service.stop()
        say(f"load done; service stopped with exit code {exit_code}")
        traced = stack.collector.counts.since(traced_before) if stack.collector and traced_before else None

        drift = await shadow_drift(stack)
        verification = await verify(
            stack.deps.aws.dynamodb,
            stack.settings.conversations_table,
            [m.conversation_id for m in messages],
            [m.recipient for m in messages],
            stack.sandboxes.twilio_state,
        )
        total_sent = stack.sandboxes.messages_sent
        if total_sent != len(warm) + len(messages):
            verification.problems.append(f"the Twilio sandbox saw {total_sent} messages in all, not {len(warm)}+N")
        first, last = steady_window(samples, idle.sent, options.conversations, options.concurrency)
        return BenchRun(
            options=options,
            machine=machine(),
            ceilings=ceilings,
            idle=idle.service,
            idle_cpu_share=idle_cpu_share,
            after_load=after.service,
            peak_rss_kb=max(s.service.rss_kb for s in samples),
            steady=window_figures(samples, first, last),
            whole_load=window_figures(samples, samples[0], samples[-1]),
            step_ms=step_means_ms(metrics_before, metrics_after),
            finished_by_reason=finished_by_reason(metrics_before, metrics_after),
            enqueue_overrun_s=outcome.enqueue_overrun_s,
            resent_lost=outcome.resent_lost,
            service_exit_code=exit_code,
            verification=verification,
            tracing=traced,
            write_units_unmodelled=dict(stack.ledger.unmodelled),
            write_units_drift=drift,
        )
    raise AssertionError("unreachable")  # pragma: no cover - the stack always yields
