"""The replies mode: signed Twilio inbound webhooks on `serve --role api`, answered by the reply consumer of
`serve --role worker`, two service processes each behind its own counting proxy.

Phases:
1. setup (`bench.stack`, batching window W) and the two processes;
2. templates: N + warm-up conversations built by the initiate path and sent by the worker's template sender
   (model latency 0 for this phase), so each conversation is exactly what a reply finds in production
   (`initial_message_sent`, its thread, its company number and recipient on the GSI);
3. warm-up: one fragment per warm-up conversation, answered; then the model latency becomes L and both
   processes' idle CPU is read;
4. load: `fragments` inbound messages per conversation (a conversation's fragments back to back, so they share a
   window), posted open loop at `rate` to `POST /webhooks/twilio/whatsapp`, each with a valid
   `X-Twilio-Signature` (the twilio library's RequestValidator, the tenant's auth token, over the public URL the
   api process is configured with, `COMMS_PUBLIC_BASE_URL` + path); sampled until every conversation has its
   reply, then W + L + 2 s more (late batches, final updates, stage and lock deletes);
5. stop both processes and verify: every conversation `reply_sent`, each fragment in exactly one answered user
   message, one Twilio reply per answered batch (nothing sent twice), no staged fragment or trigger lock left.

Per answered reply: (api + worker CPU) and (api + worker AWS requests) over the window / replies sent.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode

import aiohttp
from twilio.request_validator import RequestValidator

from bench.aws_proxy import CountsSnapshot
from bench.ceiling import Ceiling
from bench.endpoint import LoadResult, latency_figures, open_loop
from bench.options import RESULTS_DIR, RepliesOptions
from bench.otlp_collector import CollectorCounts
from bench.procfs import ProcessSample, cpu_seconds, machine_cpu_seconds, own_cpu_seconds, sample_process
from bench.run import queue_is_empty, resend_lost
from bench.service_process import ServiceProcess
from bench.stack import (
    Stack,
    StackConfig,
    machine,
    measure_ceilings,
    open_stack,
    prime_write_units,
    say,
    scan_items,
    shadow_drift,
    start_service,
)
from bench.table import Row, check, tracing_rows, write_unit_rows
from bench.workload import ContextMessage, build_messages, enqueue
from bench.write_units import per_unit_of_work
from local_stack.moto_server import free_port
from local_stack.seed import DEMO_TWILIO_ACCOUNT_SID, DEMO_TWILIO_AUTH_TOKEN
from service.adapters.aws.dynamo_codec import from_item
from service.adapters.aws.resources import MESSAGES_PARTITION_KEY, MESSAGES_SORT_KEY

TARGET_CPU_MS = 10.0  # per answered reply, webhook(s) and consumer together
TARGET_AWS = 8.0  # AWS requests per answered reply
COMPANY_NUMBER = "+447700900001"  # the demo tenant's WhatsApp number (local_stack.seed)
INBOUND_PATH = "/webhooks/twilio/whatsapp"
IDLE_S = 5.0
AWS_REQUESTS_PER_FRAGMENT_ROOM = 40  # the default rate keeps moto below ~40 % of its ceiling (~16 requests a reply)
WEBHOOK_RETRIES = 3  # a 503 (deadline, AWS unavailable) is posted again, as Twilio's retry would; counted
TEMPLATE_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class ReplySample:
    at: float
    api: ProcessSample
    worker: ProcessSample
    moto_cpu_s: float
    bench_cpu_s: float
    machine_busy_s: float
    machine_steal_s: float
    api_aws: CountsSnapshot
    worker_aws: CountsSnapshot
    messages: int  # Twilio messages created so far (templates and replies)


class ReplyProbe:
    def __init__(self, stack: Stack, api: ServiceProcess, worker: ServiceProcess) -> None:
        self.stack, self.api, self.worker = stack, api, worker

    def take(self) -> ReplySample:
        busy, steal = machine_cpu_seconds()
        return ReplySample(
            at=time.monotonic(),
            api=sample_process(self.api.pid),
            worker=sample_process(self.worker.pid),
            moto_cpu_s=cpu_seconds(self.stack.moto.process.pid),
            bench_cpu_s=own_cpu_seconds(),
            machine_busy_s=busy,
            machine_steal_s=steal,
            api_aws=self.stack.proxies["api"].counter.snapshot(),
            worker_aws=self.stack.proxies["worker"].counter.snapshot(),
            messages=self.stack.sandboxes.messages_sent,
        )


@dataclass(frozen=True, slots=True)
class RepliesRun:
    options: RepliesOptions
    machine: dict[str, Any]
    ceilings: list[Ceiling]
    rate_per_s: float  # webhooks per second, as asked or from the AWS ceiling
    seconds: float
    fragments_posted: int
    webhook_statuses: dict[str, int]
    webhook_retries: int  # posts again after a 503 (the intake is idempotent: a retry never stages twice)
    webhook_latency_ms: dict[str, float]
    replies_sent: int  # Twilio replies to the load's recipients in the window
    conversations_answered: int
    cpu_ms_per_reply: float  # api + worker
    api_cpu_ms_per_reply: float
    worker_cpu_ms_per_reply: float
    idle_cpu_ms_per_reply: float  # what both processes would have used idle over the window, per reply
    api_idle_cpu_share: float
    worker_idle_cpu_share: float
    aws_requests_per_reply: float
    api_aws_by_operation: dict[str, float]  # per reply
    worker_aws_by_operation: dict[str, float]
    aws_upstream_ms: dict[str, float]
    aws_errors: dict[str, int]
    write_units: dict[str, float]  # per reply
    write_units_unmodelled: dict[str, int]
    write_units_drift: dict[str, int]
    moto_cpu_share: float
    moto_cpu_ms_per_reply: float
    bench_cpu_share: float
    other_cpu_share: float
    peak_rss_kb: dict[str, int]  # api, worker
    idle_rss_kb: dict[str, int]
    tracing: CollectorCounts | None
    exit_codes: dict[str, int | None]
    statuses: dict[str, int]
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems


# -- the webhooks ----------------------------------------------------------------------------------------------------


def default_rate(ceilings: Sequence[Ceiling]) -> float:
    """Webhooks per second that leave moto room (its ceiling / 40, between 1 and 10): past moto's ceiling the
    webhooks' deadlines, not the service, decide the figures (503s, retries, re-claims)."""
    ceiling = min(c.requests_per_s for c in ceilings)
    return round(min(10.0, max(1.0, ceiling / AWS_REQUESTS_PER_FRAGMENT_ROOM)), 1)


