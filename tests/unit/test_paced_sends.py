"""The claimed-work skeleton paces its sends per sender (consumers/claimed_work.py with service/domain/pacing.py):
a turn is taken before the attempt is recorded, a turn too far off hands the message back untouched, and a 429
holds the sender off for every worker. On fakes and a fake clock."""

from __future__ import annotations

import orjson
from prometheus_client import CollectorRegistry

from consumers.contracts import Disposition, Lease, Outcome, QueueMessage
from consumers.metrics import ConsumerMetrics
from consumers.sqs_messages import RedrivePolicy
from consumers.template_job import parse_template_job
from consumers.template_sender import TemplatePorts, TemplateSender, TemplateSenderConfig
from service.domain.conversation import ConversationStatus
from service.domain.fleet_rate_limit import FleetRateLimiter
from service.domain.pacing import SendPacing
from service.domain.provider_ports import ProviderRateLimited
from service.domain.rate_limit import MICROS
from tests.fakes import FakeTokenLeases, FakeWorld
from tests.unit.test_template_sender import SMS_TEXT, context

SMS_PER_SECOND = 1.0


def paced_sender(world: FakeWorld, leases: FakeTokenLeases, max_wait_s: float = 30.0) -> TemplateSender:
    config = TemplateSenderConfig(
        queue="sms",
        claim_lease_s=30.0,
        ai_timeout_s=10.0,
        status_callback_url="https://comms.example/webhooks/twilio/status",
        redrive=RedrivePolicy("https://sqs.example/dlq", 3),
    )
    ports = TemplatePorts(world.conversation_claims, world.secrets, world.ai, world.senders)
    pacing = SendPacing(
        FleetRateLimiter(leases, world.clock), {"sms": SMS_PER_SECOND}, world.clock.sleep, max_wait_s=max_wait_s
    )
    return TemplateSender(
        config,
        ports,
        ConsumerMetrics(CollectorRegistry()),
        clock=world.clock,
        sleep=world.clock.sleep,
        pacing=pacing,
    )


async def deliver(sender: TemplateSender, world: FakeWorld, body: str) -> Outcome:
    world.ai.answer_next({"body": SMS_TEXT})
    message = QueueMessage("m-1", "receipt", body, {}, 1, world.clock.now())
    return await sender.process(message, Lease())


def new_body() -> str:
    return orjson.dumps(context("sms")).decode()


async def test_two_conversations_from_one_sender_are_sent_a_turn_apart() -> None:
    world, leases = FakeWorld(), FakeTokenLeases()
    sender = paced_sender(world, leases)
    for _ in range(2):
        assert (await deliver(sender, world, new_body())).disposition is Disposition.DONE
    sent = world.sender("sms").sent
    assert len(sent) == 2 and world.clock.sleeps.count(1.0) == 1


async def test_a_turn_too_far_off_defers_the_message_before_anything_is_recorded() -> None:
    world, leases = FakeWorld(), FakeTokenLeases()
    await deliver(paced_sender(world, leases), world, new_body())  # takes the sender's only token
    impatient, body = paced_sender(world, leases, max_wait_s=0.5), new_body()

    outcome = await deliver(impatient, world, body)

    assert (outcome.disposition, outcome.reason, outcome.retry_delay_s) == (Disposition.DEFER, "paced", 1)
    record = world.table[parse_template_job(body).key]
    assert record.ledger.provider_message_id is None and len(world.sender("sms").sent) == 1


async def test_a_429_holds_the_sender_off_for_every_worker() -> None:
    world, leases = FakeWorld(), FakeTokenLeases()
    world.sender("sms").faults.fail_next("send", error=ProviderRateLimited("twilio_rate_limited", code="20429"))
    body = new_body()

    outcome = await deliver(paced_sender(world, leases), world, body)

    assert (outcome.disposition, outcome.reason) == (Disposition.RETRY, "send_transient")
    assert world.table[parse_template_job(body).key].status is not ConversationStatus.FAILED_TO_SEND_MESSAGE
    [tat_us] = leases.tat_us.values()
    assert tat_us >= int((world.clock.now() + 1.0) * MICROS)  # no turn for anyone within the hold-off
