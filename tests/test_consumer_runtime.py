"""The SQS consumer runtime against moto: polling with backpressure, heartbeat, finishing, dead letters, drain.

Every test makes its own queue (`rt-<uuid8>`, short visibility) and DLQ (redrive after 3 receives).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from botocore.exceptions import EndpointConnectionError
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from consumers.backoff import retry_delay_s
from consumers.contracts import Lease, Outcome, QueueMessage
from consumers.heartbeat import InFlight, VisibilityHeartbeat, next_visibility_s
from consumers.metrics import ConsumerMetrics
from consumers.runtime import ConsumerConfig, QueueConsumer
from service.runner import stop_consumers

# -- queues, clients and metrics -------------------------------------------------------------------------


@dataclass
class QueueUnderTest:
    name: str
    url: str
    dlq_url: str


@pytest.fixture
async def sqs(deps):
    return deps.aws.sqs


async def create_queue(sqs, visibility_s: int = 3) -> QueueUnderTest:
    name = f"rt-{uuid.uuid4().hex[:8]}"
    dlq_url = (await sqs.create_queue(QueueName=f"{name}-dlq"))["QueueUrl"]
    dlq_arn = (await sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
    redrive = orjson.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3}).decode()
    url = (
        await sqs.create_queue(
            QueueName=name, Attributes={"VisibilityTimeout": str(visibility_s), "RedrivePolicy": redrive}
        )
    )["QueueUrl"]
    return QueueUnderTest(name, url, dlq_url)


@pytest.fixture
async def queue(sqs) -> AsyncIterator[QueueUnderTest]:
    created = await create_queue(sqs)
    yield created
    await sqs.delete_queue(QueueUrl=created.url)
    await sqs.delete_queue(QueueUrl=created.dlq_url)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry) -> ConsumerMetrics:
    return ConsumerMetrics(registry)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def send(sqs, queue: QueueUnderTest, bodies: list[str], attributes: dict[str, Any] | None = None) -> None:
    for offset in range(0, len(bodies), 10):
        entries = [
            {"Id": str(i), "MessageBody": body, **({"MessageAttributes": attributes} if attributes else {})}
            for i, body in enumerate(bodies[offset : offset + 10])
        ]
        answer = await sqs.send_message_batch(QueueUrl=queue.url, Entries=entries)
        assert not answer.get("Failed")


async def message_counts(sqs, url: str) -> tuple[int, int]:
    """(visible, in flight) as SQS reports them."""
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    attributes = (await sqs.get_queue_attributes(QueueUrl=url, AttributeNames=names))["Attributes"]
    return int(attributes[names[0]]), int(attributes[names[1]])


async def raw_receive(sqs, url: str, wait_s: int = 0) -> list[dict[str, Any]]:
    answer = await sqs.receive_message(
        QueueUrl=url,
        MaxNumberOfMessages=10,
        WaitTimeSeconds=wait_s,
        MessageAttributeNames=["All"],
        MessageSystemAttributeNames=["ApproximateReceiveCount"],
    )
    return answer.get("Messages", [])


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


def config(**changes: Any) -> ConsumerConfig:
    # A short long poll: stop() lets the open one end by itself, so the wait bounds every test's stop.
    return ConsumerConfig(**{"concurrency": 4, "visibility_timeout_s": 3, "wait_time_s": 1, **changes})


@asynccontextmanager
async def consuming(
    sqs, queue: QueueUnderTest, processor, metrics, cfg: ConsumerConfig, **options: Any
) -> AsyncIterator[QueueConsumer]:
    consumer = QueueConsumer(sqs, queue.url, queue.name, processor, metrics, cfg, **options)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop(grace_s=0.5)


class RecordingSqs:
    """The real client, with the consumer's receive and delete calls written down."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.receive_sizes: list[int] = []
        self.delete_batch_sizes: list[int] = []
        self.single_deletes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def receive_message(self, **request: Any) -> Any:
        self.receive_sizes.append(request["MaxNumberOfMessages"])
        return await self._inner.receive_message(**request)

    async def delete_message_batch(self, **request: Any) -> Any:
        self.delete_batch_sizes.append(len(request["Entries"]))
        return await self._inner.delete_message_batch(**request)

    async def delete_message(self, **request: Any) -> Any:
        self.single_deletes += 1
        return await self._inner.delete_message(**request)


class RecordingExtensions(RecordingSqs):
    """Also writes down the timeouts each ChangeMessageVisibilityBatch asked for, and hands them to `extended`."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.extended: asyncio.Queue[list[int]] = asyncio.Queue()

    async def change_message_visibility_batch(self, **request: Any) -> Any:
        answer = await self._inner.change_message_visibility_batch(**request)
        self.extended.put_nowait([entry["VisibilityTimeout"] for entry in request["Entries"]])
        return answer


class SteppedClock:
    """A lease clock that stands still until the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ReceiveIgnoringCancellation(RecordingSqs):
    """A receive that completes even when cancelled: SQS answered just as stop() began."""

    async def receive_message(self, **request: Any) -> Any:
        self.receive_sizes.append(request["MaxNumberOfMessages"])
        call = asyncio.ensure_future(self._inner.receive_message(**request))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            return await call