def inbound_form(sender: str, body: str) -> dict[str, str]:
    """The form Twilio posts for a WhatsApp message from `sender` to the demo tenant's number."""
    sid = "SM" + uuid.uuid4().hex
    return {
        "AccountSid": DEMO_TWILIO_ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "Body": body,
        "From": f"whatsapp:{sender}",
        "MessageSid": sid,
        "NumMedia": "0",
        "NumSegments": "1",
        "ProfileName": "Lee",
        "SmsMessageSid": sid,
        "SmsSid": sid,
        "SmsStatus": "received",
        "To": f"whatsapp:{COMPANY_NUMBER}",
        "WaId": sender.lstrip("+"),
    }


def fragment_text(index: int, fragment: int) -> str:
    return f"bench fragment {index}.{fragment}: is the viewing still on?"


def signed_requests(
    public_url: str, conversations: Sequence[ContextMessage], fragments: int, first_index: int
) -> list[tuple[bytes, Mapping[str, str]]]:
    """Every webhook of the load, signed as Twilio signs: HMAC-SHA1 of the public URL and the sorted form."""
    validator = RequestValidator(DEMO_TWILIO_AUTH_TOKEN)
    requests: list[tuple[bytes, Mapping[str, str]]] = []
    for offset, conversation in enumerate(conversations):
        for fragment in range(fragments):
            form = inbound_form(conversation.recipient, fragment_text(first_index + offset, fragment))
            headers = {
                "X-Twilio-Signature": str(validator.compute_signature(public_url, form)),
                "Content-Type": "application/x-www-form-urlencoded",
            }
            requests.append((urlencode(form).encode(), headers))
    return requests


# -- phases ----------------------------------------------------------------------------------------------------------


async def send_templates(stack: Stack, messages: list[ContextMessage]) -> None:
    """Every conversation's template through the worker (queued at once; moto's lost messages sent again)."""
    target = stack.sandboxes.messages_sent + len(messages)
    await enqueue(stack.deps.aws.sqs, stack.queue_url, messages, visible_at=0.0)
    deadline = time.monotonic() + TEMPLATE_TIMEOUT_S
    progress, quiet_since = stack.sandboxes.messages_sent, time.monotonic()
    while stack.sandboxes.messages_sent < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"templates: {stack.sandboxes.messages_sent}/{target} sent; see the worker log")
        await asyncio.sleep(0.5)
        if stack.sandboxes.messages_sent != progress:
            progress, quiet_since = stack.sandboxes.messages_sent, time.monotonic()
        elif time.monotonic() - quiet_since > 15 and await queue_is_empty(stack):
            await resend_lost(stack, messages)
            quiet_since = time.monotonic()


