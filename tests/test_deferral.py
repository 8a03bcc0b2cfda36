"""Deferral on moto (consumers/runtime.py `defer`, Outcome.defer): a copy re-queued with a delay and the original
deleted, so the wait burns no receive; what happens when either step fails or the consumer stops part-way; and
the per-project cap (service/domain/concurrency_cap.py with the DynamoDB leases) held by two consumers at once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import orjson
import pytest
from botocore.exceptions import EndpointConnectionError
from prometheus_client import CollectorRegistry

from consumers.contracts import Lease, Outcome, QueueMessage
from consumers.metrics import ConsumerMetrics
from consumers.runtime import QueueConsumer
from consumers.sqs_messages import RedrivePolicy
from consumers.template_sender import TemplatePorts, TemplateSender, TemplateSenderConfig
from service.adapters.aws.inflight_leases import DynamoInflightLeases
from service.domain.company import RateLimits
from service.domain.concurrency_cap import ConcurrencyCap
from service.domain.provider_ports import AiRequest, AiResult, ProviderPaced
from tests.fakes import FakeWorld
from tests.test_consumer_runtime import (
    Recorder,
    RecordingSqs,
    config,
    consuming,
    create_queue,
    eventually,
    message_counts,
    raw_receive,
    sample,
    send,
)
from tests.unit.test_template_sender import COMPANY_ID, PROJECT_ID, company, context

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACE = {"traceparent": {"DataType": "String", "StringValue": TRACEPARENT}}


@pytest.fixture
def sqs(deps):
    return deps.aws.sqs


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry) -> ConsumerMetrics:
    return ConsumerMetrics(registry)


def deferring(times: int, delay_s: int = 0):
    """Defers the first `times` deliveries of each body, then finishes it."""
    seen: Counter[str] = Counter()

    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        seen[message.body] += 1
        return Outcome.defer("concurrency_capped", delay_s) if seen[message.body] <= times else Outcome.done("sent")

    return rule


async def test_a_deferred_message_comes_back_as_a_copy_with_its_receive_count_unchanged(sqs, metrics, registry):
    queue = await create_queue(sqs, visibility_s=30)
    await sqs.send_message(QueueUrl=queue.url, MessageBody="later", MessageAttributes=TRACE, MessageGroupId="ci#pi")
    recorder = Recorder(deferring(4))  # more deferrals than the redrive's maxReceiveCount (3)
    async with consuming(sqs, queue, recorder, metrics, config(visibility_timeout_s=30)) as consumer:
        await eventually(lambda: consumer.counts.complete == 1, what="done after four deferrals")
    assert [m.receive_count for m in recorder.seen] == [1] * 5
    assert len({m.message_id for m in recorder.seen}) == 5  # each time a new copy
    assert [m.deferrals for m in recorder.seen] == [0, 1, 2, 3, 4]
    assert all(m.attributes == {"traceparent": TRACE["traceparent"]["StringValue"]} for m in recorder.seen)
    assert all(m.group == "ci#pi" for m in recorder.seen)
    assert consumer.counts.deferred == 4 and consumer.counts.dead_lettered == 0
    assert await message_counts(sqs, queue.dlq_url) == (0, 0)
    assert await message_counts(sqs, queue.url) == (0, 0)
    labels = {"queue": queue.name, "reason": "concurrency_capped", "result": "deferred"}
    assert sample(registry, "comms_deferrals_total", **labels) == 4


async def test_a_deferral_keeps_the_receives_that_counted_so_retries_still_run_out(sqs, metrics):
    queue = await create_queue(sqs, visibility_s=30)
    script = iter([Outcome.retry("ai_transient", 0), Outcome.defer("paced", 0), Outcome.retry("ai_transient", 0)])

    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        return next(script, Outcome.done("sent"))

    await send(sqs, queue, ["flaky"])
    recorder = Recorder(rule)
    async with consuming(sqs, queue, recorder, metrics, config(visibility_timeout_s=30)) as consumer:
        await eventually(lambda: consumer.counts.complete == 1, what="done")
    assert [m.receive_count for m in recorder.seen] == [1, 2, 2, 3]


class FailingCalls(RecordingSqs):
    """The real client, but the next call of each name in `fail` fails as if SQS were unreachable."""

    def __init__(self, inner, *fail: str) -> None:
        super().__init__(inner)
        self.fail = Counter(fail)

    def _failing(self, name: str) -> bool:
        if self.fail[name] > 0:
            self.fail[name] -= 1
            return True
        return False

    async def send_message_batch(self, **request: Any) -> Any:
        if self._failing("send_message_batch"):
            raise EndpointConnectionError(endpoint_url="http://sqs")
        return await self._inner.send_message_batch(**request)

    async def delete_message_batch(self, **request: Any) -> Any:
        if self._failing("delete_message_batch"):
            raise EndpointConnectionError(endpoint_url="http://sqs")
        return await self._inner.delete_message_batch(**request)


async def test_a_copy_that_cannot_be_queued_leaves_the_original_to_come_back_as_a_retry(sqs, metrics, registry):
    queue = await create_queue(sqs, visibility_s=30)
    await send(sqs, queue, ["later"])
    failing = FailingCalls(sqs, "send_message_batch")
    recorder = Recorder(deferring(1))
    async with consuming(failing, queue, recorder, metrics, config(visibility_timeout_s=30)) as consumer:
        await eventually(lambda: consumer.counts.complete == 1, what="the original, retried")
    original = recorder.seen[0].message_id
    assert [(m.message_id, m.receive_count) for m in recorder.seen] == [(original, 1), (original, 2)]
    labels = {"queue": queue.name, "reason": "concurrency_capped", "result": "copy_failed"}
    assert sample(registry, "comms_deferrals_total", **labels) == 1


async def test_a_copy_queued_whose_original_could_not_be_deleted_comes_back_as_a_duplicate(sqs, metrics, registry):
    queue = await create_queue(sqs, visibility_s=2)
    await send(sqs, queue, ["later"])
    recorder = Recorder(deferring(1))
    cfg = config(visibility_timeout_s=2)
    async with consuming(FirstDeleteRefused(sqs), queue, recorder, metrics, cfg) as consumer:
        await eventually(lambda: consumer.counts.complete == 2, what="the copy and the original both back")
    assert sorted(m.receive_count for m in recorder.seen) == [1, 1, 2]
    labels = {"queue": queue.name, "reason": "concurrency_capped", "result": "copied_delete_failed"}
    assert sample(registry, "comms_deferrals_total", **labels) == 1


class FirstDeleteRefused(RecordingSqs):
    """The real client, but the first message received is never deleted (its batch entry fails on SQS's side)."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.kept: str | None = None

    async def receive_message(self, **request: Any) -> Any:
        answer = await self._inner.receive_message(**request)
        if self.kept is None and answer.get("Messages"):
            self.kept = answer["Messages"][0]["ReceiptHandle"]
        return answer

    async def delete_message_batch(self, **request: Any) -> Any:
        entries = request["Entries"]
        passed = [e for e in entries if e["ReceiptHandle"] != self.kept]
        answer = await self._inner.delete_message_batch(**{**request, "Entries": passed}) if passed else {}
        refused = [
            {"Id": e["Id"], "Code": "InternalError", "SenderFault": False}
            for e in entries
            if e["ReceiptHandle"] == self.kept
        ]
        return {"Successful": answer.get("Successful", []), "Failed": answer.get("Failed", []) + refused}


# ---- the duplicate reaches the conversation claim, which lets only one send --------------------------------------


class PacedOnce:
    """An AI writer whose key has no turn soon on the first call, then answers."""

    def __init__(self, world: FakeWorld) -> None:
        self._world = world
        self.calls = 0

    async def write(self, request: AiRequest) -> AiResult:
        self.calls += 1
        if self.calls == 1:
            raise ProviderPaced("ai_key_paced", retry_after_s=1)
        return await self._world.ai.write(request)


def template_sender(world: FakeWorld, ai: Any, cap: ConcurrencyCap | None = None) -> TemplateSender:
    config_ = TemplateSenderConfig(
        queue="sms", claim_lease_s=30.0, ai_timeout_s=10.0, status_callback_url=None, redrive=RedrivePolicy(None, 3)
    )
    ports = TemplatePorts(world.conversation_claims, world.secrets, ai, world.senders)
    return TemplateSender(config_, ports, ConsumerMetrics(CollectorRegistry()), clock=world.clock, cap=cap)


async def test_a_deferrals_duplicate_never_sends_to_the_person_twice(sqs, metrics):
    queue = await create_queue(sqs, visibility_s=3)
    world = FakeWorld()
    world.ai.answer_next({"body": "Hi Lee"})
    await send(sqs, queue, [orjson.dumps(context("sms")).decode()])
    processor = template_sender(world, PacedOnce(world))
    refusing = FirstDeleteRefused(sqs)  # the original stays on the queue after the deferral
    async with consuming(refusing, queue, processor, metrics, config(visibility_timeout_s=3)) as consumer:
        await eventually(lambda: consumer.counts.deferred == 1, what="deferred")
        await eventually(lambda: consumer.counts.complete == 2, what="the copy sent, the original acknowledged")
    assert len(world.sender("sms").sent) == 1


# ---- stopping part-way ---------------------------------------------------------------------------------------------


class SlowCopy(RecordingSqs):
    """The copy's SendMessageBatch waits for `release`; `entered` says it is on the wire."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def send_message_batch(self, **request: Any) -> Any:
        self.entered.set()
        await self.release.wait()
        return await self._inner.send_message_batch(**request)


async def test_stop_during_a_deferral_waits_for_it_and_loses_nothing(sqs, metrics):
    queue = await create_queue(sqs, visibility_s=30)
    await send(sqs, queue, ["later"])
    slow = SlowCopy(sqs)
    consumer = QueueConsumer(
        slow, queue.url, queue.name, Recorder(deferring(1, delay_s=1)), metrics, config(visibility_timeout_s=30)
    )
    await consumer.start()
    await slow.entered.wait()
    stopping = asyncio.create_task(consumer.stop(grace_s=0.5))
    await asyncio.sleep(0.1)
    slow.release.set()
    await stopping
    assert consumer.counts.deferred == 1
    copies = await raw_receive(sqs, queue.url, wait_s=3)
    assert [m["Body"] for m in copies] == ["later"]
    assert await message_counts(sqs, queue.url) == (0, 1)  # only the copy, now received here


# ---- the cap across two consumers, on the DynamoDB leases -----------------------------------------------------------


class CountingAi:
    """Answers after `latency_s`, counting conversations written at once."""

    def __init__(self, world: FakeWorld, latency_s: float) -> None:
        self._world = world
        self._latency_s = latency_s
        self.running = 0
        self.most_at_once = 0

    async def write(self, request: AiRequest) -> AiResult:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await asyncio.sleep(self._latency_s)
            return await self._world.ai.write(request)
        finally:
            self.running -= 1


async def test_two_consumers_never_run_more_of_a_projects_conversations_than_its_cap(deps, sqs, metrics):
    queue = await create_queue(sqs, visibility_s=30)
    world = FakeWorld()
    company_id = f"ci-{uuid.uuid4().hex[:8]}"  # a project of its own in the shared rate-limits table
    world.companies.records[(company_id, PROJECT_ID)] = company().model_copy(
        update={"rate_limits": RateLimits(concurrent_conversations=3), "company_id": company_id}
    )
    ai = CountingAi(world, latency_s=0.3)
    bodies = [orjson.dumps(context("sms")).decode().replace(COMPANY_ID, company_id) for _ in range(10)]
    await send(sqs, queue, bodies)
    seen: list[QueueMessage] = []

    def consumer_with_its_own_cap() -> Any:
        leases = DynamoInflightLeases(deps.aws.dynamodb, deps.settings.rate_limits_table)
        cap = ConcurrencyCap(world.companies, leases, time.time, lease_s=30.0, defer_s=1)
        return Recorder(template_sender(world, ai, cap).process, seen)

    cfg = config(visibility_timeout_s=30, concurrency=4)
    async with (
        consuming(sqs, queue, consumer_with_its_own_cap(), metrics, cfg) as one,
        consuming(sqs, queue, consumer_with_its_own_cap(), metrics, cfg) as two,
    ):
        await eventually(lambda: one.counts.complete + two.counts.complete == 10, timeout_s=30, what="all sent")
    assert ai.most_at_once == 3
    assert one.counts.deferred + two.counts.deferred > 0
    assert {m.receive_count for m in seen} == {1}
    assert len(world.sender("sms").sent) == 10