# -- processors --------------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """Processes by a rule, remembering every delivery, what is running now and the most ever at once."""

    rule: Callable[[QueueMessage, Lease], Awaitable[Outcome]]
    seen: list[QueueMessage] = field(default_factory=list)
    running: int = 0
    most_at_once: int = 0
    cancelled: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    async def process(self, message: QueueMessage, lease: Lease) -> Outcome:
        self.seen.append(message)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            outcome = await self.rule(message, lease)
        except asyncio.CancelledError:
            self.cancelled.append(message.body)
            raise
        finally:
            self.running -= 1
        self.finished.append(message.body)
        return outcome

    def bodies(self) -> list[str]:
        return [message.body for message in self.seen]


def after(seconds: float, outcome: Outcome) -> Callable[[QueueMessage, Lease], Awaitable[Outcome]]:
    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        await asyncio.sleep(seconds)
        return outcome

    return rule


def after_event(event: asyncio.Event, outcome: Outcome) -> Callable[[QueueMessage, Lease], Awaitable[Outcome]]:
    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        await event.wait()
        return outcome

    return rule


# -- polling and deleting ----------------------------------------------------------------------------------


async def test_every_message_is_processed_once_and_deleted(sqs, queue, metrics, registry):
    bodies = [f"m{i}" for i in range(25)]
    await send(sqs, queue, bodies)
    recorder = Recorder(after(0.05, Outcome.done("sent")))
    async with consuming(sqs, queue, recorder, metrics, config(concurrency=5)) as consumer:
        await eventually(lambda: consumer.counts.complete == 25, what="25 messages finished")
        assert consumer.running
    assert not consumer.running
    assert sorted(recorder.bodies()) == sorted(bodies)
    assert recorder.most_at_once <= 5
    assert await message_counts(sqs, queue.url) == (0, 0)
    assert sample(registry, "comms_messages_finished_total", queue=queue.name, disposition="done", reason="sent") == 25
    assert sample(registry, "comms_messages_received_total", queue=queue.name) == 25
    assert sample(registry, "comms_messages_in_flight", queue=queue.name) == 0


async def test_polls_only_for_free_slots_and_leaves_the_rest_on_the_queue(sqs, queue, metrics):
    await send(sqs, queue, [f"m{i}" for i in range(6)])
    recording = RecordingSqs(sqs)
    gate = asyncio.Event()
    recorder = Recorder(after_event(gate, Outcome.done("sent")))
    async with consuming(recording, queue, recorder, metrics, config(concurrency=2)) as consumer:
        await eventually(lambda: recorder.running == 2, what="two messages started")
        assert await message_counts(sqs, queue.url) == (4, 2)
        gate.set()
        await eventually(lambda: consumer.counts.complete == 6, what="all six finished")
    assert recorder.most_at_once == 2
    assert recording.receive_sizes
    assert max(recording.receive_sizes) <= 2


async def test_finished_deletes_go_out_in_batches_of_at_most_ten(sqs, queue, metrics):
    await send(sqs, queue, [f"m{i}" for i in range(20)])
    recording = RecordingSqs(sqs)
    recorder = Recorder(after(0, Outcome.done("sent")))
    async with consuming(recording, queue, recorder, metrics, config(concurrency=20)) as consumer:
        await eventually(lambda: consumer.counts.complete == 20, what="twenty finished")
    assert recording.single_deletes == 0
    assert sum(recording.delete_batch_sizes) == 20
    assert max(recording.delete_batch_sizes) <= 10
    assert len(recording.delete_batch_sizes) <= 4
    assert await message_counts(sqs, queue.url) == (0, 0)


# -- heartbeat and leases ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_heartbeat_keeps_a_message_invisible_past_its_visibility_timeout(sqs, metrics, registry):
    queue = await create_queue(sqs, visibility_s=2)
    await send(sqs, queue, ["long"])
    extended = {"queue": queue.name, "result": "ok"}

    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        # An extension is due only below 1 s of the 2 s visibility left, and gives 2 s from its request: the
        # fourth comes more than 4 s after the receive, twice the visibility the message was received with.
        await eventually(
            lambda: sample(registry, "comms_visibility_extensions_total", **extended) >= 4,
            timeout_s=15,
            what="four extensions",
        )
        return Outcome.done("sent")

    recorder = Recorder(rule)
    async with consuming(sqs, queue, recorder, metrics, config(visibility_timeout_s=2)) as consumer:
        await eventually(lambda: recorder.running == 1, what="processing started")
        while recorder.running:
            assert await raw_receive(sqs, queue.url, wait_s=1) == [], "a second consumer received it"
        await eventually(lambda: consumer.counts.complete == 1, what="message finished")
    assert recorder.bodies() == ["long"]
    assert sample(registry, "comms_visibility_extensions_total", queue=queue.name, result="ok") >= 4
    assert sample(registry, "comms_visibility_extensions_total", queue=queue.name, result="failed") == 0
    assert await message_counts(sqs, queue.url) == (0, 0)