async def wait_for_replies(
    stack: Stack, probe: ReplyProbe, recipients: set[str], since: int, interval_s: float, timeout_s: float
) -> list[ReplySample]:
    """Samples until every recipient in `recipients` got a reply (a Twilio message after index `since`)."""
    samples = [probe.take()]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(replied(stack, recipients, since)) >= len(recipients):
            break
        await asyncio.sleep(interval_s)
        samples.append(probe.take())
    return samples


def replies_after(stack: Stack, since: int) -> list[tuple[str, str]]:
    """(bare recipient, body) of every Twilio message created after the first `since`."""
    messages = list(stack.sandboxes.twilio_state.messages.values())[since:]
    return [(m.to.removeprefix("whatsapp:"), m.body) for m in messages]


def replied(stack: Stack, recipients: set[str], since: int) -> set[str]:
    return {to for to, _ in replies_after(stack, since) if to in recipients}


async def settle(probe: ReplyProbe, seconds: float, interval_s: float) -> list[ReplySample]:
    samples = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        await asyncio.sleep(interval_s)
        samples.append(probe.take())
    return samples


# -- verification ----------------------------------------------------------------------------------------------------


async def scan_all(stack: Stack, table: str) -> list[dict[str, Any]]:
    return [from_item(item) for item in await scan_items(stack, table)]


async def stored_messages(stack: Stack) -> dict[str, list[dict[str, Any]]]:
    """Every message item, by conversation_id, in position order (the items' key is "<primary_channel>#<id>";
    a primary channel never holds a '#')."""
    by_conversation: dict[str, list[dict[str, Any]]] = {}
    items = sorted(await scan_all(stack, stack.settings.messages_table), key=lambda i: str(i[MESSAGES_SORT_KEY]))
    for item in items:
        by_conversation.setdefault(str(item[MESSAGES_PARTITION_KEY]).split("#", 1)[1], []).append(item)
    return by_conversation


async def verify_replies(
    stack: Stack, conversations: Sequence[ContextMessage], first_index: int, fragments: int, since: int
) -> tuple[dict[str, int], list[str]]:
    """Statuses, and the problems: unanswered or twice-answered fragments, replies sent twice, leftovers."""
    ids = {c.conversation_id: (first_index + offset, c) for offset, c in enumerate(conversations)}
    records = {
        item["conversation_id"]: item
        for item in await scan_all(stack, stack.settings.conversations_table)
        if item.get("conversation_id") in ids
    }
    items = await stored_messages(stack)
    statuses = Counter(str(r.get("conversation_status")) for r in records.values())
    statuses["<no record>"] = len(ids) - len(records)
    sent: Counter[str] = Counter(to for to, _ in replies_after(stack, since))
    problems: list[str] = []
    unanswered = twice = resent = 0
    for conversation_id, (index, context) in ids.items():
        # embedded in the record (written before messages became items), then the items
        messages = [*(records.get(conversation_id, {}).get("messages") or []), *items.get(conversation_id, [])]
        users = [m for m in messages if m.get("role") == "user"]
        for fragment in range(fragments):
            seen = sum(1 for m in users if fragment_text(index, fragment) in str(m.get("content", "")))
            unanswered += seen == 0
            twice += seen > 1
        if sent[context.recipient] != len(users):
            resent += 1
    if statuses.get("reply_sent", 0) != len(ids):
        problems.append(f"{statuses.get('reply_sent', 0)}/{len(ids)} conversations are reply_sent: {dict(+statuses)}")
    if unanswered:
        problems.append(f"{unanswered} fragments are in no answered user message")
    if twice:
        problems.append(f"{twice} fragments were answered twice")
    if resent:
        problems.append(f"{resent} recipients got a number of replies other than their answered batches")
    staged = [i for i in await scan_all(stack, stack.settings.stage_table) if i.get("conversation_id") in ids]
    if staged:
        problems.append(f"{len(staged)} staged fragments left in the stage table")
    locks = [i for i in await scan_all(stack, stack.settings.lock_table) if i.get("conversation_id") in ids]
    if locks:
        problems.append(f"{len(locks)} trigger locks left in the lock table")
    return dict(+statuses), problems


