"""The fairness mode: a quiet tenant's dwell (enqueue → send) behind a noisy tenant's backlog on one queue.

One worker process (the whatsapp queue, C slots, model latency L) and two projects of the demo company: the noisy
one (the demo project) and a quiet one (a copy with its own project id and number). Three phases, each on an
emptied queue:

1. idle — the quiet tenant's trickle alone (`--quiet-rate` a second for `--phase-seconds`);
2. cap off — the noisy tenant queues `--noisy` conversations at once, then the trickle runs beside them;
3. cap on — the same with the noisy project's `concurrent_conversations` = `--cap` (default C/4): its messages
   over the cap are deferred (re-queued after COMMS_CONCURRENCY_DEFER_S, no receive burnt), so they no longer
   fill every slot.

The dwell of a quiet conversation runs from the moment the benchmark queued it to the Twilio sandbox's
`date_created` of its message; one not sent when the phase ends is counted as still waiting (the percentiles are
then a lower bound, marked ">="). Target (issue 14 §1): quiet p95 with the cap on <= 2 x its idle p95.

moto's SQS has no fair queues: MessageGroupId is kept but every message is served in queue order, so here only
the cap protects the quiet tenant. On AWS, SQS fair queues share the consumers out by tenant as well.
The service's AI pace per key is off (COMMS_AI_REQUESTS_PER_SECOND=0), so the model latency alone paces a slot.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

from bench.options import RESULTS_DIR, FairnessOptions
from bench.run import queue_is_empty
from bench.stack import Stack, StackConfig, open_stack, say, start_service
from bench.table import Row, check
from bench.workload import ContextMessage, build_messages, enqueue
from local_stack.seed import DEMO_COMPANY_ID, DEMO_PROJECT_ID
from service.adapters.aws.company_directory import DynamoCompanyDirectory
from service.domain.company import CompanyRecord, RateLimits

QUIET_PROJECT_ID = "pi-quiet-001"
QUIET_NUMBER = "+447700900009"
QUIET_INDEX_BASE = 5_000_000  # recipient numbers of the quiet tenant, apart from the noisy ones
COMPANY_CACHE_TTL_S = 1.0  # the service sees a changed cap within this
DRAIN_WAIT_S = 30.0  # after the trickle, how long the last quiet conversations may take
TARGET_FACTOR = 2.0
STOP_TIMEOUT_S = 150.0  # the service's stop budget (125 s) and a margin: the last phase leaves a backlog behind


@dataclass(slots=True)
class Phase:
    name: str
    cap: int | None
    noisy: int
    dwell_s: list[float] = field(default_factory=list)  # sent quiet conversations
    waiting: int = 0  # quiet conversations not sent when the phase ended
    noisy_sent: int = 0
    duration_s: float = 0.0

    def percentile(self, q: float) -> float | None:
        """The q-quantile of every quiet dwell, a still-waiting one counted as longer than any sent."""
        total = len(self.dwell_s) + self.waiting
        if total == 0:
            return None
        rank = max(1, math.ceil(q * total))
        ordered = sorted(self.dwell_s)
        return ordered[rank - 1] if rank <= len(ordered) else None

    def shown(self, q: float) -> str:
        value = self.percentile(q)
        if value is None:
            longest = max(self.dwell_s, default=self.duration_s)
            return f">= {max(longest, self.duration_s) * 1000:.0f} ms (not sent)"
        return f"{value * 1000:.0f} ms"


@dataclass(slots=True)
class FairnessRun:
    options: FairnessOptions
    phases: list[Phase]
    service_exit_code: int | None
    problems: list[str]


def quiet_company(noisy: CompanyRecord) -> CompanyRecord:
    whatsapp = noisy.channel_config.whatsapp
    assert whatsapp is not None
    channels = noisy.channel_config.model_copy(
        update={"whatsapp": whatsapp.model_copy(update={"company_whatsapp_number": QUIET_NUMBER})}
    )
    return noisy.model_copy(
        update={"project_id": QUIET_PROJECT_ID, "rate_limits": None, "channel_config": channels}, deep=True
    )


async def set_cap(companies: DynamoCompanyDirectory, record: CompanyRecord, cap: int | None) -> None:
    limits = (record.rate_limits or RateLimits()).model_copy(update={"concurrent_conversations": cap})
    await companies.put(record.model_copy(update={"rate_limits": limits}), overwrite=True)
    await asyncio.sleep(COMPANY_CACHE_TTL_S + 0.5)  # the service's cached record expires


class TimedMessages(dict[str, Any]):
    """The Twilio sandbox's messages by sid, noting when each recipient's first one was stored (the sandbox's own
    `date_created` has whole seconds only)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_at: dict[str, float] = {}

    def __setitem__(self, sid: str, message: Any) -> None:
        self.sent_at.setdefault(message.to.removeprefix("whatsapp:"), time.time())
        super().__setitem__(sid, message)