async def delete_own_message(sqs, queue: QueueUnderTest, message: QueueMessage) -> None:
    """Invalidate the receipt handle under the consumer, as if the lease had gone elsewhere."""
    await sqs.delete_message(QueueUrl=queue.url, ReceiptHandle=message.receipt_handle)


async def test_lost_lease_cancels_unprotected_work(sqs, queue, metrics, registry):
    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        await delete_own_message(sqs, queue, message)
        await asyncio.sleep(30)
        return Outcome.done("sent")

    await send(sqs, queue, ["doomed"])
    recorder = Recorder(rule)
    with capture_logs() as logs:
        async with consuming(sqs, queue, recorder, metrics, config(visibility_timeout_s=2)) as consumer:
            await eventually(lambda: recorder.cancelled == ["doomed"], timeout_s=5, what="work cancelled")
            await eventually(lambda: consumer.counts.retried == 1, what="finish recorded")
    assert len(recorder.seen) == 1
    assert consumer.counts.leases_lost == 1
    # Lost at the first extension, which SQS refused for the stale receipt: not retried, not left to lapse.
    assert sample(registry, "comms_visibility_extensions_total", queue=queue.name, result="ok") == 0
    assert sample(registry, "comms_visibility_extensions_total", queue=queue.name, result="failed") == 1
    [lost] = [e for e in logs if e["event"] == "lease_lost"]
    assert lost["reason"] == "ReceiptHandleIsInvalid" and not lost["protected"]
    reason = {"queue": queue.name, "disposition": "retry", "reason": "lease_lost"}
    assert sample(registry, "comms_messages_finished_total", **reason) == 1


async def test_lost_lease_does_not_cancel_protected_work(sqs, queue, metrics, registry):
    lost_while_protected: list[bool] = []

    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        with lease.protected():
            await delete_own_message(sqs, queue, message)
            await lease.lost.wait()
            await asyncio.sleep(1.0)  # two more heartbeat ticks, each of which cancels lost unprotected work
            lost_while_protected.append(lease.lost.is_set())
        return Outcome.done("sent")

    await send(sqs, queue, ["sending"])
    recorder = Recorder(rule)
    async with consuming(sqs, queue, recorder, metrics, config(visibility_timeout_s=2)) as consumer:
        await eventually(lambda: consumer.counts.complete == 1, what="protected work finished")
    assert recorder.cancelled == []
    assert lost_while_protected == [True]
    assert consumer.counts.leases_lost == 1
    assert sample(registry, "comms_messages_finished_total", queue=queue.name, disposition="done", reason="sent") == 1


async def test_work_that_leaves_protection_after_a_lost_lease_is_cancelled(sqs, queue, metrics):
    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        with lease.protected():
            await delete_own_message(sqs, queue, message)
            await lease.lost.wait()
        await asyncio.sleep(30)
        return Outcome.done("sent")

    await send(sqs, queue, ["after-send"])
    recorder = Recorder(rule)
    async with consuming(sqs, queue, recorder, metrics, config(visibility_timeout_s=2)):
        await eventually(lambda: recorder.cancelled == ["after-send"], timeout_s=5, what="cancelled after protection")


async def test_visibility_is_never_extended_past_the_lease_cap(sqs, queue, metrics, registry):
    leases: list[Lease] = []
    started = asyncio.Event()

    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        leases.append(lease)
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("never finishes")

    recorder = Recorder(rule)
    await send(sqs, queue, ["endless"])
    clock = SteppedClock()  # the lease clock: received at 0.0, visible until 2.0, capped at 4.0
    client = RecordingExtensions(sqs)
    cfg = config(visibility_timeout_s=2, max_lease_s=4)  # a 0.5 s tick; an extension is due below 1 s left
    with capture_logs() as logs:
        async with consuming(client, queue, recorder, metrics, cfg, clock=clock) as consumer:
            async with asyncio.timeout(10):  # hang guard
                await started.wait()
                clock.now = 1.5  # 0.5 s left, 2.5 s below the cap: the full extension, to 3.5
                assert await client.extended.get() == [2]
                clock.now = 3.0  # 0.5 s left, 1 s below the cap: only up to the cap, to 4.0
                assert await client.extended.get() == [1]
                assert recorder.cancelled == [] and not leases[0].lost.is_set()
                clock.now = 3.9  # 0.1 s left and nothing to extend to: the lease ends at the cap
                await leases[0].lost.wait()
            await eventually(lambda: recorder.cancelled == ["endless"], timeout_s=5, what="cancelled at the cap")
            assert client.extended.empty()
    assert consumer.counts.leases_lost == 1
    assert [e["reason"] for e in logs if e["event"] == "lease_lost"] == ["max_lease"]
    assert sample(registry, "comms_visibility_extensions_total", queue=queue.name, result="ok") == 2
    assert sample(registry, "comms_visibility_extensions_total", queue=queue.name, result="failed") == 0