# -- the run ---------------------------------------------------------------------------------------------------------


async def start_processes(
    stack: Stack, exits: AsyncExitStack, options: RepliesOptions
) -> tuple[ServiceProcess, ServiceProcess]:
    """The api process (webhooks, on the public URL's port) and the worker (template sender and reply consumer)."""
    api_settings = stack.service_settings("api")
    worker_settings = stack.service_settings("worker", port=free_port(), metrics_port=free_port())
    api = await start_service(stack, exits, api_settings, "api", RESULTS_DIR / "replies-api.log")
    worker = await start_service(stack, exits, worker_settings, "worker", RESULTS_DIR / "replies-worker.log")
    say(f"api pid {api.pid}, worker pid {worker.pid} (C={options.concurrency}, W={options.window_s} s) ready")
    return api, worker


async def warm_up(
    stack: Stack,
    probe: ReplyProbe,
    session: aiohttp.ClientSession,
    url: str,
    requests: list[tuple[bytes, Mapping[str, str]]],
    rate_per_s: float,
    window_s: int,
) -> None:
    """One fragment per warm-up conversation, answered (imports, clients, caches of both processes)."""
    since = stack.sandboxes.messages_sent
    posted = await open_loop(session, url, requests, rate_per_s, retry_503=WEBHOOK_RETRIES)
    recipients = {bare(form_sender(body)) for body, _ in requests}
    await wait_for_replies(stack, probe, recipients, since, 0.2, 60 + 3 * window_s)
    if any(a.status != 200 for a in posted.answers):
        raise RuntimeError(f"warm-up webhooks not all answered 200: {[a.status for a in posted.answers]}")
    await asyncio.sleep(3.0)


def form_sender(body: bytes) -> str:
    return parse_qs(body.decode())["From"][0]


def bare(address: str) -> str:
    return address.removeprefix("whatsapp:")


async def run_replies(options: RepliesOptions) -> RepliesRun:
    config = StackConfig(
        concurrency=options.concurrency,
        ai_latency_s=0.0,
        log_level=options.log_level,
        consumer_queues="whatsapp,replies",
        tracing=options.tracing,
        proxies=("api", "worker"),
        settings={"batching_window_s": options.window_s},
    )
    async with AsyncExitStack() as exits:
        stack = await open_stack(config, exits)
        ceilings = await measure_ceilings(stack, options.ceiling_s)
        rate_per_s = options.rate_per_s or default_rate(ceilings)
        tenant = (stack.settings, stack.tenant.company_id, stack.tenant.project_id)
        warm = await build_messages(*tenant, range(options.warmup))
        first = options.warmup
        load = await build_messages(*tenant, range(first, first + options.conversations))
        say(f"{len(warm)} warm-up and {len(load)} conversations built by the initiate path")

        api, worker = await start_processes(stack, exits, options)

        await send_templates(stack, warm + load)
        await asyncio.sleep(3.0)  # final updates of the last templates
        say(f"{len(warm) + len(load)} templates sent")
        await prime_write_units(stack)
        probe = ReplyProbe(stack, api, worker)
        public_url = (stack.settings.public_base_url or "").rstrip("/") + INBOUND_PATH
        url = f"{api.base_url}{INBOUND_PATH}"
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            if warm:
                warm_requests = signed_requests(public_url, warm, 1, 0)
                await warm_up(stack, probe, session, url, warm_requests, rate_per_s, options.window_s)
            stack.sandboxes.latency.model_s = options.ai_latency_s
            idle_from = probe.take()
            await asyncio.sleep(IDLE_S)
            idle = probe.take()
            requests = signed_requests(public_url, load, options.fragments, first)
            say(
                f"warm-up done; load: {len(requests)} signed webhooks for {len(load)} conversations at "
                f"{rate_per_s:g}/s, model latency {options.ai_latency_s:g} s"
            )
            traced_before = stack.collector.counts.snapshot() if stack.collector else None
            since = stack.sandboxes.messages_sent
            posting = asyncio.create_task(open_loop(session, url, requests, rate_per_s, retry_503=WEBHOOK_RETRIES))
            timeout = 120 + len(requests) / rate_per_s + 4 * (options.window_s + options.ai_latency_s)
            recipients = {c.recipient for c in load}
            samples = await wait_for_replies(stack, probe, recipients, since, options.sample_interval_s, timeout)
            posted = await posting
        samples += await settle(probe, options.window_s + options.ai_latency_s + 2.0, options.sample_interval_s)
        api.request_stop()
        worker.request_stop()
        codes = {"api": api.stop(), "worker": worker.stop()}
        traced = stack.collector.counts.since(traced_before) if stack.collector and traced_before else None
        say(f"load done; exit codes {codes}")
        statuses, problems = await verify_replies(stack, load, first, options.fragments, since)
        drift = await shadow_drift(stack)
        return summarise(
            options, stack, ceilings, samples, idle_from, idle, posted, since, traced, codes, statuses, problems, drift
        )
    raise AssertionError("unreachable")  # pragma: no cover - the stack always yields


