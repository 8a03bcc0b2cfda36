"""The claim keep-alive (consumers/claimed_work.py `_kept_alive`): a claim is refreshed only once less than its
margin is left, again a lease later while work still runs, and a failed refresh is tried again within the margin,
so the claim never lapses while work runs. On fakes, with the keep-alive's clock and waits driven by the test."""

from __future__ import annotations

import asyncio

import orjson
from prometheus_client import CollectorRegistry

from consumers.claimed_work import refresh_margin_s
from consumers.contracts import Lease, Outcome, QueueMessage
from consumers.metrics import ConsumerMetrics
from consumers.sqs_messages import RedrivePolicy
from consumers.template_sender import TemplatePorts, TemplateSender, TemplateSenderConfig
from tests.fakes import FakeWorld, Gate
from tests.unit.test_template_sender import SMS_TEXT, context

LEASE_S = 48.0  # the default: 0.8 x a 60 s visibility timeout
MARGIN_S = refresh_margin_s(LEASE_S)


class KeepAliveWaits:
    """The keep-alive's sleep: moves the world's clock on by what it asks for, until `limit` waits were taken;
    then waits for good (the work decides when it ends)."""

    def __init__(self, world: FakeWorld, limit: int) -> None:
        self.world = world
        self.asked: list[float] = []
        self.limit = limit
        self.used_up = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        if len(self.asked) >= self.limit:
            self.used_up.set()
            await asyncio.Event().wait()
        self.asked.append(round(seconds, 6))
        self.world.clock.advance(seconds)
        await asyncio.sleep(0)


def sender(world: FakeWorld, waits: KeepAliveWaits) -> TemplateSender:
    config = TemplateSenderConfig(
        queue="sms",
        claim_lease_s=LEASE_S,
        ai_timeout_s=10.0,
        status_callback_url=None,
        redrive=RedrivePolicy("https://sqs.example/dlq", 3),
    )
    ports = TemplatePorts(world.conversation_claims, world.secrets, world.ai, world.senders)
    return TemplateSender(
        config,
        ports,
        ConsumerMetrics(CollectorRegistry()),
        clock=world.clock,
        monotonic=world.clock.monotonic,
        keep_alive_sleep=waits,
    )


async def run_held(world: FakeWorld, waits: KeepAliveWaits) -> Outcome:
    """Deliver one message whose AI call lasts until the keep-alive has taken all its waits."""
    gate = Gate()
    world.ai.faults.on_next("write", gate)
    world.ai.answer_next({"body": SMS_TEXT})
    message = QueueMessage("m-1", "receipt", orjson.dumps(context("sms")).decode(), {}, 1, world.clock.now())
    task = asyncio.create_task(sender(world, waits).process(message, Lease()))
    await waits.used_up.wait()
    gate.open()
    return await task


def test_the_margin_is_an_eighth_of_the_lease_at_least_five_seconds_and_at_most_half() -> None:
    assert (refresh_margin_s(48.0), refresh_margin_s(240.0), refresh_margin_s(4.0)) == (6.0, 30.0, 2.0)


async def test_a_claim_is_first_refreshed_only_when_its_margin_is_all_that_is_left() -> None:
    world = FakeWorld()
    waits = KeepAliveWaits(world, limit=1)

    assert await run_held(world, waits) == Outcome.done("sent")

    assert waits.asked == [LEASE_S - MARGIN_S]  # not half the lease: a 40 s AI call costs no refresh
    assert world.conversation_claims.faults.calls["refresh"] == 1


async def test_work_that_outlives_a_refresh_is_refreshed_again_a_lease_later() -> None:
    world = FakeWorld()
    waits = KeepAliveWaits(world, limit=3)

    await run_held(world, waits)

    assert waits.asked == [LEASE_S - MARGIN_S] * 3
    assert world.conversation_claims.faults.calls["refresh"] == 3


async def test_a_failed_refresh_is_tried_again_before_the_claim_lapses() -> None:
    world = FakeWorld()
    world.conversation_claims.faults.fail_next("refresh")
    waits = KeepAliveWaits(world, limit=4)

    await run_held(world, waits)

    first, retry_after, then, next_lease = waits.asked
    assert (first, retry_after, then) == (LEASE_S - MARGIN_S, MARGIN_S / 4, 0.0)  # still within the first lease
    assert next_lease == LEASE_S - MARGIN_S
    assert world.conversation_claims.faults.calls["refresh"] == 3