def test_next_visibility_is_the_extension_until_the_cap_then_what_is_left():
    assert next_visibility_s(now=100.0, received_at=0.0, extension_s=60, max_lease_s=43200) == 60
    assert next_visibility_s(now=43170.0, received_at=0.0, extension_s=60, max_lease_s=43200) == 30
    assert next_visibility_s(now=43300.0, received_at=0.0, extension_s=60, max_lease_s=43200) == 0


class ScriptedVisibilityCalls:
    """ChangeMessageVisibilityBatch that records entry counts and succeeds, or fails as a whole call."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.batch_sizes: list[int] = []

    async def change_message_visibility_batch(self, **request: Any) -> Any:
        self.batch_sizes.append(len(request["Entries"]))
        if self.fail:
            raise EndpointConnectionError(endpoint_url="http://sqs.invalid")
        return {"Successful": [{"Id": entry["Id"]} for entry in request["Entries"]], "Failed": []}


def heartbeat_over(sqs, metrics, clock: list[float]) -> VisibilityHeartbeat:
    return VisibilityHeartbeat(
        sqs, "url", "q", metrics, extension_s=60, tick_s=1.0, max_lease_s=43200, clock=lambda: clock[0]
    )


def in_flight(n: int) -> InFlight:
    message = QueueMessage(f"id-{n}", f"receipt-{n}", "body", {}, 1, 0.0)
    return InFlight(message, {}, Lease(), received_at=0.0, visible_until=60.0)


async def test_heartbeat_extends_many_due_messages_in_batches_of_at_most_ten(metrics, registry):
    calls, clock = ScriptedVisibilityCalls(), [10.0]
    heartbeat = heartbeat_over(calls, metrics, clock)
    items = [in_flight(n) for n in range(25)]
    for item in items:
        heartbeat.track(item)
    await heartbeat.beat()
    assert calls.batch_sizes == []  # 50 s of visibility left: nothing due
    clock[0] = 31.0
    await heartbeat.beat()
    assert sorted(calls.batch_sizes) == [5, 10, 10]
    assert all(item.visible_until == 91.0 for item in items)
    assert sample(registry, "comms_visibility_extensions_total", queue="q", result="ok") == 25


async def test_failed_extension_call_is_retried_until_visibility_runs_short_then_the_lease_is_lost(metrics, registry):
    calls, clock = ScriptedVisibilityCalls(fail=True), [31.0]
    heartbeat = heartbeat_over(calls, metrics, clock)
    item = in_flight(1)
    item.task = asyncio.create_task(asyncio.sleep(30))
    heartbeat.track(item)
    await heartbeat.beat()
    assert not item.lease.lost.is_set()
    clock[0] = 58.5
    await heartbeat.beat()
    assert item.lease.lost.is_set()
    await asyncio.wait({item.task})
    assert item.task.cancelled()
    assert sample(registry, "comms_visibility_extensions_total", queue="q", result="failed") == 2


# -- outcomes ----------------------------------------------------------------------------------------------


async def test_retry_without_delay_makes_the_message_reappear_at_once(sqs, metrics, registry):
    queue = await create_queue(sqs, visibility_s=30)

    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        return Outcome.retry("ai_transient", delay_s=0) if message.receive_count == 1 else Outcome.done("sent")

    await send(sqs, queue, ["again"])
    recorder = Recorder(rule)
    async with consuming(sqs, queue, recorder, metrics, config(visibility_timeout_s=30)) as consumer:
        await eventually(lambda: consumer.counts.complete == 1, timeout_s=5, what="second delivery done")
    assert [message.receive_count for message in recorder.seen] == [1, 2]
    assert recorder.seen[0].message_id == recorder.seen[1].message_id
    reason = {"queue": queue.name, "disposition": "retry", "reason": "ai_transient"}
    assert sample(registry, "comms_messages_finished_total", **reason) == 1
    assert await message_counts(sqs, queue.url) == (0, 0)


def test_retry_backoff_doubles_with_the_receive_count_jittered_and_capped():
    rng = random.Random(7)
    for receive_count, ceiling in [(1, 5), (2, 10), (3, 20), (6, 160), (7, 300), (1000, 300)]:
        delays = {retry_delay_s(receive_count, 5.0, 300.0, rng) for _ in range(50)}
        assert min(delays) >= ceiling / 2
        assert max(delays) <= ceiling
        assert len(delays) > 1


async def test_dead_letter_moves_the_message_to_the_dlq_with_body_and_attributes(sqs, queue, metrics, registry):
    attributes = {
        "channelMethod": {"DataType": "String", "StringValue": "whatsapp"},
        "conversationId": {"DataType": "String", "StringValue": "ci#pi#r#447700900001"},
        "attempt": {"DataType": "Number", "StringValue": "3"},
        "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
    }
    body = orjson.dumps({"frontend_payload": "not a context"}).decode()
    await send(sqs, queue, [body], attributes)
    recorder = Recorder(after(0, Outcome.dead_letter("invalid_context")))
    async with consuming(sqs, queue, recorder, metrics, config()) as consumer:
        await eventually(lambda: consumer.counts.dead_lettered == 1, what="dead-lettered")
        assert consumer.dead_letter_queue_url == queue.dlq_url
    assert recorder.seen[0].attributes == {
        "channelMethod": "whatsapp",
        "conversationId": "ci#pi#r#447700900001",
        "attempt": "3",
    }
    moved = await raw_receive(sqs, queue.dlq_url, wait_s=1)
    assert [m["Body"] for m in moved] == [body]
    assert moved[0]["MessageAttributes"] == attributes
    assert await message_counts(sqs, queue.url) == (0, 0)
    reason = {"queue": queue.name, "disposition": "dead_letter", "reason": "invalid_context"}
    assert sample(registry, "comms_messages_finished_total", **reason) == 1


async def test_poison_message_lands_in_the_dlq_after_three_receives(sqs, metrics):
    queue = await create_queue(sqs, visibility_s=30)
    await send(sqs, queue, ["poison"])
    recorder = Recorder(after(0, Outcome.retry("ai_transient", delay_s=0)))
    async with consuming(sqs, queue, recorder, metrics, config(visibility_timeout_s=30)):
        await eventually(
            lambda: message_counts_are(sqs, queue.dlq_url, (1, 0)), timeout_s=10, what="redriven to the DLQ"
        )
    assert [message.receive_count for message in recorder.seen] == [1, 2, 3]
    assert await message_counts(sqs, queue.url) == (0, 0)


async def message_counts_are(sqs, url: str, expected: tuple[int, int]) -> bool:
    return await message_counts(sqs, url) == expected


async def test_processor_exception_is_treated_as_retry(sqs, queue, metrics, registry):
    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        if message.receive_count == 1:
            raise RuntimeError("bug in the processor")
        return Outcome.done("sent")

    await send(sqs, queue, ["flaky"])
    recorder = Recorder(rule)
    cfg = config(visibility_timeout_s=30, retry_base_s=1, retry_cap_s=1)
    async with consuming(sqs, queue, recorder, metrics, cfg) as consumer:
        await eventually(lambda: consumer.counts.complete == 1, timeout_s=6, what="redelivery done")
    assert [message.receive_count for message in recorder.seen] == [1, 2]
    assert consumer.counts.failed == 1
    reason = {"queue": queue.name, "disposition": "retry", "reason": "unhandled_error"}
    assert sample(registry, "comms_messages_finished_total", **reason) == 1


# -- stopping ----------------------------------------------------------------------------------------------


async def test_stop_lets_work_finish_within_grace_and_returns_the_rest_at_once(sqs, metrics, registry):
    queue = await create_queue(sqs, visibility_s=30)
    release_fast = asyncio.Event()
    order: list[str] = []

    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        try:
            await (release_fast.wait() if message.body == "fast" else asyncio.Event().wait())
        except asyncio.CancelledError:
            order.append(f"cancelled {message.body}")
            raise
        order.append(f"finished {message.body}")
        return Outcome.done("sent")

    await send(sqs, queue, ["fast", "slow"])
    recorder = Recorder(rule)
    consumer = QueueConsumer(
        sqs, queue.url, queue.name, recorder, metrics, config(concurrency=2, visibility_timeout_s=30)
    )
    await consumer.start()
    await eventually(lambda: recorder.running == 2, what="both started")
    stopping = asyncio.create_task(consumer.stop(grace_s=1.5))
    await asyncio.sleep(0)
    assert not consumer.running
    release_fast.set()  # "fast" ends while stop is draining: within the grace
    async with asyncio.timeout(10):  # hang guard: "slow" would run forever if stop did not cancel it
        await stopping
    assert order == ["finished fast", "cancelled slow"]
    assert recorder.finished == ["fast"]
    assert recorder.cancelled == ["slow"]
    returned = await raw_receive(sqs, queue.url)
    assert [m["Body"] for m in returned] == ["slow"]
    assert returned[0]["Attributes"]["ApproximateReceiveCount"] == "2"
    assert consumer.counts.complete == 1
    assert consumer.counts.returned == 1
    reason = {"queue": queue.name, "disposition": "retry", "reason": "shutdown"}
    assert sample(registry, "comms_messages_finished_total", **reason) == 1


async def test_messages_received_after_stop_began_go_back_at_once(sqs, metrics):
    queue = await create_queue(sqs, visibility_s=30)
    recorder = Recorder(after(0, Outcome.done("sent")))
    client = ReceiveIgnoringCancellation(sqs)
    consumer = QueueConsumer(client, queue.url, queue.name, recorder, metrics, config(wait_time_s=3))
    await consumer.start()
    await eventually(lambda: len(client.receive_sizes) == 1, what="long poll in progress")
    stopping = asyncio.create_task(consumer.stop(grace_s=1))
    await asyncio.sleep(0)  # stop has begun: the open poll is left to end
    assert not consumer.running and not stopping.done()
    await send(sqs, queue, ["late"])
    await stopping
    assert recorder.seen == []
    assert consumer.counts.returned == 1
    assert [m["Body"] for m in await raw_receive(sqs, queue.url)] == ["late"]


async def test_the_runner_drains_every_consumer_in_parallel(sqs, metrics):
    queues = [await create_queue(sqs), await create_queue(sqs)]
    recorder = Recorder(after(0, Outcome.done("sent")))
    consumers = [QueueConsumer(sqs, q.url, q.name, recorder, metrics, config()) for q in queues]
    for consumer in consumers:
        await consumer.start()
    assert all(c.running for c in consumers)
    for q in queues:
        await send(sqs, q, [q.name])
    await eventually(lambda: len(recorder.finished) == 2, what="one message from each queue")
    await asyncio.wait_for(stop_consumers(consumers, 1, asyncio.Event()), timeout=5)  # a hang guard
    assert not any(c.running for c in consumers)
    assert sorted(recorder.finished) == sorted(q.name for q in queues)


async def test_stop_waits_a_bounded_while_for_protected_work_and_cancels_the_rest(sqs, metrics):
    queue = await create_queue(sqs, visibility_s=30)
    plain_cancelled, release_sending = asyncio.Event(), asyncio.Event()
    order: list[str] = []

    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        try:
            if message.body == "plain":
                await asyncio.Event().wait()
            with lease.protected():
                await (release_sending.wait() if message.body == "sending" else asyncio.Event().wait())
        except asyncio.CancelledError:
            order.append(f"cancelled {message.body}")
            if message.body == "plain":
                plain_cancelled.set()
            raise
        order.append(f"finished {message.body}")
        return Outcome.done("sent")

    await send(sqs, queue, ["plain", "sending", "stuck"])
    recorder = Recorder(rule)
    cfg = config(concurrency=3, visibility_timeout_s=30, protected_grace_s=1.5)
    consumer = QueueConsumer(sqs, queue.url, queue.name, recorder, metrics, cfg)
    await consumer.start()
    await eventually(lambda: recorder.running == 3, what="all three started")
    with capture_logs() as logs:
        async with asyncio.timeout(10):  # hang guard: "stuck" would run forever if stop did not cancel it
            stopping = asyncio.create_task(consumer.stop(grace_s=0.2))
            await plain_cancelled.wait()  # the grace is over: unprotected work goes at once
            assert not stopping.done()  # protected work gets its while
            release_sending.set()  # "sending" ends within that while
            await stopping
    assert order == ["cancelled plain", "finished sending", "cancelled stuck"]
    assert [e["count"] for e in logs if e["event"] == "cancelling_protected_work"] == [1]
    assert recorder.finished == ["sending"]
    assert sorted(recorder.cancelled) == ["plain", "stuck"]
    assert consumer.counts.returned == 2
    assert sorted(m["Body"] for m in await raw_receive(sqs, queue.url)) == ["plain", "stuck"]


class HangingReturns(RecordingSqs):
    """SQS that no longer answers the calls making messages visible again (as when it hangs during a stop)."""

    async def change_message_visibility_batch(self, **request: Any) -> Any:
        await asyncio.Event().wait()

    async def change_message_visibility(self, **request: Any) -> Any:
        await asyncio.Event().wait()


async def test_stop_ends_by_its_budget_when_the_finishing_calls_hang(sqs, metrics):
    """Found from outside: with SQS hanging, a stop waited finish_timeout_s twice after the drain and outlived the
    pod's grace period (SIGKILL). Now what finishes after the drain has only what the stop's budget leaves."""
    queue = await create_queue(sqs, visibility_s=30)
    started = asyncio.Event()

    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        started.set()
        await asyncio.Event().wait()
        return Outcome.done("never")

    await send(sqs, queue, ["stuck"])
    cfg = config(visibility_timeout_s=30, protected_grace_s=0.2, receive_margin_s=0.5, finish_timeout_s=600)
    consumer = QueueConsumer(HangingReturns(sqs), queue.url, queue.name, Recorder(rule), metrics, cfg)
    await consumer.start()
    await eventually(started.is_set, what="the message in flight")
    with capture_logs() as logs:
        async with asyncio.timeout(60):  # hang guard: unbounded, the finishing waits would take 2 x 600 s
            await consumer.stop(grace_s=0.2)
    assert [e["pending"] for e in logs if e["event"] == "finishing_timed_out"] == [1]


# -- stopping while a long poll is open ------------------------------------------------------------------------


class ReceivesOutliveCancellation(RecordingSqs):
    """As on SQS: a receive the consumer cancels stays open at the endpoint and still takes what becomes visible.

    Each call runs on shielded from the consumer's cancellation; `started` yields once per call as it begins,
    `ended()` waits until every call has ended at the endpoint, `taken` lists every message any call took.
    """

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.started: asyncio.Queue[None] = asyncio.Queue()
        self.calls: set[asyncio.Future[Any]] = set()
        self.taken: list[dict[str, Any]] = []

    async def receive_message(self, **request: Any) -> Any:
        self.receive_sizes.append(request["MaxNumberOfMessages"])
        call = asyncio.ensure_future(self._take(request))
        self.calls.add(call)
        self.started.put_nowait(None)
        return await asyncio.shield(call)

    async def _take(self, request: dict[str, Any]) -> Any:
        answer = await self._inner.receive_message(**request)
        self.taken.extend(answer.get("Messages", []))
        return answer

    async def ended(self) -> None:
        if self.calls:
            await asyncio.wait(self.calls)


def until_cancelled(started: asyncio.Event) -> Callable[[QueueMessage, Lease], Awaitable[Outcome]]:
    """A slow AI call: signals that it started, then runs until stop() cancels it."""

    async def rule(message: QueueMessage, lease: Lease) -> Outcome:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("never finishes")

    return rule


async def slow_message_and_open_poll(sqs, metrics) -> tuple[QueueUnderTest, Recorder, ReceivesOutliveCancellation, Any]:
    """One message in flight (cancelled only by stop) and the consumer's next long poll open at SQS."""
    queue = await create_queue(sqs, visibility_s=30)
    await send(sqs, queue, ["slow"])
    started = asyncio.Event()
    recorder = Recorder(until_cancelled(started))
    client = ReceivesOutliveCancellation(sqs)
    cfg = config(concurrency=2, visibility_timeout_s=30, wait_time_s=3)
    consumer = QueueConsumer(client, queue.url, queue.name, recorder, metrics, cfg)
    await consumer.start()
    await client.started.get()  # the poll that brings "slow"
    await started.wait()
    await client.started.get()  # the next one, open while "slow" runs
    return queue, recorder, client, consumer