def summarise(
    options: RepliesOptions,
    stack: Stack,
    ceilings: list[Ceiling],
    samples: list[ReplySample],
    idle_from: ReplySample,
    idle: ReplySample,
    posted: LoadResult,
    since: int,
    traced: CollectorCounts | None,
    codes: dict[str, int | None],
    statuses: dict[str, int],
    problems: list[str],
    drift: dict[str, int],
) -> RepliesRun:
    first, last = samples[0], samples[-1]
    seconds = last.at - first.at
    recipients = {to for to, _ in replies_after(stack, since)}
    replies = last.messages - first.messages
    done = max(1, replies)
    idle_s = idle.at - idle_from.at
    api_idle = (idle.api.cpu_s - idle_from.api.cpu_s) / idle_s
    worker_idle = (idle.worker.cpu_s - idle_from.worker.cpu_s) / idle_s
    api_s = last.api.cpu_s - first.api.cpu_s
    worker_s = last.worker.cpu_s - first.worker.cpu_s
    moto_s = last.moto_cpu_s - first.moto_cpu_s
    bench_s = last.bench_cpu_s - first.bench_cpu_s
    api_aws = last.api_aws.since(first.api_aws)
    worker_aws = last.worker_aws.since(first.worker_aws)
    both = api_aws.plus(worker_aws)
    answers = posted.answers
    webhook_statuses = Counter(f"{a.status}" + (f" {a.error_code}" if a.error_code else "") for a in answers)
    if any(a.status != 200 for a in answers):
        problems = [*problems, f"webhooks not answered 200: {dict(webhook_statuses)}"]
    if any(code != 0 for code in codes.values()):
        problems = [*problems, f"service exit codes on SIGTERM: {codes}"]
    return RepliesRun(
        options=options,
        machine=machine(),
        ceilings=ceilings,
        rate_per_s=options.rate_per_s or default_rate(ceilings),
        seconds=seconds,
        fragments_posted=len(answers),
        webhook_statuses=dict(webhook_statuses),
        webhook_retries=sum(a.attempts - 1 for a in answers),
        webhook_latency_ms=latency_figures([a.latency_s for a in answers]),
        replies_sent=replies,
        conversations_answered=len(recipients),
        cpu_ms_per_reply=(api_s + worker_s) * 1000 / done,
        api_cpu_ms_per_reply=api_s * 1000 / done,
        worker_cpu_ms_per_reply=worker_s * 1000 / done,
        idle_cpu_ms_per_reply=(api_idle + worker_idle) * seconds * 1000 / done,
        api_idle_cpu_share=api_idle,
        worker_idle_cpu_share=worker_idle,
        aws_requests_per_reply=both.total / done,
        api_aws_by_operation={op: n / done for op, n in sorted(api_aws.requests.items())},
        worker_aws_by_operation={op: n / done for op, n in sorted(worker_aws.requests.items())},
        aws_upstream_ms={op: both.upstream_s[op] * 1000 / n for op, n in sorted(both.requests.items()) if n},
        aws_errors=dict(both.errors),
        write_units=per_unit_of_work(both.write_units, replies),
        write_units_unmodelled=dict(stack.ledger.unmodelled),
        write_units_drift=drift,
        moto_cpu_share=moto_s / seconds,
        moto_cpu_ms_per_reply=moto_s * 1000 / done,
        bench_cpu_share=bench_s / seconds,
        other_cpu_share=max(0.0, last.machine_busy_s - first.machine_busy_s - api_s - worker_s - moto_s - bench_s)
        / seconds,
        peak_rss_kb={"api": max(s.api.rss_kb for s in samples), "worker": max(s.worker.rss_kb for s in samples)},
        idle_rss_kb={"api": idle.api.rss_kb, "worker": idle.worker.rss_kb},
        tracing=traced,
        exit_codes=codes,
        statuses=statuses,
        problems=problems,
    )


