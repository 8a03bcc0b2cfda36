"""Finished messages wait up to `delete_flush_interval_s` (0.5 s) to share a DeleteMessageBatch call; a stopping
consumer does not wait that out: its last deletes go out at once and the stop reports them deleted."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from consumers.contracts import Outcome
from consumers.metrics import ConsumerMetrics
from consumers.runtime import ConsumerConfig, QueueConsumer
from tests.test_consumer_runtime import (
    QueueUnderTest,
    Recorder,
    RecordingSqs,
    after,
    config,
    create_queue,
    eventually,
    message_counts,
    send,
)


@pytest.fixture
async def queue(deps) -> AsyncIterator[QueueUnderTest]:
    created = await create_queue(deps.aws.sqs)
    yield created
    await deps.aws.sqs.delete_queue(QueueUrl=created.url)
    await deps.aws.sqs.delete_queue(QueueUrl=created.dlq_url)


@pytest.fixture
def metrics() -> ConsumerMetrics:
    return ConsumerMetrics(CollectorRegistry())


def test_a_finished_delete_waits_half_a_second_for_its_batch_by_default() -> None:
    assert ConsumerConfig().delete_flush_interval_s == 0.5


async def test_a_stop_sends_the_last_deletes_without_waiting_out_the_flush_interval(deps, queue, metrics) -> None:
    await send(deps.aws.sqs, queue, ["last"])
    recording = RecordingSqs(deps.aws.sqs)
    recorder = Recorder(after(0, Outcome.done("sent")))
    # An interval no test outlives: only the stop can send this delete before finish_timeout_s is up.
    cfg = config(delete_flush_interval_s=3600, finish_timeout_s=10)
    consumer = QueueConsumer(recording, queue.url, queue.name, recorder, metrics, cfg)
    await consumer.start()
    await eventually(lambda: recorder.finished == ["last"], what="the message processed")
    assert recording.delete_batch_sizes == []  # its delete is waiting for a fuller batch
    with capture_logs() as logs:
        await consumer.stop(grace_s=0.5)
    assert recording.delete_batch_sizes == [1]
    assert consumer.counts.complete == 1  # its finish (delete included) ended within the stop
    assert "finishing_timed_out" not in [entry["event"] for entry in logs]
    assert await message_counts(deps.aws.sqs, queue.url) == (0, 0)