async def test_stop_makes_interrupted_work_visible_only_after_the_open_poll_ended(sqs, metrics):
    queue, recorder, client, consumer = await slow_message_and_open_poll(sqs, metrics)
    assert consumer.running
    await consumer.stop(grace_s=0)
    assert not consumer.running
    await client.ended()  # every receive the consumer started has ended at the endpoint, abandoned or not
    assert recorder.cancelled == ["slow"]
    assert [m["Body"] for m in client.taken] == ["slow"], "a receive open during stop took the returned message"
    [again] = await raw_receive(sqs, queue.url)
    assert again["Body"] == "slow"
    # one real processing attempt, plus this receive
    assert again["Attributes"]["ApproximateReceiveCount"] == str(len(recorder.seen) + 1) == "2"
    assert consumer.counts.returned == 1


async def test_a_message_arriving_during_the_final_poll_is_handed_back_at_once(sqs, metrics):
    queue, recorder, client, consumer = await slow_message_and_open_poll(sqs, metrics)
    stopping = asyncio.create_task(consumer.stop(grace_s=0))
    await asyncio.sleep(0)  # stop has begun: no new poll, the open one is left to end
    await send(sqs, queue, ["late"])
    await stopping
    await client.ended()
    assert recorder.bodies() == ["slow"]
    assert sorted(m["Body"] for m in client.taken) == ["late", "slow"]
    counts = {m["Body"]: m["Attributes"]["ApproximateReceiveCount"] for m in await raw_receive(sqs, queue.url)}
    # "slow": one processing attempt + this receive. "late": the final poll (SQS cannot take back a long poll
    # that is open) + this receive; handed back at once rather than hidden for the visibility timeout.
    assert counts == {"slow": "2", "late": "2"}
    assert consumer.counts.returned == 2


