"""A worker whose SQS does not answer at start-up waits for it (capped, doubling rests) instead of exiting,
and a SIGTERM during that wait ends the process cleanly. SQS sits behind a fault proxy in front of moto."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import pytest
from botocore.exceptions import EndpointConnectionError

from consumers.sqs_messages import StartupRetry, StartupStopped
from local_stack.moto_server import free_port
from service.bootstrap import Dependencies
from service.config import Settings
from service.runner import run_service
from tests.e2e_support import eventually
from tests.fault_proxy import FaultProxy


@pytest.fixture
async def sqs_proxy(settings: Settings) -> AsyncIterator[FaultProxy]:
    moto = urlsplit(settings.aws_endpoint_url)
    async with FaultProxy(moto.hostname or "127.0.0.1", moto.port or 80) as proxy:
        yield proxy


@pytest.fixture
async def worker_settings(settings: Settings, deps: Dependencies, sqs_proxy: FaultProxy) -> AsyncIterator[Settings]:
    """A worker of its own queue (with a DLQ), talking to SQS through the proxy."""
    name = f"startup-{uuid.uuid4().hex[:8]}"
    dlq = (await deps.aws.sqs.create_queue(QueueName=f"{name}-dlq"))["QueueUrl"]
    dlq_arn = (await deps.aws.sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"]))["Attributes"]
    policy = f'{{"deadLetterTargetArn":"{dlq_arn["QueueArn"]}","maxReceiveCount":"3"}}'
    url = (await deps.aws.sqs.create_queue(QueueName=name, Attributes={"RedrivePolicy": policy}))["QueueUrl"]
    try:
        yield settings.model_copy(
            update={
                "host": "127.0.0.1",
                "port": free_port(),
                "metrics_port": free_port(),
                "sqs_endpoint_url": sqs_proxy.url,
                "sqs_send_attempts": 1,
                "whatsapp_queue_url": url,
                "consumer_queues": "whatsapp",
            }
        )
    finally:
        await deps.aws.sqs.delete_queue(QueueUrl=url)
        await deps.aws.sqs.delete_queue(QueueUrl=dlq)


async def test_a_worker_waits_for_sqs_at_startup_then_consumes(
    worker_settings: Settings, sqs_proxy: FaultProxy
) -> None:
    sqs_proxy.reset()  # every connection refused with a TCP RST
    rests: list[float] = []

    async def rest(delay_s: float) -> None:
        rests.append(delay_s)
        if len(rests) == 4:
            sqs_proxy.pass_through()  # SQS is back
        await asyncio.sleep(0)

    started: list[Dependencies] = []
    stop, ready = asyncio.Event(), asyncio.Event()

    def on_ready(deps: Dependencies) -> None:
        started.append(deps)
        ready.set()

    service = asyncio.create_task(run_service(worker_settings, "worker", stop=stop, on_ready=on_ready, sleep=rest))
    try:
        await asyncio.wait({service, asyncio.ensure_future(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        assert ready.is_set(), f"the worker ended instead of waiting: {service.exception()!r}"
        assert rests == [0.5, 1.0, 2.0, 4.0]  # one rest per failed read, doubling
        [consumer] = started[0].consumers
        assert consumer.running
        assert consumer.dead_letter_queue_url is not None
        assert consumer.dead_letter_queue_url.endswith("-dlq")  # the policy was read once SQS answered
    finally:
        stop.set()
        await service


async def test_while_waiting_for_sqs_the_worker_answers_its_probes_alive_and_not_ready(
    worker_settings: Settings, sqs_proxy: FaultProxy
) -> None:
    """Found from outside: the port stayed closed for the whole wait, so the chart's startup probe restarted a pod
    that was only waiting (and nothing was logged for 100 s)."""
    sqs_proxy.reset()
    answers: list[tuple[str, int]] = []

    async def rest(delay_s: float) -> None:
        if not answers:
            async with aiohttp.ClientSession() as session:
                for path in ("/healthz", "/readyz"):
                    async with session.get(f"http://127.0.0.1:{worker_settings.port}{path}") as answer:
                        answers.append((path, answer.status))
            sqs_proxy.pass_through()
        await asyncio.sleep(0)

    stop, ready = asyncio.Event(), asyncio.Event()
    service = asyncio.create_task(
        run_service(worker_settings, "worker", stop=stop, on_ready=lambda _: ready.set(), sleep=rest)
    )
    try:
        await asyncio.wait({service, asyncio.ensure_future(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)
        assert ready.is_set(), f"the worker ended instead of waiting: {service.exception()!r}"
        url = f"http://127.0.0.1:{worker_settings.port}/readyz"
        async with aiohttp.ClientSession() as session, session.get(url) as answer:  # the service's own app now
            assert "starting: waiting for SQS" not in await answer.text()
    finally:
        stop.set()
        await service
    assert answers == [("/healthz", 200), ("/readyz", 503)]


class Rests(list[float]):
    """A start-up retry's rests, written down and not waited."""

    async def __call__(self, delay_s: float) -> None:
        self.append(delay_s)


async def test_an_attempt_sqs_never_answers_counts_as_failed_after_its_bound() -> None:
    rests = Rests()
    calls = 0

    async def hangs_once() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()  # an SQS that accepts and never answers
        return "answered"

    retry = StartupRetry(asyncio.Event(), rests, attempt_timeout_s=0.01)
    assert await retry.call("probe", "whatsapp", hangs_once) == "answered"
    assert rests == [0.5]


async def test_the_wait_is_capped() -> None:
    rests = Rests()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls <= 8:
            raise EndpointConnectionError(endpoint_url="http://sqs.test")
        return "answered"

    retry = StartupRetry(asyncio.Event(), rests, base_s=0.5, cap_s=8.0)
    assert await retry.call("probe", "whatsapp", flaky) == "answered"
    assert rests == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]


async def test_sigterm_while_waiting_for_sqs_ends_the_worker_cleanly(
    worker_settings: Settings, sqs_proxy: FaultProxy
) -> None:
    sqs_proxy.reset()
    rests: list[float] = []
    ready = asyncio.Event()

    async def rest(delay_s: float) -> None:
        rests.append(delay_s)
        if len(rests) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # run_service's own handler takes it
            await asyncio.Event().wait()  # a rest that only the stop ends

    await run_service(worker_settings, "worker", on_ready=lambda _: ready.set(), sleep=rest)  # returns: no error
    assert rests == [0.5, 1.0]
    assert not ready.is_set()


async def test_sigterm_during_a_hung_sqs_call_at_startup_ends_the_worker_cleanly(
    worker_settings: Settings, sqs_proxy: FaultProxy
) -> None:
    sqs_proxy.stall()  # connections accepted, nothing answered
    rests: list[float] = []

    async def rest(delay_s: float) -> None:
        rests.append(delay_s)

    async def terminate_once_asked() -> None:
        await eventually(lambda: sqs_proxy.connections > 0, timeout_s=10, what="the worker asked SQS")
        os.kill(os.getpid(), signal.SIGTERM)

    signalling = asyncio.create_task(terminate_once_asked())
    try:
        await run_service(worker_settings, "worker", sleep=rest)
    finally:
        await signalling
    assert rests == []  # stopped inside the first call, not after it failed


async def test_a_stopped_wait_raises_startup_stopped() -> None:
    stop = asyncio.Event()
    stop.set()

    async def never() -> None:
        raise AssertionError("not called once stopped")

    with pytest.raises(StartupStopped):
        await StartupRetry(stop).call("probe", "whatsapp", never)