def sent_at_by_recipient(stack: Stack) -> dict[str, float]:
    messages = stack.sandboxes.twilio_state.messages
    assert isinstance(messages, TimedMessages)
    return messages.sent_at


async def empty_queue(stack: Stack, timeout_s: float = 120.0) -> None:
    """Receive and delete until nothing is queued, in flight or delayed (deferred copies included), so the next
    phase starts clean (PurgeQueue: once a minute only). The service keeps taking messages meanwhile."""
    sqs, url = stack.deps.aws.sqs, stack.queue_url
    deadline, quiet_checks = time.monotonic() + timeout_s, 0
    while time.monotonic() < deadline and quiet_checks < 2:
        answer = await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        messages = answer.get("Messages", [])
        if messages:
            entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
            await sqs.delete_message_batch(QueueUrl=url, Entries=entries)  # type: ignore[arg-type]
            continue
        quiet_checks = quiet_checks + 1 if await queue_is_empty(stack) else 0


async def run_phase(
    stack: Stack, options: FairnessOptions, phase: Phase, noisy: list[ContextMessage], quiet: list[ContextMessage]
) -> None:
    say(f"phase {phase.name}: noisy {len(noisy)} queued, quiet {len(quiet)} at {options.quiet_rate_per_s:g}/s")
    started = time.time()
    if noisy:
        await enqueue(stack.deps.aws.sqs, stack.queue_url, noisy, visible_at=0.0)
        await asyncio.sleep(2 * options.ai_latency_s)  # the noisy tenant fills the worker first
    queued_at: dict[str, float] = {}
    interval = 1.0 / options.quiet_rate_per_s
    first = time.monotonic()
    for i, message in enumerate(quiet):
        await asyncio.sleep(max(0.0, first + i * interval - time.monotonic()))
        queued_at[message.recipient] = time.time()
        await enqueue(stack.deps.aws.sqs, stack.queue_url, [message], visible_at=0.0)
    deadline = time.monotonic() + DRAIN_WAIT_S
    while time.monotonic() < deadline:
        sent = sent_at_by_recipient(stack)
        if all(r in sent for r in queued_at):
            break
        await asyncio.sleep(0.2)
    sent = sent_at_by_recipient(stack)
    phase.dwell_s = [sent[r] - at for r, at in queued_at.items() if r in sent]
    phase.waiting = sum(1 for r in queued_at if r not in sent)
    phase.noisy_sent = sum(1 for m in noisy if m.recipient in sent)
    phase.duration_s = time.time() - started
    say(f"phase {phase.name}: quiet p50 {phase.shown(0.5)}, p95 {phase.shown(0.95)}; noisy sent {phase.noisy_sent}")


async def run_fairness(options: FairnessOptions) -> FairnessRun:
    config = StackConfig(
        concurrency=options.concurrency,
        ai_latency_s=options.ai_latency_s,
        log_level=options.log_level,
        settings={
            "company_cache_ttl_s": COMPANY_CACHE_TTL_S,
            "concurrency_defer_s": options.defer_s,
            "ai_requests_per_second": 0.0,
        },
    )
    async with AsyncExitStack() as exits:
        stack = await open_stack(config, exits)
        stack.sandboxes.twilio_state.messages = TimedMessages()
        companies = DynamoCompanyDirectory(stack.deps.aws.dynamodb, stack.settings.company_table, 0)
        noisy_record = await companies.get(DEMO_COMPANY_ID, DEMO_PROJECT_ID)
        assert noisy_record is not None
        await companies.put(quiet_company(noisy_record), overwrite=True)
        await set_cap(companies, noisy_record, None)

        n, q = options.noisy, options.quiet_per_phase
        settings = stack.settings
        noisy_off = await build_messages(settings, DEMO_COMPANY_ID, DEMO_PROJECT_ID, range(n))
        noisy_on = await build_messages(settings, DEMO_COMPANY_ID, DEMO_PROJECT_ID, range(n, 2 * n))
        quiet = await build_messages(
            settings, DEMO_COMPANY_ID, QUIET_PROJECT_ID, range(QUIET_INDEX_BASE, QUIET_INDEX_BASE + 3 * q)
        )
        say(f"{2 * n} noisy and {3 * q} quiet context messages built by the initiate path")

        log_path = RESULTS_DIR / f"fairness-c{options.concurrency}-l{options.ai_latency_s:g}-service.log"
        service = await start_service(stack, exits, stack.service_settings(), "worker", log_path)
        say(f"service pid {service.pid} ready (worker role, C={options.concurrency}); log {service.log_path}")

        phases = [
            Phase("idle", None, 0),
            Phase("noisy, cap off", None, n),
            Phase(f"noisy, cap on ({options.cap})", options.cap, n),
        ]
        plans = [([], quiet[:q]), (noisy_off, quiet[q : 2 * q]), (noisy_on, quiet[2 * q :])]
        for i, (phase, (noisy, trickle)) in enumerate(zip(phases, plans, strict=True)):
            await set_cap(companies, noisy_record, phase.cap)
            await run_phase(stack, options, phase, noisy, trickle)
            if i < len(phases) - 1:
                await empty_queue(stack)
        # In a thread: the counting proxy and the sandboxes the draining service still calls live on this loop.
        exit_code = await asyncio.to_thread(service.stop, STOP_TIMEOUT_S)
        say(f"service stopped with exit code {exit_code}")

        problems: list[str] = []
        twilio = stack.sandboxes.twilio_state.messages.values()
        recipients = [m.to for m in twilio]
        if len(recipients) != len(set(recipients)):
            problems.append(f"{len(recipients) - len(set(recipients))} recipients got a message twice")
        if exit_code != 0:
            problems.append(f"the service exited with code {exit_code}")
        return FairnessRun(options, phases, exit_code, problems)
    raise AssertionError("unreachable")  # pragma: no cover - the stack always yields


