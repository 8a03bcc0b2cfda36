"""The endpoint mode: `POST /initiate-conversation` on `serve --role api`, open loop at a fixed rate.

Open loop: request i is sent at start + i / rate whatever the earlier ones are doing (each on its own task, over a
pool without a connection limit), and its latency runs from that scheduled time to the end of its answer, so a
slow service cannot slow the load down and hide its own delay (no coordinated omission). Every request has its
own request_id and recipient, so each is a new conversation (initiate: key, company and opt-out checks, request
claim, SendMessage, completion).

Phases: setup (`bench.stack`; the demo tenant's rate limit raised above the load, through the company directory,
so the figures are the path's and not 429s) → service start → warm-up requests at the same rate, then idle →
the load, sampled every 0.1 s → stop → verify: every 200 answer names a distinct conversation, queued exactly
once on the whatsapp queue (a request refused with 503 after its deadline may have been queued too; at most once).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import orjson

from bench.ceiling import Ceiling
from bench.measure import Probe, Sample, sample_until
from bench.options import RESULTS_DIR, EndpointOptions
from bench.otlp_collector import CollectorCounts
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
from bench.table import Row, check, tracing_rows, write_unit_rows
from bench.workload import initiate_body
from bench.write_units import per_unit_of_work
from service.adapters.aws.company_directory import DynamoCompanyDirectory
from service.domain.company import RateLimits

TARGET_CPU_MS = 4.0  # per accepted request
TARGET_P50_MS = 10.0
TARGET_P99_MS = 25.0
ACCEPTED = 200  # SPEC §2: success answers 200 with the queued conversation
IDLE_S = 3.0
SETTLE_S = 1.0
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Answer:
    latency_s: float  # from the scheduled send time to the end of the (last) answer
    status: int  # 0: no HTTP answer (connection error, timeout)
    conversation_id: str | None
    error_code: str | None
    attempts: int = 1  # > 1: 503s retried (the replies mode retries as Twilio's retry would)
    scheduled_s: float = 0.0  # its send time on the schedule, from the first send


@dataclass(frozen=True, slots=True)
class LoadResult:
    answers: list[Answer]
    lag_s: list[float]  # how late each request left against its schedule (the load generator's own delay)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of `values`; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def open_loop(
    session: aiohttp.ClientSession,
    url: str,
    requests: Sequence[tuple[bytes, Mapping[str, str]]],
    rate_per_s: float,
    *,
    retry_503: int = 0,
) -> LoadResult:
    """POST each (body, headers) at its scheduled time (start + i / rate), never waiting for earlier answers.

    `retry_503`: a 503 is sent again, up to that many times, after its Retry-After (at most 2 s)."""
    loop = asyncio.get_running_loop()

    async def attempt(body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes, float]:
        async with session.post(url, data=body, headers=headers) as answer:
            payload = await answer.read()
            retry_after = float(answer.headers.get("Retry-After", "1") or 1)
            return answer.status, payload, retry_after

    async def one(scheduled: float, body: bytes, headers: Mapping[str, str]) -> Answer:
        attempts = 0
        while True:
            attempts += 1
            try:
                status, payload, retry_after = await attempt(body, headers)
            except (aiohttp.ClientError, TimeoutError) as exc:
                return Answer(loop.time() - scheduled, 0, None, type(exc).__name__, attempts, scheduled - start)
            if status != 503 or attempts > retry_503:
                break
            await asyncio.sleep(min(retry_after, 2.0))
        ended = loop.time()
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = {}
        conversation = data.get("conversation_id") if isinstance(data, dict) else None
        code = data.get("error_code") if isinstance(data, dict) else None
        return Answer(ended - scheduled, status, conversation, code, attempts, scheduled - start)

    start = loop.time() + 0.05
    tasks: list[asyncio.Task[Answer]] = []
    lag: list[float] = []
    for i, (body, headers) in enumerate(requests):
        scheduled = start + i / rate_per_s
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        lag.append(max(0.0, loop.time() - scheduled))
        tasks.append(asyncio.create_task(one(scheduled, body, headers)))
    return LoadResult(list(await asyncio.gather(*tasks)), lag)


@dataclass(frozen=True, slots=True)
class EndpointRun:
    options: EndpointOptions
    machine: dict[str, Any]
    ceilings: list[Ceiling]
    rate_limit_per_s: float  # the demo tenant's limit during the run
    requests: int
    seconds: float  # first scheduled send to the last answer
    statuses: dict[str, int]  # "200", "429 RATE_LIMIT_EXCEEDED", "0 ClientConnectorError", ...
    accepted: int
    latency_ms: dict[str, float]  # p50, p95, p99, max, mean (every answer, any status)
    accepted_latency_ms: dict[str, float]
    schedule_lag_ms: dict[str, float]  # p99 and max lateness of the sends against the schedule
    cpu_ms_per_accepted: float
    cpu_ms_per_request: float  # every request sent, whatever its answer
    service_cpu_share: float
    idle_cpu_share: float
    moto_cpu_share: float
    moto_cpu_ms_per_request: float
    bench_cpu_share: float
    other_cpu_share: float
    steal_share: float
    aws_requests_per_request: float  # every request sent, whatever its answer
    aws_by_operation: dict[str, float]  # per request sent
    aws_upstream_ms: dict[str, float]
    aws_errors: dict[str, int]
    write_units: dict[str, float]  # per request sent
    write_units_unmodelled: dict[str, int]
    write_units_drift: dict[str, int]
    idle_rss_kb: int
    peak_rss_kb: int
    rss_after_kb: int
    tracing: CollectorCounts | None
    service_exit_code: int | None
    queued_messages: int  # on the whatsapp queue after the run (warm-up + load; refused requests may have queued)
    problems: list[str]
    answers: list[tuple[float, float, int]]  # (scheduled s from the first send, latency ms, status) of each request

    @property
    def passed(self) -> bool:
        return not self.problems


async def lift_rate_limit(stack: Stack, per_second: float) -> None:
    """The demo tenant's own rate limit, raised (through the service's company directory) above the load."""
    companies = DynamoCompanyDirectory(stack.deps.aws.dynamodb, stack.settings.company_table, 0)
    record = await companies.get(stack.tenant.company_id, stack.tenant.project_id)
    assert record is not None, "the demo tenant is not seeded"
    limits = (record.rate_limits or RateLimits()).model_copy(
        update={"requests_per_second": per_second, "requests_per_minute": None, "burst": math.ceil(per_second)}
    )
    await companies.put(record.model_copy(update={"rate_limits": limits}), overwrite=True)


def initiate_requests(stack: Stack, indexes: range) -> list[tuple[bytes, Mapping[str, str]]]:
    """One valid initiate request per index: its own request_id and recipient (built before the load)."""
    company, project = stack.tenant.company_id, stack.tenant.project_id
    headers = {"x-api-key": stack.tenant.api_key, "Content-Type": "application/json"}
    return [(orjson.dumps(initiate_body(company, project, i)), headers) for i in indexes]


async def queued_conversations(stack: Stack) -> Counter[str]:
    """How many messages the whatsapp queue holds per conversation (all received once, hidden, not deleted)."""
    queued: Counter[str] = Counter()
    sqs, url = stack.deps.aws.sqs, stack.queue_url
    while True:
        answer = await sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=0,
            VisibilityTimeout=3600,
            MessageAttributeNames=["conversationId"],
        )
        messages = answer.get("Messages", [])
        if not messages:
            return queued
        for message in messages:
            attributes = message.get("MessageAttributes", {})
            queued[attributes["conversationId"]["StringValue"] if "conversationId" in attributes else "<none>"] += 1


def latency_figures(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "p50": percentile(ms, 0.50),
        "p95": percentile(ms, 0.95),
        "p99": percentile(ms, 0.99),
        "max": max(ms, default=0.0),
        "mean": sum(ms) / max(1, len(ms)),
    }


async def sample_during(probe: Probe, task: asyncio.Task[Any], interval_s: float) -> list[Sample]:
    """Samples every `interval_s` until `task` is done (the last one after it)."""
    return await sample_until(probe, lambda _: task.done(), interval_s=interval_s, timeout_s=math.inf)


async def run_endpoint(options: EndpointOptions) -> EndpointRun:
    config = StackConfig(concurrency=1, ai_latency_s=0.0, log_level=options.log_level, tracing=options.tracing)
    async with AsyncExitStack() as exits:
        stack = await open_stack(config, exits)
        ceilings = await measure_ceilings(stack, options.ceiling_s)
        limit = max(100.0, 4 * options.rate_per_s)
        await lift_rate_limit(stack, limit)
        warm = initiate_requests(stack, range(options.warmup))
        bodies = initiate_requests(stack, range(options.warmup, options.warmup + options.requests))
        await prime_write_units(stack)

        log_path = RESULTS_DIR / "endpoint-service.log"
        service = await start_service(stack, exits, stack.service_settings(), "api", log_path)
        url = f"{service.base_url}/initiate-conversation"
        say(f"service pid {service.pid} ready (api role); log {service.log_path}")
        probe = Probe(service.pid, stack.moto.process.pid, stack.sandboxes, stack.proxy)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            warmed = await open_loop(session, url, warm, options.rate_per_s)
            warm_accepted = sum(1 for a in warmed.answers if a.status == ACCEPTED)
            await asyncio.sleep(1.0)
            idle_from = probe.take()
            await asyncio.sleep(IDLE_S)
            idle = probe.take()
            idle_cpu_share = (idle.service.cpu_s - idle_from.service.cpu_s) / (idle.at - idle_from.at)
            say(
                f"warm-up: {warm_accepted}/{len(warm)} accepted; idle RSS {idle.service.rss_kb / 1024:.1f} MB; "
                f"load: {len(bodies)} requests at {options.rate_per_s:g}/s ({options.duration_s:.0f} s)"
            )
            traced_before = stack.collector.counts.snapshot() if stack.collector else None
            load = asyncio.create_task(open_loop(session, url, bodies, options.rate_per_s))
            samples = await sample_during(probe, load, options.sample_interval_s)
            result = load.result()
        await asyncio.sleep(SETTLE_S)
        after = probe.take()
        exit_code = service.stop()
        traced = stack.collector.counts.since(traced_before) if stack.collector and traced_before else None
        say(f"load done; service stopped with exit code {exit_code}")
        queued = await queued_conversations(stack)
        drift = await shadow_drift(stack)
        return summarise(
            options,
            stack,
            ceilings,
            limit,
            result,
            samples,
            idle_cpu_share,
            idle,
            after,
            traced,
            exit_code,
            queued,
            drift,
        )
    raise AssertionError("unreachable")  # pragma: no cover - the stack always yields


def summarise(
    options: EndpointOptions,
    stack: Stack,
    ceilings: list[Ceiling],
    limit: float,
    result: LoadResult,
    samples: list[Sample],
    idle_cpu_share: float,
    idle: Sample,
    after: Sample,
    traced: CollectorCounts | None,
    exit_code: int | None,
    queued: Counter[str],
    drift: dict[str, int],
) -> EndpointRun:
    first, last = samples[0], samples[-1]
    seconds = last.at - first.at
    answers = result.answers
    statuses = Counter(
        f"{a.status}" + (f" {a.error_code}" if a.error_code and a.status != ACCEPTED else "") for a in answers
    )
    accepted = [a for a in answers if a.status == ACCEPTED]
    done = max(1, len(accepted))
    aws = last.aws.since(first.aws)
    service_s = last.service.cpu_s - first.service.cpu_s
    moto_s = last.moto_cpu_s - first.moto_cpu_s
    bench_s = last.bench_cpu_s - first.bench_cpu_s
    problems = []
    ids = [a.conversation_id for a in accepted]
    if None in ids or len(set(ids)) != len(ids):
        problems.append("accepted answers without a conversation_id, or two answers naming the same conversation")
    not_queued = sum(1 for i in ids if i is not None and queued[i] == 0)
    if not_queued:
        problems.append(f"{not_queued} accepted conversations have no message on the whatsapp queue")
    twice = sum(1 for n in queued.values() if n > 1)
    if twice:
        problems.append(f"{twice} conversations were queued more than once")
    failures = sum(n for status, n in statuses.items() if status.startswith("500"))
    if failures:
        problems.append(f"{failures} answers were 500 INTERNAL_ERROR (see the service log)")
    if exit_code != 0:
        problems.append(f"the service exited with {exit_code} on SIGTERM")
    return EndpointRun(
        options=options,
        machine=machine(),
        ceilings=ceilings,
        rate_limit_per_s=limit,
        requests=len(answers),
        seconds=seconds,
        statuses=dict(sorted(statuses.items())),
        accepted=len(accepted),
        latency_ms=latency_figures([a.latency_s for a in answers]),
        accepted_latency_ms=latency_figures([a.latency_s for a in accepted]),
        schedule_lag_ms={"p99": percentile(result.lag_s, 0.99) * 1000, "max": max(result.lag_s, default=0) * 1000},
        cpu_ms_per_accepted=service_s * 1000 / done,
        cpu_ms_per_request=service_s * 1000 / max(1, len(answers)),
        service_cpu_share=service_s / seconds,
        idle_cpu_share=idle_cpu_share,
        moto_cpu_share=moto_s / seconds,
        moto_cpu_ms_per_request=moto_s * 1000 / max(1, aws.total),
        bench_cpu_share=bench_s / seconds,
        other_cpu_share=max(0.0, last.machine_busy_s - first.machine_busy_s - service_s - moto_s - bench_s) / seconds,
        steal_share=(last.machine_steal_s - first.machine_steal_s) / seconds,
        aws_requests_per_request=aws.total / max(1, len(answers)),
        aws_by_operation={op: n / max(1, len(answers)) for op, n in sorted(aws.requests.items())},
        aws_upstream_ms={op: aws.upstream_s[op] * 1000 / n for op, n in sorted(aws.requests.items()) if n},
        aws_errors=dict(aws.errors),
        write_units=per_unit_of_work(aws.write_units, len(answers)),
        write_units_unmodelled=dict(stack.ledger.unmodelled),
        write_units_drift=drift,
        idle_rss_kb=idle.service.rss_kb,
        peak_rss_kb=max(s.service.rss_kb for s in samples),
        rss_after_kb=after.service.rss_kb,
        tracing=traced,
        service_exit_code=exit_code,
        queued_messages=sum(queued.values()),
        problems=problems,
        answers=[(round(a.scheduled_s, 3), round(a.latency_s * 1000, 1), a.status) for a in answers],
    )


def rows(run: EndpointRun) -> list[Row]:
    o = run.options
    lat, acc = run.latency_ms, run.accepted_latency_ms
    direct, proxied = run.ceilings[0], run.ceilings[-1]
    moto_limit = 1000 / max(run.moto_cpu_ms_per_request * run.aws_requests_per_request, 1e-9)
    service_limit = 1000 / max(run.cpu_ms_per_request, 1e-9)  # per request sent, as the other two limits
    ceiling_limit = min(direct.requests_per_s, proxied.requests_per_s) / max(run.aws_requests_per_request, 1e-9)
    limits = {
        "service CPU 1000 / CPU ms": service_limit,
        "moto CPU 1000 / moto ms per request": moto_limit,
        "AWS endpoint ceiling / AWS req per request": ceiling_limit,
    }
    return [
        Row(
            "Setting",
            f"endpoint: open loop {o.rate_per_s:g} req/s, {run.requests} requests after {o.warmup} warm-up, "
            f"api role, tenant limit {run.rate_limit_per_s:g}/s, tracing {'ON' if o.tracing else 'off'}",
        ),
        Row("Achieved", f"{run.requests / max(run.seconds, 1e-9):.1f} req/s over {run.seconds:.1f} s"),
        Row("Answers", ", ".join(f"{status}: {n}" for status, n in run.statuses.items())),
        Row(
            "Latency p50 (all answers)",
            f"{lat['p50']:.1f} ms",
            f"<= {TARGET_P50_MS:g} ms",
            check(lat["p50"] <= TARGET_P50_MS),
        ),
        Row("Latency p95", f"{lat['p95']:.1f} ms"),
        Row("Latency p99", f"{lat['p99']:.1f} ms", f"<= {TARGET_P99_MS:g} ms", check(lat["p99"] <= TARGET_P99_MS)),
        Row("Latency max; mean", f"{lat['max']:.1f} ms; {lat['mean']:.1f} ms"),
        Row("  accepted only p50 / p99", f"{acc['p50']:.1f} / {acc['p99']:.1f} ms"),
        Row(
            "  load generator lag",
            f"p99 {run.schedule_lag_ms['p99']:.1f} ms, max {run.schedule_lag_ms['max']:.1f} ms behind schedule "
            "(counted in the latency)",
        ),
        Row(
            "CPU per accepted request",
            f"{run.cpu_ms_per_accepted:.2f} ms" + (" (tracing on: the target is for tracing off)" if o.tracing else ""),
            f"<= {TARGET_CPU_MS:g} ms",
            check(run.cpu_ms_per_accepted <= TARGET_CPU_MS),
        ),
        Row(
            "  per request (any answer); CPU share",
            f"{run.cpu_ms_per_request:.2f} ms; {run.service_cpu_share:.0%} of a core, idle {run.idle_cpu_share:.1%}",
        ),
        Row(
            "RSS",
            f"peak {run.peak_rss_kb / 1024:.1f} MB during the load, idle {run.idle_rss_kb / 1024:.1f} MB, "
            f"after {run.rss_after_kb / 1024:.1f} MB",
        ),
        Row("AWS requests per request", f"{run.aws_requests_per_request:.2f}", "reported"),
        *[
            Row(f"  {op}", f"{n:.2f} /req, {run.aws_upstream_ms.get(op, 0):.1f} ms")
            for op, n in run.aws_by_operation.items()
        ],
        *([Row("  AWS errors", str(run.aws_errors))] if run.aws_errors else []),
        *write_unit_rows(run.write_units, "req", run.write_units_unmodelled, run.write_units_drift),
        *tracing_rows(run.tracing, "request", run.requests),
        Row("AWS endpoint ceiling", f"{direct.requests_per_s:.0f} req/s moto, {proxied.requests_per_s:.0f} via proxy"),
        Row(
            "  moto CPU",
            f"{run.moto_cpu_share:.0%} of a core; {run.moto_cpu_ms_per_request:.1f} ms per AWS request "
            f"({direct.moto_cpu_ms_per_request:.1f} ms in the ceiling burst)",
        ),
        Row(
            "Other CPU in the window",
            f"bench process {run.bench_cpu_share:.0%} (load generator, proxy), other processes "
            f"{run.other_cpu_share:.0%}, steal {run.steal_share:.0%} (of one core; {run.machine['cpus']} cores)",
        ),
        *[Row(f"Limit: {name}", f"{value:.0f} req/s") for name, value in limits.items()],
        Row("Binding limit", f"{min(limits, key=lambda k: limits[k])} (the rate asked: {o.rate_per_s:g} req/s)"),
        Row(
            "Correctness",
            f"{run.accepted} accepted, {run.queued_messages} messages queued (warm-up and refused-but-queued "
            f"included), service exit {run.service_exit_code}",
            "each accepted request queued once",
            "ok" if run.passed else "FAIL",
        ),
    ]


def as_json(run: EndpointRun) -> dict[str, Any]:
    data = asdict(run)
    data["passed"] = run.passed
    data["targets"] = {"cpu_ms_per_accepted": TARGET_CPU_MS, "p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS}
    data["latency_note"] = "ms from each request's scheduled send time (open loop) to the end of its answer"
    return {"mode": "endpoint", **data}