async def test_an_idle_consumer_lets_its_open_poll_end_and_hands_back_what_it_took(sqs, metrics):
    # Nothing in flight at stop: cancelling the poll would only close our end; SQS keeps it open and a message
    # made visible meanwhile (another replica's retry, a new one) would be taken, counted and hidden for 30 s.
    queue = await create_queue(sqs, visibility_s=30)
    recorder = Recorder(after(0, Outcome.done("sent")))
    client = ReceivesOutliveCancellation(sqs)
    consumer = QueueConsumer(client, queue.url, queue.name, recorder, metrics, config(visibility_timeout_s=30))
    await consumer.start()
    await client.started.get()  # the long poll is open at SQS
    stopping = asyncio.create_task(consumer.stop(grace_s=0))
    await asyncio.sleep(0)  # stop has begun: no new poll, the open one is left to end
    assert not consumer.running and not stopping.done()
    await send(sqs, queue, ["late"])
    await stopping
    await client.ended()
    assert [m["Body"] for m in client.taken] == ["late"]
    assert len(client.receive_sizes) == 1
    assert recorder.seen == []
    assert consumer.counts.returned == 1
    # Visible again at once (not after 30 s): the handed-back receive + this one.
    [again] = await raw_receive(sqs, queue.url)
    assert (again["Body"], again["Attributes"]["ApproximateReceiveCount"]) == ("late", "2")