def rows(run: FairnessRun) -> list[Row]:
    options = run.options
    idle, off, on = run.phases
    idle_p95 = idle.percentile(0.95)
    on_p95 = on.percentile(0.95)
    target = f"<= {TARGET_FACTOR:g} x idle p95" + (f" = {TARGET_FACTOR * idle_p95 * 1000:.0f} ms" if idle_p95 else "")
    table = [
        Row(
            "Setting",
            f"C={options.concurrency}, L={options.ai_latency_s:g} s, noisy {options.noisy} queued at once, quiet "
            f"{options.quiet_rate_per_s:g}/s for {options.phase_s:g} s per phase, cap {options.cap}, "
            f"defer {options.defer_s} s",
        ),
        Row("Fair queues", "not in moto's SQS (MessageGroupId kept, queue order served): only the cap protects here"),
    ]
    for phase in run.phases:
        sent = f"{len(phase.dwell_s)}/{len(phase.dwell_s) + phase.waiting} sent"
        table.append(Row(f"Quiet dwell, {phase.name}", f"p50 {phase.shown(0.5)}, p95 {phase.shown(0.95)} ({sent})"))
        if phase.noisy:
            rate = phase.noisy_sent / phase.duration_s if phase.duration_s else 0.0
            ceiling = f"; its cap allows {phase.cap / options.ai_latency_s:.1f}/s at L" if phase.cap else ""
            sent = f"{phase.noisy_sent} ({rate:.1f}/s{ceiling})"
            table.append(Row(f"  noisy conversations sent meanwhile ({phase.name})", sent))
    ok = idle_p95 is not None and on_p95 is not None and on_p95 <= TARGET_FACTOR * idle_p95
    table.append(Row("Quiet p95, cap on", on.shown(0.95), target, check(ok)))
    off_p95 = off.percentile(0.95)
    table.append(Row("Quiet p95, cap off (for comparison)", off.shown(0.95), "", "" if off_p95 else "unbounded"))
    table.append(Row("Correctness", "; ".join(run.problems) or "every recipient got at most one message", "", ""))
    return table


def as_json(run: FairnessRun) -> dict[str, Any]:
    return {
        "mode": "fairness",
        "options": {k: getattr(run.options, k) for k in run.options.__dataclass_fields__},
        "fair_queues": "not implemented by moto's SQS: only the concurrency cap protects the quiet tenant here",
        "phases": [
            {
                "name": phase.name,
                "cap": phase.cap,
                "noisy_queued": phase.noisy,
                "noisy_sent": phase.noisy_sent,
                "duration_s": phase.duration_s,
                "quiet_sent": len(phase.dwell_s),
                "quiet_waiting": phase.waiting,
                "quiet_dwell_p50_s": phase.percentile(0.5),
                "quiet_dwell_p95_s": phase.percentile(0.95),
                "quiet_dwell_s": sorted(phase.dwell_s),
            }
            for phase in run.phases
        ],
        "target": f"quiet p95 (cap on) <= {TARGET_FACTOR:g} x idle p95",
        "service_exit_code": run.service_exit_code,
        "problems": run.problems,
    }