def rows(run: RepliesRun) -> list[Row]:
    o = run.options
    aws_ok = run.aws_requests_per_reply <= TARGET_AWS
    return [
        Row(
            "Setting",
            f"replies: {o.conversations} conversations x {o.fragments} fragment(s), webhooks open loop at "
            f"{run.rate_per_s:g}/s{'' if o.rate_per_s else ' (from the AWS ceiling)'}, W={o.window_s} s, "
            f"L={o.ai_latency_s:g} s, worker C={o.concurrency}, tracing {'ON' if o.tracing else 'off'}",
        ),
        Row(
            "Replies sent",
            f"{run.replies_sent} to {run.conversations_answered} conversations in {run.seconds:.1f} s "
            f"({run.fragments_posted} fragments posted)",
        ),
        Row(
            "Webhook answers",
            ", ".join(f"{k}: {v}" for k, v in run.webhook_statuses.items())
            + f" (after {run.webhook_retries} retries of a 503)",
        ),
        Row(
            "  webhook latency",
            "p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max:.1f} ms (from the scheduled send)".format(
                **run.webhook_latency_ms
            ),
        ),
        Row(
            "CPU per answered reply",
            f"{run.cpu_ms_per_reply:.2f} ms (webhooks {run.api_cpu_ms_per_reply:.2f} + consumer "
            f"{run.worker_cpu_ms_per_reply:.2f})"
            + (" (tracing on: the target is for tracing off)" if o.tracing else ""),
            f"<= {TARGET_CPU_MS:g} ms",
            check(run.cpu_ms_per_reply <= TARGET_CPU_MS),
        ),
        Row(
            "  of which idle",
            f"{run.idle_cpu_ms_per_reply:.2f} ms (api {run.api_idle_cpu_share:.1%}, worker "
            f"{run.worker_idle_cpu_share:.1%} of a core when idle: long polls, timers)",
        ),
        Row(
            "AWS requests per answered reply",
            f"{run.aws_requests_per_reply:.2f} (webhooks {sum(run.api_aws_by_operation.values()):.2f} + consumer "
            f"{sum(run.worker_aws_by_operation.values()):.2f})",
            f"<= {TARGET_AWS:g}",
            check(aws_ok),
        ),
        *[
            Row(f"  webhooks {op}", f"{n:.2f} /reply, {run.aws_upstream_ms.get(op, 0):.1f} ms")
            for op, n in run.api_aws_by_operation.items()
        ],
        *[
            Row(f"  consumer {op}", f"{n:.2f} /reply, {run.aws_upstream_ms.get(op, 0):.1f} ms")
            for op, n in run.worker_aws_by_operation.items()
        ],
        *([Row("  AWS errors", str(run.aws_errors))] if run.aws_errors else []),
        *write_unit_rows(run.write_units, "reply", run.write_units_unmodelled, run.write_units_drift),
        *tracing_rows(run.tracing, "reply", run.replies_sent),
        Row(
            "RSS",
            f"api peak {run.peak_rss_kb['api'] / 1024:.1f} MB (idle {run.idle_rss_kb['api'] / 1024:.1f}), worker "
            f"peak {run.peak_rss_kb['worker'] / 1024:.1f} MB (idle {run.idle_rss_kb['worker'] / 1024:.1f})",
        ),
        Row(
            "moto CPU",
            f"{run.moto_cpu_share:.0%} of a core, {run.moto_cpu_ms_per_reply:.1f} ms per reply; AWS endpoint ceiling "
            f"{run.ceilings[0].requests_per_s:.0f} req/s",
        ),
        Row(
            "Other CPU in the window",
            f"bench process {run.bench_cpu_share:.0%}, other processes {run.other_cpu_share:.0%} (of one core; "
            f"{run.machine['cpus']} cores)",
        ),
        Row(
            "Correctness",
            f"{run.statuses}; exit codes {run.exit_codes}",
            "each answered once",
            "ok" if run.passed else "FAIL",
        ),
    ]


def as_json(run: RepliesRun) -> dict[str, Any]:
    data = asdict(run)
    data["passed"] = run.passed
    data["targets"] = {"cpu_ms_per_reply": TARGET_CPU_MS, "aws_requests_per_reply": TARGET_AWS}
    return {"mode": "replies", **data}