async def test_forced_stop_abandons_the_open_poll_and_in_flight_work_at_once(sqs, metrics):
    queue, recorder, client, consumer = await slow_message_and_open_poll(sqs, metrics)
    force = asyncio.Event()
    with capture_logs() as logs:
        stopping = asyncio.create_task(stop_consumers([consumer], grace_s=60, force=force))
        await asyncio.sleep(0)  # the graceful stop has begun: it would wait for "slow" and the open poll
        assert not stopping.done()
        force.set()  # a second SIGTERM
        await stopping
    assert any(not call.done() for call in client.calls), "stop waited for the open poll to end"
    assert recorder.cancelled == ["slow"]
    assert consumer.counts.returned == 0
    assert "consumer_abandoned" in [e["event"] for e in logs]
    [finished] = [e for e in logs if e["event"] == "message_finished"]
    assert (finished["reason"], finished["sqs"]) == ("abandoned", "left_to_reappear")
    # Nothing made visible: "slow" reappears only when its visibility lapses, so the poll SQS keeps open
    # cannot take it.
    await client.ended()
    assert [m["Body"] for m in client.taken] == ["slow"]
    assert await message_counts(sqs, queue.url) == (0, 1)


class ReceiveNeverAnswers(RecordingSqs):
    """A receive the endpoint never answers (a hung connection); records whether the consumer gave up on it."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.open = asyncio.Event()
        self.cancelled = 0

    async def receive_message(self, **request: Any) -> Any:
        self.receive_sizes.append(request["MaxNumberOfMessages"])
        if len(self.receive_sizes) == 1:
            return await self._inner.receive_message(**request)
        self.open.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("never answers")


async def test_stop_cancels_a_receive_that_outlasts_its_wait_and_still_returns_interrupted_work(sqs, metrics):
    queue = await create_queue(sqs, visibility_s=30)
    await send(sqs, queue, ["slow"])
    started = asyncio.Event()
    recorder = Recorder(until_cancelled(started))
    client = ReceiveNeverAnswers(sqs)
    cfg = config(concurrency=2, visibility_timeout_s=30, wait_time_s=1, receive_margin_s=0.2)
    consumer = QueueConsumer(client, queue.url, queue.name, recorder, metrics, cfg)
    await consumer.start()
    await started.wait()
    await client.open.wait()
    with capture_logs() as logs:
        await asyncio.wait_for(consumer.stop(grace_s=0), timeout=10)
    assert client.cancelled == 1
    assert [e["event"] for e in logs if e["event"] == "receive_abandoned"] == ["receive_abandoned"]
    [again] = await raw_receive(sqs, queue.url)
    assert (again["Body"], again["Attributes"]["ApproximateReceiveCount"]) == ("slow", "2")


class ReceiveFails(RecordingSqs):
    """SQS unreachable: every receive fails at once."""

    async def receive_message(self, **request: Any) -> Any:
        self.receive_sizes.append(request["MaxNumberOfMessages"])
        raise EndpointConnectionError(endpoint_url="http://sqs.invalid")


class Rests:
    """The poller's rests after failed polls: the lengths asked for, and how many stop cut short.

    A rest ends only when cancelled, so a stop that waited for one would never end.
    """

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.cut_short = 0
        self.resting = asyncio.Event()

    async def sleep(self, delay_s: float) -> None:
        self.asked.append(delay_s)
        self.resting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cut_short += 1
            raise


async def test_a_failing_receive_does_not_hold_up_stop(sqs, queue, metrics):
    client = ReceiveFails(sqs)
    recorder = Recorder(after(0, Outcome.done("sent")))
    rests = Rests()
    cfg = config(poll_backoff_base_s=30, poll_backoff_cap_s=30)
    consumer = QueueConsumer(client, queue.url, queue.name, recorder, metrics, cfg, sleep=rests.sleep)
    await consumer.start()
    async with asyncio.timeout(10):  # hang guard
        await rests.resting.wait()
        await consumer.stop(grace_s=5)
    assert len(client.receive_sizes) == 1
    assert len(rests.asked) == 1 and 15 <= rests.asked[0] <= 30  # the backoff: half to all of the 30 s cap
    assert rests.cut_short == 1
    assert not consumer.running
